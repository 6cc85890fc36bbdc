"""Input checks of the generation API, made once at its edge (`generate`, `stream`,
`Engine.submit`) so that no forward of a decode step has to check (or sync) anything."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from ..errors import PLDRError, PLDRTypeError
from ..model.model import PLDRModel


def prepare_prompts(prompts: Sequence[Sequence[int]] | Tensor, model: PLDRModel) -> list[list[int]]:
    """Check prompts (a list of id lists, or a LongTensor [T] / [B, T] without padding) and
    return them as lists of ints."""
    if isinstance(prompts, Tensor):
        if prompts.is_floating_point() or prompts.dtype == torch.bool:
            raise PLDRTypeError(f"prompt ids must be integers, got dtype {prompts.dtype}",
                                param="prompts")
        if prompts.dim() not in (1, 2):
            raise PLDRError(f"a prompt tensor must be [T] or [B, T], got {list(prompts.shape)}",
                            param="prompts")
        prompts = (prompts[None] if prompts.dim() == 1 else prompts).tolist()
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise PLDRError("prompts must be a non-empty list of token-id lists", param="prompts")
    if all(isinstance(t, int) and not isinstance(t, bool) for t in prompts):
        raise PLDRError("prompts must be a list of id lists; wrap a single prompt as [ids]",
                        param="prompts")
    V, pad = model.config.vocab_size, model.config.pad_id
    rows = []
    for i, p in enumerate(prompts):
        if isinstance(p, Tensor):
            p = p.tolist()
        if not isinstance(p, (list, tuple)) or not all(
                isinstance(t, int) and not isinstance(t, bool) for t in p):
            raise PLDRTypeError(f"prompt {i} must be a list of integer token ids", param="prompts")
        if not p:
            raise PLDRError(f"prompt {i} is empty; give at least one token", param="prompts")
        bad = [t for t in p if not 0 <= t < V]
        if bad:
            raise PLDRError(f"prompt {i} has token id {bad[0]} outside the vocabulary [0, {V}); "
                            "check that the tokenizer matches the model", param="prompts")
        if pad in p:
            raise PLDRError(f"prompt {i} contains the pad id {pad}, which the model ignores; "
                            "remove it", param="prompts")
        rows.append(list(p))
    return rows


def positions_needed(prompt_len: int, max_new_tokens: int) -> int:
    """Positions the model runs: the prompt and every new token but the last, which is
    sampled and never fed back."""
    return prompt_len + max(max_new_tokens - 1, 0)


def check_max_new_tokens(max_new_tokens) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise PLDRError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}",
                        param="max_new_tokens")


MAX_LOGPROBS = 20  # the most likely ids a request may ask for per position (vLLM's default)


def check_logprobs(name: str, k) -> None:
    """`logprobs` / `prompt_logprobs`: None or an int in [0, MAX_LOGPROBS]."""
    if k is not None and (isinstance(k, bool) or not isinstance(k, int)
                          or not 0 <= k <= MAX_LOGPROBS):
        raise PLDRError(f"{name} must be None or an integer in [0, {MAX_LOGPROBS}], got {k!r}",
                        param=name)


def check_eos_id(eos_id, model: PLDRModel) -> int:
    """The stop token: None uses the config's, -1 never stops, else an id in the vocabulary
    (one outside it could never be sampled, so generation would silently run to the end)."""
    if eos_id is None:
        return model.config.eos_id
    V = model.config.vocab_size
    if isinstance(eos_id, bool) or not isinstance(eos_id, int):
        raise PLDRError(f"eos_id must be an integer token id, got {eos_id!r}", param="eos_id")
    if eos_id != -1 and not 0 <= eos_id < V:
        raise PLDRError(f"eos_id {eos_id} is outside the vocabulary [0, {V}); give an id below "
                        f"{V}, or -1 to never stop early", param="eos_id")
    return eos_id
