"""Losses and metrics of the original, and the DAG regulariser of the deductive outputs.

Tensors in, tensors out: nothing here imports the model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor

from ..errors import PLDRError


class _CrossEntropyRows(torch.autograd.Function):
    """Per-row cross-entropy of logits [N, V] against targets [N] that keeps no [N, V] tensor
    of its own: the forward saves the logits (which the caller holds anyway) and the row
    log-sum-exps [N]; the backward builds softmax - one_hot in a single [N, V] buffer.
    F.cross_entropy keeps log_softmax [N, V] and its backward makes two more [N, V] tensors
    (the one-hot gradient and the softmax gradient): with a 32000-word vocabulary that is
    ~130 MB each per 1024 tokens."""

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor) -> Tensor:
        lse = torch.logsumexp(logits, dim=-1)                                 # [N]
        ctx.save_for_backward(logits, lse, targets)
        return lse - logits.gather(1, targets[:, None])[:, 0]                 # [N]

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:                   # grad [N]
        logits, lse, targets = ctx.saved_tensors
        out = torch.sub(logits, lse[:, None]).exp_().mul_(grad[:, None])      # softmax * g
        out.scatter_add_(1, targets[:, None], -grad[:, None])                 # - one_hot * g
        return out, None


def cross_entropy_rows(logits: Tensor, targets: Tensor) -> Tensor:
    """F.cross_entropy(logits, targets, reduction="none") for logits [N, V] and targets [N],
    with less memory (see `_CrossEntropyRows`); the same values and gradients."""
    return _CrossEntropyRows.apply(logits, targets)


def masked_loss(logits: Tensor, targets: Tensor, pad_id: int = 0) -> Tensor:
    """Cross-entropy averaged over target positions whose id is not `pad_id`.

    logits [B, T, V], targets [B, T]; computed in float32 for narrower logits (float64 in
    float64). With no real target at all the result is 0 (the original would divide by zero)."""
    keep = (targets != pad_id).to(logits.dtype if logits.is_floating_point() else torch.float32)
    wide = torch.promote_types(logits.dtype, torch.float32)  # bf16 -> float32; float64 stays
    ce = cross_entropy_rows(logits.flatten(0, 1).to(wide), targets.flatten())  # [B*T]
    return (ce * keep.flatten()).sum() / keep.sum().clamp(min=1)


def masked_accuracy(logits: Tensor, targets: Tensor, pad_id: int = 0) -> Tensor:
    """Share of non-pad target positions where argmax(logits) equals the target."""
    keep = targets != pad_id
    hits = (logits.argmax(dim=-1) == targets) & keep
    return hits.sum().float() / keep.sum().clamp(min=1).float()


# ----- DAG regulariser -----------------------------------------------------------------------

def _perron_upper_bound(M: Tensor, iters: int = 30) -> Tensor:
    """An upper bound on the Perron root of the elementwise non-negative matrices M [..., n, n]
    that is close to it: the Collatz-Wielandt bound max_i (M x)_i / x_i for a positive x from
    power iteration on M + I (the + I keeps every entry of x positive)."""
    x = torch.ones(*M.shape[:-1], 1, dtype=M.dtype, device=M.device)  # [..., n, 1]
    for _ in range(iters):
        x = M @ x + x
        x = x / x.amax(dim=-2, keepdim=True)
    return ((M @ x) / x).amax(dim=(-2, -1))  # [...]


def dag_value(X: Tensor) -> Tensor:
    """mean over all leading dims of |log(trace(expm(X * X)) / n)| for X [..., n, n].

    Computed as s + log trace expm(M - s I) with M = X * X and s a close upper bound on M's
    Perron root, which is the same number but stays finite where expm(M) overflows (the
    original gives inf there). The shift is exact for any s, so it carries no gradient."""
    M = (X * X).double()  # float64: dag(A_LM) is the log of a number close to 1
    n = M.shape[-1]
    s = _perron_upper_bound(M.detach())                                   # [...]
    eye = torch.eye(n, dtype=M.dtype, device=M.device)
    shifted = torch.linalg.matrix_exp(M - s[..., None, None] * eye)
    log_trace = s + torch.log(shifted.diagonal(dim1=-2, dim2=-1).sum(-1))  # [...]
    return (log_trace - math.log(n)).abs().mean().to(torch.promote_types(X.dtype, torch.float32))


def dag_values(deductive: Any) -> dict[str, Tensor]:
    """The three DAG values of a forward's deductive outputs: `A` from A_LM, `A_P` from A_P
    and `G` from G_LM (each a scalar tensor; docs/model.md, "Deductive outputs")."""
    fields = {"A": "A_LM", "A_P": "A_P", "G": "G_LM"}
    out = {}
    for key, name in fields.items():
        X = getattr(deductive, name, None)
        if X is None:
            raise PLDRError(f"dag_values needs the deductive output {name}; run the model "
                            "with return_deductive=True (a v510G model has no A_LM or A_P)")
        out[key] = dag_value(X)
    return out


@dataclass
class LossOutput:
    """The training loss and its parts: `loss` = `ce` + sum of coeff * dag."""

    loss: Tensor
    ce: Tensor
    dag: dict[str, Tensor]


def loss_with_dag(logits: Tensor, targets: Tensor, deductive: Any | None,
                  coeffs: Sequence[float] = (0.0, 0.0, 0.0), pad_id: int = 0) -> LossOutput:
    """Masked cross-entropy plus cA*dag(A_LM) + cAp*dag(A_P) + cG*dag(G_LM).

    The DAG values are always computed when deductive outputs are given (they are worth
    logging), but only terms with a non-zero coefficient take part in the backward pass."""
    if len(coeffs) != 3 or any(float(c) < 0 or not math.isfinite(float(c)) for c in coeffs):
        raise PLDRError(f"DAG coefficients must be three numbers >= 0 (cA, cAp, cG), got {coeffs}")
    ce = masked_loss(logits, targets, pad_id)
    loss, dag = ce, {}
    names = ("A_LM", "A_P", "G_LM")
    if deductive is not None and all(getattr(deductive, n, None) is not None for n in names):
        for c, key, name in zip(coeffs, ("A", "A_P", "G"), names):
            X = getattr(deductive, name)
            if float(c) > 0:
                dag[key] = dag_value(X)
                loss = loss + float(c) * dag[key]
            else:
                with torch.no_grad():
                    dag[key] = dag_value(X)
    elif any(float(c) > 0 for c in coeffs):
        raise PLDRError("non-zero DAG coefficients need A_LM, A_P and G_LM of a v510 model "
                        "computing its own G_LM (forward with return_deductive=True)")
    return LossOutput(loss=loss, ce=ce, dag=dag)
