"""Running a model on inputs to collect its deductive outputs: once uncached (the full
forward) and once through the generation caches, so the two can be compared.

`cached_deductive` is the one place that drives the caches; it is built on the generation
loop's own functions, so the check follows whatever the loop does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from ..errors import PLDRError
from ..inference.generate import prefill, prepare_prompts, start
from ..model.model import Deductive, PLDRModel

KINDS = ("A", "A_LM", "A_P", "G_LM")  # the deductive outputs, in the order they are computed
CACHED_MODES = ("kv_g", "kv_only", "g_only")  # the modes that reuse what the prompt computed


@dataclass(frozen=True)
class InputDeductive:
    """One input's deductive outputs, each [L, H, dk, dk] (None where the variant has none),
    and the largest difference the caches make, [L, H]."""

    label: str
    ids: list[int]
    A: Tensor | None
    A_LM: Tensor | None
    A_P: Tensor | None
    G_LM: Tensor
    cache_diff: Tensor  # [L, H] max |cached - uncached| over kinds, entries and CACHED_MODES

    def kinds(self) -> dict[str, Tensor]:
        """The deductive outputs this input has, by name, in KINDS order."""
        return {k: getattr(self, k) for k in KINDS if getattr(self, k) is not None}


def check_inputs(model: PLDRModel, inputs: Sequence[Sequence[int]]) -> list[list[int]]:
    """Inputs as id lists, checked as prompts are (vocabulary, pads, emptiness), with room
    for the one cached step the cache check runs."""
    rows = prepare_prompts(list(inputs), model)
    limit = model.config.max_seq_len - 1
    for i, r in enumerate(rows):
        if len(r) > limit:
            raise PLDRError(f"input {i} has {len(r)} tokens; inspect takes at most {limit} "
                            "(max_seq_len - 1: the cache check feeds one more token); shorten it")
    return rows


@torch.inference_mode()
def uncached_deductive(model: PLDRModel, ids: Sequence[int]) -> Deductive:
    """The deductive outputs of one full forward over ids, each [L, 1, H, dk, dk]."""
    x = torch.tensor([list(ids)], dtype=torch.long, device=model.device)
    return model(x, return_deductive=True, logits_to_keep=1).deductive


@torch.inference_mode()
def cached_deductive(model: PLDRModel, ids: Sequence[int], cache: str = "kv_g") -> Deductive:
    """The deductive outputs that a cached decode step uses after `ids` was the prompt.

    The prompt is prefilled with the caches of `cache` (as `pldr.generate` does), then one
    greedy token is fed with `return_deductive=True`. Every cached mode keeps what the prompt
    fixed (A; and in kv_g / g_only also A_LM, A_P, G_LM), so in exact arithmetic this equals
    `uncached_deductive(model, ids)`: the paper's check that caching changes nothing."""
    state = start(model, [list(ids)], cache, max_new_tokens=2)
    next_ids = prefill(model, state).argmax(dim=-1)                   # [1]
    if state.cache.has_kv:   # the cache holds the prompt: feed the new token only
        step = next_ids[:, None]
    else:                    # no KV part: the whole sequence runs again
        step = torch.cat([state.seq, next_ids[:, None]], dim=1)
    out = model(step, cache=state.cache, return_deductive=True, logits_to_keep=1)
    return out.deductive


def max_abs_diff(a: Deductive, b: Deductive) -> Tensor:
    """Largest |a - b| per layer and head, [L, H], over every kind both have."""
    worst = None
    for kind in KINDS:
        x, y = getattr(a, kind), getattr(b, kind)
        if x is None or y is None:
            continue
        d = (x.double() - y.double()).abs().amax(dim=(1, 3, 4))      # [L, H]
        worst = d if worst is None else torch.maximum(worst, d)
    return worst


def collect(model: PLDRModel, inputs: Sequence[Sequence[int]],
            labels: Sequence[str] | None = None) -> list[InputDeductive]:
    """Each input's deductive outputs (float64 on the CPU) and its cache difference."""
    rows = check_inputs(model, inputs)
    labels = list(labels) if labels is not None else [f"input {i}" for i in range(len(rows))]
    if len(labels) != len(rows):
        raise PLDRError(f"{len(labels)} labels for {len(rows)} inputs; give one label per input")
    out = []
    for label, ids in zip(labels, rows):
        full = uncached_deductive(model, ids)
        diff = torch.stack([max_abs_diff(cached_deductive(model, ids, m), full)
                            for m in CACHED_MODES]).amax(dim=0)         # [L, H]
        cpu = lambda t: None if t is None else t[:, 0].detach().double().cpu()  # noqa: E731
        out.append(InputDeductive(label, list(ids), cpu(full.A), cpu(full.A_LM), cpu(full.A_P),
                                  cpu(full.G_LM), diff.cpu()))
    return out
