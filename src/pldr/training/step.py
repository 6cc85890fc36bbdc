"""The arithmetic of one training step, shared by `pldr train` (trainer.py) and
`pldr bench --what train`, so the benchmark times the code that trains.

    optimizer = make_optimizer(model, lr, weight_decay)       AdamW, fused kernel where it runs
    lo, predicted = forward_backward(model, ids, ...)         per forward: loss, then backward
    norm = gradient_norm_sq(model.parameters())              foreach, a tensor: no sync
    update(model, optimizer, lr, found_inf)                   clip by value, AdamW step (skipped
                                                              on the device when found_inf is 1)

The trainer adds what a run needs around these (gradient sync, the global loss weights,
the non-finite checks, metrics); the benchmark calls them in the same order on one batch.
Nothing here reads a value back to the host: on a GPU a step queues its kernels and runs
ahead of them, and the trainer reads the step's figures only when it logs or checkpoints.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Callable, Iterable, Sequence

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
                     amp_dtype: torch.dtype | None = None, pads: bool | None = None,
                     forward: Callable[..., Any] | None = None) -> tuple[LossOutput, Tensor]:
    """Forward on ids[:, :-1] of a batch [b, T+1], the masked loss on ids[:, 1:], and the
    backward of `ce * ce_weight + (loss - ce) * dag_weight` (the trainer's weights make
    accumulated gradients equal those of the whole global batch; 1 and 1: the plain loss).

    `with_deductive` computes the deductive outputs (and so the DAG values) even where no DAG
    term is in the loss, for logging. Returns the loss parts and the predicted ids [b, T]
    (the logits' argmax, for the accuracy): nothing here holds the logits [b, T, V] through
    the backward, so they are freed as soon as the loss's backward has run.

    `ce_weight` may be a 0-d tensor (the trainer's, computed on the device). `pads` is what
    the caller knows of the ids (see `PLDRModel.forward`): given, the forward reads no value
    back. `forward` replaces `model(...)` for the call (a torch.compile'd model)."""
    x, y = ids[:, :-1], ids[:, 1:]                                      # [b, T] each
    autocast = (nullcontext() if amp_dtype is None
                else torch.autocast(device_type=ids.device.type, dtype=amp_dtype))
    known = {} if pads is None else {"pads": pads}
    with autocast:
        call = model if forward is None else forward  # (a compiled module has no truth value)
        out = call(x, return_deductive=with_deductive or any(dag_coeffs), **known)  # [b, T, V]
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


def gradient_norm_sq(params: Iterable[Tensor]) -> Tensor:
    """The sum of squares of the gradients (this process's shards under FSDP) as a float64
    0-d tensor on their device: one foreach norm per tensor, no host-device sync. Its sum
    over processes is the squared global gradient norm; it is NaN or inf exactly when some
    gradient entry is (a norm of finite float32 entries below ~1e19 cannot overflow)."""
    grads = [_local(p.grad) for p in params if p.grad is not None]
    if not grads:
        return torch.zeros((), dtype=torch.float64)
    norms = torch._foreach_norm(grads)                                  # one 0-d per tensor
    return torch.stack(norms).double().square().sum()


def update(model: nn.Module, optimizer: torch.optim.Optimizer, lr: float,
           found_inf: Tensor | None = None) -> None:
    """Clip the gradients, take the AdamW step at `lr` and drop the gradients.

    `found_inf` (a float32 0-d tensor on the parameters' device, 1.0 or 0.0) skips the
    update on the device when it is 1: the fused AdamW kernel leaves weights, moments and
    its step count as they were, as under torch's GradScaler; nothing is read back. A
    non-fused optimizer cannot skip on the device, so there the flag is read (one sync)."""
    clip_gradients(model.parameters())
    for group in optimizer.param_groups:
        group["lr"] = lr
    if found_inf is None:
        optimizer.step()
    elif optimizer.defaults.get("fused"):
        optimizer.found_inf = found_inf.to(torch.float32)  # AdamW.step reads this attribute
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf
    elif not bool(found_inf):
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _local(t: Tensor) -> Tensor:
    """This rank's part of a tensor (a DTensor shard under FSDP, else the tensor)."""
    return t.to_local() if hasattr(t, "to_local") else t


__all__ = ["ADAMW_BETAS", "ADAMW_EPS", "CLIP_VALUE", "make_optimizer", "forward_backward",
           "clip_gradients", "gradient_norm_sq", "update"]
