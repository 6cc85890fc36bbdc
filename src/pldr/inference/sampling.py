"""Picking the next token: temperature, top-k and top-p (nucleus) filtering, greedy,
and per-row seeded sampling.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from ..errors import PLDRError

# The smallest non-zero temperature: float32's smallest normal number. Below it (subnormal)
# a division loses all precision; 0 means greedy.
MIN_TEMPERATURE = float(torch.finfo(torch.float32).tiny)
# The token id a row gets when its logits hold NaN or inf: never a vocabulary id, so the
# caller sees it after its one sync per step and raises `NonFiniteLogitsError`.
BAD_ROW = -1


class NonFiniteLogitsError(PLDRError):
    """The model produced NaN or inf logits: its weights or G_LM are not finite."""


NON_FINITE_MESSAGE = ("the model produced NaN or inf logits, so no token can be picked; its "
                      "weights or G_LM hold non-finite values: check the model with `pldr info` "
                      "and any `G_LM` file")


def check_tokens(tokens: Sequence[int]) -> None:
    """Raise if a sampled row came from non-finite logits (see `BAD_ROW`)."""
    if BAD_ROW in tokens:
        raise NonFiniteLogitsError(NON_FINITE_MESSAGE)


@dataclass(frozen=True)
class SamplingConfig:
    """How the next token is picked from the logits; greedy when temperature is 0 or top_k 1."""

    temperature: float = 1.0
    top_k: int = 0        # 0: no top-k filter
    top_p: float = 1.0    # 1: no nucleus filter

    def __post_init__(self) -> None:
        t = self.temperature
        if (isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t)
                or t < 0 or 0 < t < MIN_TEMPERATURE):
            raise PLDRError(f"temperature must be >= 0 (0 is greedy), finite, and not below "
                            f"{MIN_TEMPERATURE:g} when non-zero, got {t!r}", param="temperature")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise PLDRError(f"top_k must be an integer >= 0 (0 disables it), got {self.top_k!r}",
                            param="top_k")
        p = self.top_p
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1:
            raise PLDRError(f"top_p must lie in (0, 1] (1 disables it), got {p!r}", param="top_p")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


GREEDY = SamplingConfig(temperature=0.0)


def filter_logits(logits: Tensor, sampling: SamplingConfig) -> Tensor:
    """Apply temperature, then top-k, then top-p to logits [B, V]; removed tokens get -inf.

    Top-p keeps the smallest set of most likely tokens whose probability reaches p; the most
    likely token is always kept, so the set is never empty (even for a top_p that rounds to
    0 in float32). Finite logits give finite filtered logits with the best one at 0: the max
    is subtracted before dividing, so a small temperature cannot overflow."""
    logits = logits.float()
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / sampling.temperature
    V = logits.shape[-1]
    if 0 < sampling.top_k < V:
        kth = torch.topk(logits, sampling.top_k, dim=-1).values[..., -1:]  # [B, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs  # probability of the better tokens
        drop_sorted = before >= sampling.top_p
        drop_sorted[..., 0] = False  # the best token stays
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample(logits: Tensor, sampling: SamplingConfig,
           generators: Sequence[torch.Generator] | None = None) -> Tensor:
    """Next token per row from logits [B, V] -> [B]. With `generators` (one per row) each
    row draws from its own seeded stream, so a row samples the same alone or in a batch."""
    bad = ~torch.isfinite(logits).all(dim=-1)  # [B]
    if sampling.greedy:
        tokens = logits.argmax(dim=-1)
    else:
        probs = _probs(logits, bad, sampling)
        if generators is None:
            tokens = torch.multinomial(probs, 1).squeeze(-1)
        else:
            tokens = torch.cat([torch.multinomial(p, 1, generator=g)
                                for p, g in zip(probs, generators)])
    return tokens.masked_fill(bad, BAD_ROW)


def _probs(logits: Tensor, bad: Tensor, sampling: SamplingConfig) -> Tensor:
    """The sampling distribution [B, V]; a row of non-finite logits (`bad`, [B]) is
    replaced by zeros first so that multinomial always gets a valid distribution (its draw
    is then masked out as `BAD_ROW`), with no host-device sync."""
    logits = logits.masked_fill(bad[:, None], 0.0)
    return filter_logits(logits, sampling).softmax(dim=-1)


def sample_row(logits: Tensor, sampling: SamplingConfig,
               generator: torch.Generator | None = None) -> Tensor:
    """The next token of one row from logits [V] -> a 0-d tensor on the logits' device (no
    sync). Draws exactly as `sample` does for that row, so a request samples the same alone,
    in a static batch or in the engine."""
    bad = ~torch.isfinite(logits).all(dim=-1)  # 0-d
    if sampling.greedy:
        tok = logits.argmax(dim=-1)
    else:
        probs = _probs(logits[None], bad[None], sampling)[0]
        tok = torch.multinomial(probs, 1, generator=generator)[0]
    return tok.masked_fill(bad, BAD_ROW)


def seeds_for(seed: int | Sequence[int] | None, count: int) -> list[int | None]:
    """One seed per prompt: an int seeds every prompt's stream alike, a list gives each its
    own, None leaves sampling to torch's global generator."""
    if seed is None or (isinstance(seed, int) and not isinstance(seed, bool)):
        check_seed(seed)
        return [seed] * count
    if not isinstance(seed, (list, tuple)) or not all(
            isinstance(s, int) and not isinstance(s, bool) for s in seed):
        raise PLDRError(f"seed must be an int or a list of ints (one per prompt), got {seed!r}",
                        param="seed")
    for s in seed:
        check_seed(s)
    if len(seed) != count:
        raise PLDRError(f"seed has {len(seed)} values for {count} prompts; give one per prompt "
                        "or a single int", param="seed")
    return list(seed)


SEED_LIMIT = 2 ** 63  # torch.Generator.manual_seed takes a 64-bit integer


def check_seed(seed) -> None:
    """A seed is None or an int in [0, 2**63); anything else is refused before any work
    (torch would fail deep inside with "Overflow when unpacking long long")."""
    if seed is None:
        return
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise PLDRError(f"seed must be an integer, got {seed!r}", param="seed")
    if not 0 <= seed < SEED_LIMIT:
        raise PLDRError(f"seed must lie in [0, 2**63), got {seed}; pick a smaller seed",
                        param="seed")
