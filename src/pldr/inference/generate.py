"""Text generation with the original's four cache modes, batched and streaming.

Generation is a few plain functions (as in gpt-fast) over one `InferenceCache`:

    prepare_prompts  check the prompts (the API edge: nothing later checks values)
    start            left-pad the prompts into ids [B, T] and allocate the cache
    prefill          run the prompt once, fixing each row's A and G_LM
    decode_step      feed the last sampled token(s) of every row
    sample           temperature, top-k and top-p (nucleus) sampling, or greedy

The four modes differ only in the cache given to the one model forward:

    kv_g      KV + kept G_LM    A and G_LM fixed by the prompt; nothing of the power-law
                                network runs after the prefill
    kv_only   KV                A fixed by the prompt; G_LM recomputed from it each step
    g_only    kept G_LM         the whole sequence re-run each step, G_LM fixed by the prompt
    no_cache  none              the whole sequence re-run, A and G_LM recomputed each step

A given `G_LM` is set on the cache for every row in every mode, and wins over what the model
would use (v510: its metric learner; v510G: its buffer). `generate` and `stream` run the KV
modes through the `Engine` (each prompt prefilled alone, then one static-shape decode call
per step, compiled with `compile=True`), and the re-run modes through `start`/`prefill`/
`decode_step` on a left-padded batch, where pads never enter A and are never attended to, and
positions count from each row's first real token: a prompt gives the same tokens alone or in
a batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch import Tensor

from ..errors import PLDRError
from ..model.cache import CACHE_MODES, GivenG, InferenceCache
from ..model.model import PLDRModel
from .checks import check_eos_id, check_max_new_tokens, positions_needed, prepare_prompts
from .engine import Engine, decode_cached
from .sampling import SamplingConfig, check_tokens, sample, seeds_for

COMPILE_LEN_STEP = 64  # compile=True: cache lengths are rounded up to a multiple of this

__all__ = ["CACHE_MODES", "generate", "stream", "start", "prefill", "decode_step",
           "prepare_prompts", "positions_needed", "GenerationState"]


def left_pad(rows: list[list[int]], pad_id: int, device: torch.device) -> Tensor:
    """Rows of different lengths as one LongTensor [B, T], pads on the left."""
    T = max(len(r) for r in rows)
    return torch.tensor([[pad_id] * (T - len(r)) + r for r in rows], dtype=torch.long,
                        device=device)


@dataclass
class GenerationState:
    """What the loop carries between steps for one batch."""

    seq: Tensor               # [B, T (+ steps so far without a KV part)] ids, left padded
    cache: InferenceCache
    mode: str


def start(model: PLDRModel, rows: list[list[int]], cache: str, max_new_tokens: int,
          G_LM=None) -> GenerationState:
    """Left-pad checked prompt rows and allocate the cache of mode `cache` for the whole run
    (a given G_LM set for every row)."""
    seq = left_pad(rows, model.config.pad_id, model.device)
    ic = InferenceCache.for_mode(model.config, cache, len(rows),
                                 positions_needed(seq.shape[1], max_new_tokens),
                                 model.device, model.dtype)
    if G_LM is not None:
        ic.set_G_LM(G_LM)
    return GenerationState(seq=seq, cache=ic, mode=cache)


def prefill(model: PLDRModel, state: GenerationState, pads: bool | None = None) -> Tensor:
    """Run the whole prompt once; returns the last position's logits [B, V]. `pads`: whether
    the checked ids hold pad ids, when the caller knows (no value is then read back; see
    `PLDRModel.forward`)."""
    out = model(state.seq, cache=state.cache, logits_to_keep=1, **_known(pads))
    return out.logits[:, -1]


def decode_step(model: PLDRModel, state: GenerationState, next_ids: Tensor,
                pads: bool | None = None) -> Tensor:
    """Append next_ids [B] and return the logits [B, V] for the token after them.

    With a KV part only the new token runs; otherwise the whole sequence is re-run (with the
    kept G_LM, if any, standing in for the metric learner); `pads` as in `prefill`, for the
    sequence with next_ids appended."""
    if state.cache.has_kv:
        return decode_cached(model, state.cache, next_ids)
    state.seq = torch.cat([state.seq, next_ids[:, None]], dim=1)
    return model(state.seq, cache=state.cache, logits_to_keep=1,
                 **_known(pads)).logits[:, -1]


def _known(pads: bool | None) -> dict:
    return {} if pads is None else {"pads": pads}


def stream(model: PLDRModel, prompts: Sequence[Sequence[int]] | Tensor, max_new_tokens: int, *,
           cache: str = "kv_g", temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
           G_LM=None, eos_id: int | None = None, seed: int | Sequence[int] | None = None,
           compile: bool = False) -> Iterator[list[int | None]]:
    """Yield, at every step, one new token per prompt (None for a prompt already finished).

    Same arguments as `generate`; all input is checked before any work."""
    if cache not in CACHE_MODES:
        raise PLDRError(f"unknown cache mode {cache!r}; choose one of {', '.join(CACHE_MODES)}")
    check_max_new_tokens(max_new_tokens)
    sampling = SamplingConfig(temperature, top_k, top_p)
    rows = prepare_prompts(prompts, model)
    seeds = seeds_for(seed, len(rows))
    eos = check_eos_id(eos_id, model)
    T = max(len(r) for r in rows)
    if positions_needed(T, max_new_tokens) > model.config.max_seq_len:
        raise PLDRError(f"the longest prompt ({T} tokens) plus max_new_tokens ({max_new_tokens}) "
                        f"exceeds max_seq_len={model.config.max_seq_len}; shorten one of them")
    G_LM = None if G_LM is None else GivenG.check(G_LM, model.config)  # the run's one check
    if compile and cache not in ("kv_g", "kv_only"):
        raise PLDRError(f"compile=True needs a KV-cache mode (kv_g or kv_only), not {cache!r}: "
                        "the other modes re-run a growing sequence")
    if cache in ("kv_g", "kv_only"):
        return _stream_engine(model, rows, max_new_tokens, cache, sampling, G_LM, eos, seeds,
                              compile)
    return _stream(model, rows, max_new_tokens, cache, sampling, G_LM, eos, seeds)


def _stream_engine(model, rows, max_new_tokens, cache, sampling, G_LM, eos, seeds, compile):
    """The KV modes: every prompt a request of one engine with a slot each."""
    if max_new_tokens == 0:
        return
    T = max(len(r) for r in rows)
    max_len = positions_needed(T, max_new_tokens)
    if compile:  # a compiled step has static shapes: round the length so runs share one
        max_len = min(-(-max_len // COMPILE_LEN_STEP) * COMPILE_LEN_STEP, model.config.max_seq_len)
    engine = Engine(model, max_batch=len(rows), max_len=max_len, cache=cache, compile=compile)
    reqs = [engine.submit(r, max_new_tokens, temperature=sampling.temperature,
                          top_k=sampling.top_k, top_p=sampling.top_p, seed=s, eos_id=eos,
                          G_LM=G_LM) for r, s in zip(rows, seeds)]
    while engine.has_work:
        before = [len(r.tokens) for r in reqs]
        engine.step()
        failed = next((r.error for r in reqs if r.error is not None), None)
        if failed is not None:  # a static batch fails as a whole, as the re-run modes do
            raise failed
        yield [r.tokens[-1] if len(r.tokens) > n else None for r, n in zip(reqs, before)]


@torch.inference_mode()
def _stream(model, rows, max_new_tokens, cache, sampling, G_LM, eos, seeds):
    """The re-run modes (g_only, no_cache) on a left-padded batch (input already checked)."""
    if max_new_tokens == 0:
        return
    B, dev = len(rows), model.device
    state = start(model, rows, cache, max_new_tokens, G_LM)
    generators = None
    if any(s is not None for s in seeds) and not sampling.greedy:
        generators = [None if s is None else torch.Generator(device=dev).manual_seed(s)
                      for s in seeds]
    done = [False] * B
    pad = model.config.pad_id
    # whether the sequence holds pad ids, known on the host (left padding, pad ids in a
    # prompt, finished rows fed pads), so that the re-run forwards read no value back
    pads = len({len(r) for r in rows}) > 1 or any(pad in r for r in rows)
    logits = prefill(model, state, pads)
    for step in range(max_new_tokens):
        tokens = sample(logits, sampling, generators).tolist()  # the one sync per step
        check_tokens(tokens)
        tokens = [pad if d else t for t, d in zip(tokens, done)]  # finished rows feed pads
        yield [None if d else t for t, d in zip(tokens, done)]
        done = [d or t == eos for t, d in zip(tokens, done)]
        if all(done) or step == max_new_tokens - 1:
            return
        pads = pads or pad in tokens
        logits = decode_step(model, state, torch.tensor(tokens, device=dev), pads)


def generate(model: PLDRModel, prompts: Sequence[Sequence[int]] | Tensor, max_new_tokens: int, *,
             cache: str = "kv_g", temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             G_LM=None, eos_id: int | None = None, seed: int | Sequence[int] | None = None,
             compile: bool = False) -> list[list[int]]:
    """New token ids for each prompt, each list ending at the first `eos_id` (included) or
    after `max_new_tokens`.

    prompts: a list of id lists of any lengths, or a LongTensor [T] / [B, T] without padding.
    cache: "kv_g" | "kv_only" | "g_only" | "no_cache" (see the module docstring).
    temperature=0 or top_k=1 is greedy; seed (an int for every prompt alike, or one per
    prompt) makes sampling reproducible.
    G_LM: per-layer tensors (e.g. `load_G_LM(...)`) that replace the model's G_LM at every
    step, on v510 and v510G models alike.
    eos_id: None uses the config's eos_id; -1 never stops early.
    compile: run the decode step under torch.compile (KV modes; same tokens as eager)."""
    steps = stream(model, prompts, max_new_tokens, cache=cache, temperature=temperature,
                   top_k=top_k, top_p=top_p, G_LM=G_LM, eos_id=eos_id, seed=seed,
                   compile=compile)
    B = len(prompts) if not isinstance(prompts, Tensor) or prompts.dim() == 2 else 1
    out: list[list[int]] = [[] for _ in range(B)]
    for tokens in steps:
        for row, t in zip(out, tokens):
            if t is not None:
                row.append(t)
    return out
