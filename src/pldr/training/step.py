"""The arithmetic of one training step, shared by `pldr train` (trainer.py) and
`pldr bench --what train`, so the benchmark times the code that trains.

    optimizer = make_optimizer(model, lr, weight_decay)       AdamW, fused kernel where it runs
    lo, predicted = forward_backward(model, ids, ...)         per forward: loss, then backward
    update(model, optimizer, lr)                              clip by value, AdamW step, zero grads

The trainer adds what a run needs around these (gradient sync, the global loss weights,
NaN checks, metrics); the benchmark calls them in the same order on one batch.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Iterable, Sequence

import torch
from torch import Tensor, nn

from ..model.losses import LossOutput, loss_with_dag

ADAMW_BETAS = (0.9, 0.95)
ADAMW_EPS = 1e-5
CLIP_VALUE = 1.0
FUSED_ADAMW_DEVICES = ("cpu", "cuda")


def make_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """The original's AdamW (betas 0.9/0.95, eps 1e-5) over the model's parameters.

    It runs the fused AdamW kernel when every parameter is a floating-point tensor on a
    device that has it: the same update as the per-tensor loop (within float rounding, ~1e-7
    relative) in one pass over each tensor instead of about ten, which on CPU makes the
    optimizer step several times faster (docs/benchmarks.md, "Training step")."""
    params = list(model.parameters())
    fused = bool(params) and all(p.device.type in FUSED_ADAMW_DEVICES and p.is_floating_point()
                                 for p in params)
    return torch.optim.AdamW(params, lr=lr, betas=ADAMW_BETAS, eps=ADAMW_EPS,
                             weight_decay=weight_decay, fused=fused or None)


def forward_backward(model: nn.Module, ids: Tensor, *, pad_id: int,
                     dag_coeffs: Sequence[float] = (0.0, 0.0, 0.0), ce_weight: float = 1.0,
                     dag_weight: float = 1.0, with_deductive: bool = False,
                     amp_dtype: torch.dtype | None = None) -> tuple[LossOutput, Tensor]:
    """Forward on ids[:, :-1] of a batch [b, T+1], the masked loss on ids[:, 1:], and the
    backward of `ce * ce_weight + (loss - ce) * dag_weight` (the trainer's weights make
    accumulated gradients equal those of the whole global batch; 1 and 1: the plain loss).

    `with_deductive` computes the deductive outputs (and so the DAG values) even where no DAG
    term is in the loss, for logging. Returns the loss parts and the predicted ids [b, T]
    (the logits' argmax, for the accuracy): nothing here holds the logits [b, T, V] through
    the backward, so they are freed as soon as the loss's backward has run."""
    x, y = ids[:, :-1], ids[:, 1:]                                      # [b, T] each
    autocast = (nullcontext() if amp_dtype is None
                else torch.autocast(device_type=ids.device.type, dtype=amp_dtype))
    with autocast:
        out = model(x, return_deductive=with_deductive or any(dag_coeffs))  # logits [b, T, V]
    lo = loss_with_dag(out.logits, y, out.deductive, dag_coeffs, pad_id)
    predicted = out.logits.detach().argmax(-1)                          # [b, T]
    del out
    (lo.ce * ce_weight + (lo.loss - lo.ce) * dag_weight).backward()
    return lo, predicted


def clip_gradients(params: Iterable[Tensor]) -> None:
    """Clip every gradient entry to [-1, 1], as the original (`clip_grad_value_(1.0)`). On
    CPU the per-tensor loop (measured faster there than the foreach kernels: 0.09 s against
    0.17 s for the 110M model), elsewhere torch's default (foreach on GPUs)."""
    params = [p for p in params if p.grad is not None]
    if not params:
        return
    on_cpu = all(p.device.type == "cpu" for p in params)
    torch.nn.utils.clip_grad_value_(params, CLIP_VALUE, foreach=False if on_cpu else None)


def update(model: nn.Module, optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Clip the gradients, take the AdamW step at `lr` and drop the gradients."""
    clip_gradients(model.parameters())
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


__all__ = ["ADAMW_BETAS", "ADAMW_EPS", "CLIP_VALUE", "make_optimizer", "forward_backward",
           "clip_gradients", "update"]
