"""`Linear`: nn.Linear with a faster float32 matmul on CPU for a few rows (batched decoding).

Decoding a batch of B requests multiplies B rows by every weight. For 6 to 48 rows, MKL's
AVX-512 kernels run `x @ W^T` (the weight the right operand, by all signs repacked at every
call: MKL's own pre-packed weights ran as fast as the turned-round product) slower than the
same product taken the other way round, `(W @ x^T)^T`, with the weight the left operand,
read in place. On the 110M shape it speeds up batched decode steps of 8 to 16 requests;
1-3 rows lose, 64 rows gain nothing, and under MKL's AVX2 kernels it does not pay (the
figures are on the docs' Benchmarks page, docs/benchmarks.md, "Batched steps").

So the product is turned round only there: float32 on an Intel CPU whose MKL and ATen
kernels are AVX-512 (AMD CPUs get MKL's AVX2-class kernels), for SMALL_BATCH_ROWS rows: a
batch of decoding requests, and also a short prompt or a small scoring batch. Everywhere
else (GPUs, bf16, long prompts, training's thousands of rows) this is `F.linear`. Both
compute the same sums in another order (float32 rounding only). The state dict and
`isinstance(layer, nn.Linear)` are nn.Linear's, so checkpoints, FSDP2 and the int8/bf16
layer swaps (model/quantize.py) see no difference.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..devices import cpu_vendor

SMALL_BATCH_ROWS = range(6, 49)  # rows (B x T) for which W @ x^T is the faster product


def weight_left_pays() -> bool:
    """Whether this process computes with MKL's and ATen's AVX-512 kernels on an Intel CPU
    (MKL not limited by MKL_ENABLE_INSTRUCTIONS), where W @ x^T is measured faster."""
    mkl_limit = os.environ.get("MKL_ENABLE_INSTRUCTIONS", "").upper()
    return (torch.backends.mkl.is_available() and cpu_vendor() == "GenuineIntel"
            and torch.backends.cpu.get_cpu_capability().startswith("AVX512")
            and (not mkl_limit or mkl_limit.startswith("AVX512")))


WEIGHT_LEFT_PAYS = weight_left_pays()  # once per process: the kernels do not change


def linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """x [..., in] @ weight [out, in]^T + bias [out] -> [..., out]. Turned round, the result
    is a transposed view (making it contiguous would cost a tenth of the gain)."""
    if not WEIGHT_LEFT_PAYS or torch.compiler.is_compiling():  # compiled: inductor's own mm
        return F.linear(x, weight, bias)
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if (rows in SMALL_BATCH_ROWS and x.dtype == torch.float32 and weight.dtype == torch.float32
            and x.device.type == "cpu"):
        xt = x.reshape(rows, x.shape[-1]).t()                               # [in, rows]
        y = weight @ xt if bias is None else torch.addmm(bias[:, None], weight, xt)
        return y.t().reshape(*x.shape[:-1], weight.shape[0])                # [..., out]
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear whose forward is `linear` (see the module docstring)."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)
