"""`StepStats`: the sums a training step or an evaluation collects over its batches, packed
into one float64 tensor so that a single all-reduce sums them over processes."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .distributed import DistInfo, all_reduce_sum
from .metrics import DAG_KEYS


@dataclass
class StepStats:
    """Sums over batches on this process (0-d float64 tensors while collecting, so adding a
    batch needs no device sync; floats after `all_reduce`)."""

    ce_sum: Any = 0.0       # sum over non-pad targets of the cross-entropy
    tokens: Any = 0.0       # non-pad targets
    hits: Any = 0.0         # targets whose argmax prediction is right
    dag_A: Any = 0.0        # sums of the batches' DAG values (A_LM, A_P, G_LM)
    dag_Ap: Any = 0.0
    dag_G: Any = 0.0
    dag_batches: Any = 0.0  # batches that computed DAG values
    stop: Any = 0.0         # > 0 when some process was asked to stop (SIGINT / SIGTERM)

    @torch.no_grad()
    def add_batch(self, lo: Any, predicted: Tensor, y: Tensor, n_targets: int, pad: int) -> None:
        """Add one batch: `lo` is its `loss_with_dag` output, predicted the argmax ids [b, T]
        of its logits (taken before backward, so the logits need not outlive the loss),
        targets y [b, T] of which `n_targets` are not `pad` (counted by the caller, before the
        copy to the device)."""
        self.ce_sum = self.ce_sum + lo.ce.double() * n_targets
        self.tokens = self.tokens + n_targets
        self.hits = self.hits + ((predicted == y) & (y != pad)).sum().double()
        if lo.dag:
            for key, name in DAG_KEYS:
                setattr(self, name, getattr(self, name) + lo.dag[key].double())
            self.dag_batches = self.dag_batches + 1

    def pack(self, device: torch.device) -> Tensor:
        """The fields in declaration order as one float64 tensor [8] on `device`."""
        return torch.stack([torch.as_tensor(getattr(self, f.name), dtype=torch.float64,
                                            device=device).reshape(())
                            for f in dataclasses.fields(self)])

    @classmethod
    def unpack(cls, packed: Tensor) -> "StepStats":
        """The inverse of `pack`, with plain floats."""
        return cls(*packed.tolist())

    def all_reduce(self, dist: DistInfo) -> "StepStats":
        """The sums over all processes (one all-reduce of `pack()`), as floats."""
        return StepStats.unpack(all_reduce_sum(self.pack(dist.device), dist))

    def figures(self, dag_coeffs: tuple[float, float, float]) -> dict[str, Any]:
        """Loss, CE, accuracy and the mean DAG values (None when none were computed); the
        loss adds c * DAG value for each nonzero coefficient."""
        n = max(float(self.tokens), 1.0)
        ce, accuracy = float(self.ce_sum) / n, float(self.hits) / n
        count = float(self.dag_batches)
        dag = {name: (float(getattr(self, name)) / count if count else None)
               for _, name in DAG_KEYS}
        loss = ce + sum(c * dag[name] for c, (_, name) in zip(dag_coeffs, DAG_KEYS)
                        if c and dag[name] is not None)
        return {"loss": loss, "ce": ce, "accuracy": accuracy, **dag}


__all__ = ["StepStats"]
