"""Text generation with the original's four cache modes, batched and streaming.

Generation is a few plain functions (as in gpt-fast):

    prepare_prompts  left-pad the prompts into ids [B, T]
    prefill          run the prompt once, filling the caches the mode asks for
    decode_step      feed the last sampled token(s) of every row
    sample           temperature, top-k and top-p (nucleus) sampling, or greedy

The four modes differ only in the cache arguments given to the one model forward:

    kv_g      KV-cache + G-cache   A and G_LM fixed by the prompt; nothing of the power-law
                                   network runs after the prefill
    kv_only   KV-cache             A fixed by the prompt; G_LM recomputed from it each step
    g_only    G-cache              the whole sequence re-run each step, G_LM fixed by the prompt
    no_cache  none                 the whole sequence re-run, A and G_LM recomputed each step

A predefined `G_LM` becomes a filled G-cache in every mode. Rows are left-padded; pads never
enter A and are never attended to, and positions count from each row's first real token, so
a prompt gives the same tokens alone or in a batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch import Tensor

from ..errors import PLDRError, PLDRTypeError
from ..model.cache import GCache, KVCache
from ..model.model import PLDRModel
from .sampling import SamplingConfig, sample

CACHE_MODES = ("kv_g", "kv_only", "g_only", "no_cache")


def prepare_prompts(prompts: Sequence[Sequence[int]] | Tensor, model: PLDRModel) -> list[list[int]]:
    """Check prompts (a list of id lists, or a LongTensor [T] / [B, T] without padding) and
    return them as lists of ints."""
    if isinstance(prompts, Tensor):
        if prompts.is_floating_point() or prompts.dtype == torch.bool:
            raise PLDRTypeError(f"prompt ids must be integers, got dtype {prompts.dtype}")
        if prompts.dim() not in (1, 2):
            raise PLDRError(f"a prompt tensor must be [T] or [B, T], got {list(prompts.shape)}")
        prompts = (prompts[None] if prompts.dim() == 1 else prompts).tolist()
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise PLDRError("prompts must be a non-empty list of token-id lists")
    if all(isinstance(t, int) and not isinstance(t, bool) for t in prompts):
        raise PLDRError("prompts must be a list of id lists; wrap a single prompt as [ids]")
    V, pad = model.config.vocab_size, model.config.pad_id
    rows = []
    for i, p in enumerate(prompts):
        if isinstance(p, Tensor):
            p = p.tolist()
        if not isinstance(p, (list, tuple)) or not all(
                isinstance(t, int) and not isinstance(t, bool) for t in p):
            raise PLDRTypeError(f"prompt {i} must be a list of integer token ids")
        if not p:
            raise PLDRError(f"prompt {i} is empty; give at least one token")
        bad = [t for t in p if not 0 <= t < V]
        if bad:
            raise PLDRError(f"prompt {i} has token id {bad[0]} outside the vocabulary [0, {V}); "
                            "check that the tokenizer matches the model")
        if pad in p:
            raise PLDRError(f"prompt {i} contains the pad id {pad}, which the model ignores; "
                            "remove it")
        rows.append(list(p))
    return rows


def left_pad(rows: list[list[int]], pad_id: int, device: torch.device) -> Tensor:
    """Rows of different lengths as one LongTensor [B, T], pads on the left."""
    T = max(len(r) for r in rows)
    return torch.tensor([[pad_id] * (T - len(r)) + r for r in rows], dtype=torch.long,
                        device=device)


@dataclass
class GenerationState:
    """What the loop carries between steps for one batch."""

    seq: Tensor                   # [B, T (+ steps so far without a KV-cache)] ids, left padded
    kv_cache: KVCache | None
    g_cache: GCache | None


def _caches(model: PLDRModel, mode: str, batch: int, max_len: int,
            G_LM) -> tuple[KVCache | None, GCache | None]:
    """Allocate the caches that `mode` uses (a given G_LM is a filled G-cache in every mode)."""
    cfg, dev, dt = model.config, model.device, model.dtype
    kv = KVCache.allocate(cfg, batch, max_len, dev, dt) if mode in ("kv_g", "kv_only") else None
    if G_LM is not None:
        g = GCache.from_G_LM(cfg, G_LM, device=dev, dtype=dt)
    elif mode in ("kv_g", "g_only") and cfg.variant == "v510":
        g = GCache.allocate(cfg, batch, dev, dt)
    else:
        g = None
    return kv, g


def positions_needed(prompt_len: int, max_new_tokens: int) -> int:
    """Positions the model runs: the prompt and every new token but the last, which is
    sampled and never fed back."""
    return prompt_len + max(max_new_tokens - 1, 0)


def start(model: PLDRModel, rows: list[list[int]], cache: str, max_new_tokens: int,
          G_LM=None) -> GenerationState:
    """Left-pad checked prompt rows and allocate the caches of `cache` for the whole run."""
    seq = left_pad(rows, model.config.pad_id, model.device)
    kv, g = _caches(model, cache, len(rows), positions_needed(seq.shape[1], max_new_tokens), G_LM)
    return GenerationState(seq=seq, kv_cache=kv, g_cache=g)


def prefill(model: PLDRModel, state: GenerationState) -> Tensor:
    """Run the whole prompt once; returns the last position's logits [B, V]."""
    out = model(state.seq, kv_cache=state.kv_cache, g_cache=state.g_cache, logits_to_keep=1)
    return out.logits[:, -1]


def decode_step(model: PLDRModel, state: GenerationState, next_ids: Tensor) -> Tensor:
    """Append next_ids [B] and return the logits [B, V] for the token after them.

    With a KV-cache only the new token runs; otherwise the whole sequence is re-run (with the
    G-cache, if any, standing in for the metric learner)."""
    if state.kv_cache is not None:  # the cache holds the past: run the new token only
        ids = next_ids[:, None]
    else:
        state.seq = ids = torch.cat([state.seq, next_ids[:, None]], dim=1)
    out = model(ids, kv_cache=state.kv_cache, g_cache=state.g_cache, logits_to_keep=1)
    return out.logits[:, -1]


def _check_G_LM(model: PLDRModel, G_LM) -> None:
    """Shape-check a user-given G_LM before any work."""
    if G_LM is not None:
        GCache.from_G_LM(model.config, G_LM)


def stream(model: PLDRModel, prompts: Sequence[Sequence[int]] | Tensor, max_new_tokens: int, *,
           cache: str = "kv_g", temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
           G_LM=None, eos_id: int | None = None,
           seed: int | None = None) -> Iterator[list[int | None]]:
    """Yield, at every step, one new token per prompt (None for a prompt already finished).

    Same arguments as `generate`; all input is checked before any work."""
    if cache not in CACHE_MODES:
        raise PLDRError(f"unknown cache mode {cache!r}; choose one of {', '.join(CACHE_MODES)}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise PLDRError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    sampling = SamplingConfig(temperature, top_k, top_p)
    rows = prepare_prompts(prompts, model)
    eos = model.config.eos_id if eos_id is None else eos_id
    T = max(len(r) for r in rows)
    if positions_needed(T, max_new_tokens) > model.config.max_seq_len:
        raise PLDRError(f"the longest prompt ({T} tokens) plus max_new_tokens ({max_new_tokens}) "
                        f"exceeds max_seq_len={model.config.max_seq_len}; shorten one of them")
    _check_G_LM(model, G_LM)
    return _stream(model, rows, max_new_tokens, cache, sampling, G_LM, eos, seed)


@torch.inference_mode()
def _stream(model, rows, max_new_tokens, cache, sampling, G_LM, eos, seed):
    """The generation loop behind `stream` (input already checked); no autograd."""
    if max_new_tokens == 0:
        return
    B, dev = len(rows), model.device
    state = start(model, rows, cache, max_new_tokens, G_LM)
    generators = None
    if seed is not None and not sampling.greedy:
        generators = [torch.Generator(device=dev).manual_seed(seed) for _ in range(B)]
    done = [False] * B
    pad = model.config.pad_id
    logits = prefill(model, state)
    for step in range(max_new_tokens):
        tokens = sample(logits, sampling, generators).tolist()  # the one sync per step
        tokens = [pad if d else t for t, d in zip(tokens, done)]  # finished rows feed pads
        yield [None if d else t for t, d in zip(tokens, done)]
        done = [d or t == eos for t, d in zip(tokens, done)]
        if all(done) or step == max_new_tokens - 1:
            return
        logits = decode_step(model, state, torch.tensor(tokens, device=dev))


def generate(model: PLDRModel, prompts: Sequence[Sequence[int]] | Tensor, max_new_tokens: int, *,
             cache: str = "kv_g", temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             G_LM=None, eos_id: int | None = None, seed: int | None = None) -> list[list[int]]:
    """New token ids for each prompt, each list ending at the first `eos_id` (included) or
    after `max_new_tokens`.

    prompts: a list of id lists of any lengths, or a LongTensor [T] / [B, T] without padding.
    cache: "kv_g" | "kv_only" | "g_only" | "no_cache" (see the module docstring).
    temperature=0 or top_k=1 is greedy; seed makes sampling reproducible.
    G_LM: per-layer tensors (e.g. `load_G_LM(...)`) that replace the model's G_LM at every step.
    eos_id: None uses the config's eos_id; -1 never stops early."""
    steps = stream(model, prompts, max_new_tokens, cache=cache, temperature=temperature,
                   top_k=top_k, top_p=top_p, G_LM=G_LM, eos_id=eos_id, seed=seed)
    B = len(prompts) if not isinstance(prompts, Tensor) or prompts.dim() == 2 else 1
    out: list[list[int]] = [[] for _ in range(B)]
    for tokens in steps:
        for row, t in zip(out, tokens):
            if t is not None:
                row.append(t)
    return out
