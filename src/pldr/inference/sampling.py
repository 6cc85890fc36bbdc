"""Picking the next token: temperature, top-k and top-p (nucleus) filtering, greedy,
and per-row seeded sampling.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from ..errors import PLDRError


@dataclass(frozen=True)
class SamplingConfig:
    """How the next token is picked from the logits; greedy when temperature is 0 or top_k 1."""

    temperature: float = 1.0
    top_k: int = 0        # 0: no top-k filter
    top_p: float = 1.0    # 1: no nucleus filter

    def __post_init__(self) -> None:
        if not isinstance(self.temperature, (int, float)) or self.temperature < 0:
            raise PLDRError(f"temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise PLDRError(f"top_k must be an integer >= 0 (0 disables it), got {self.top_k}")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise PLDRError(f"top_p must lie in (0, 1] (1 disables it), got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


def filter_logits(logits: Tensor, sampling: SamplingConfig) -> Tensor:
    """Apply temperature, then top-k, then top-p to logits [B, V]; removed tokens get -inf.

    Top-p keeps the smallest set of most likely tokens whose probability reaches p; the most
    likely token is always kept, so the set is never empty."""
    logits = logits.float() / sampling.temperature
    V = logits.shape[-1]
    if 0 < sampling.top_k < V:
        kth = torch.topk(logits, sampling.top_k, dim=-1).values[..., -1:]  # [B, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs  # probability of the better tokens
        drop_sorted = before >= sampling.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample(logits: Tensor, sampling: SamplingConfig,
           generators: Sequence[torch.Generator] | None = None) -> Tensor:
    """Next token per row from logits [B, V] -> [B]. With `generators` (one per row) each
    row draws from its own seeded stream, so a row samples the same alone or in a batch."""
    if sampling.greedy:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits, sampling).softmax(dim=-1)
    if generators is None:
        return torch.multinomial(probs, 1).squeeze(-1)
    return torch.cat([torch.multinomial(p, 1, generator=g) for p, g in zip(probs, generators)])


def sample_row(logits: Tensor, sampling: SamplingConfig,
               generator: torch.Generator | None = None) -> Tensor:
    """The next token of one row from logits [V] -> a 0-d tensor on the logits' device (no
    sync). Draws exactly as `sample` does for that row, so a request samples the same alone,
    in a static batch or in the engine."""
    if sampling.greedy:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits[None], sampling).softmax(dim=-1)[0]
    return torch.multinomial(probs, 1, generator=generator)[0]


def seeds_for(seed: int | Sequence[int] | None, count: int) -> list[int | None]:
    """One seed per prompt: an int seeds every prompt's stream alike, a list gives each its
    own, None leaves sampling to torch's global generator."""
    if seed is None or (isinstance(seed, int) and not isinstance(seed, bool)):
        return [seed] * count
    if not isinstance(seed, (list, tuple)) or not all(
            isinstance(s, int) and not isinstance(s, bool) for s in seed):
        raise PLDRError(f"seed must be an int or a list of ints (one per prompt), got {seed!r}")
    if len(seed) != count:
        raise PLDRError(f"seed has {len(seed)} values for {count} prompts; give one per prompt "
                        "or a single int")
    return list(seed)
