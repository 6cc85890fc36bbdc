"""Weight-only int8 quantisation of a loaded model, for decoding on CPU.

Decoding one token reads every weight once, so it is bound by memory bandwidth: int8 weights
are a quarter of float32's bytes. Each `nn.Linear` of the key, value and output projections, the
feed-forward GLU and the final layer becomes an `Int8Linear`: weights rounded to int8 with
one float scale per output channel (symmetric, scale = max|w_row| / 127), multiplied by
torch's own weight-packed kernel `torch._weight_int8pack_mm` (activations stay float32 or
bfloat16). LayerNorms, the embedding, the power-law parameters, the query projection and the
metric learner's small dk x dk GLUs (which shape A, and from it G_LM) keep their float
weights (`KEEP_FLOAT`).
Quantisation is done in place at load time and is for inference only (no gradients).
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

from ..errors import PLDRTypeError

log = logging.getLogger("pldr")

# nn.Linear layers that stay float, by a part of their name: the query projection (A, the
# metric tensor, is learned from the queries, and the power law A_P = A_LM ** pw amplifies
# its rounding: on the fixture model int8 queries move the logits ten times more than every
# other layer together) and the metric learner itself (small dk x dk GLUs)
KEEP_FLOAT = ("wq", "reslayerAs")


class Int8Linear(nn.Module):
    """y = x W^T + b with W stored as int8 [out, in] and per-output-channel scales [out]."""

    def __init__(self, weight_int8: Tensor, scales: Tensor, bias: Tensor | None):
        super().__init__()
        self.in_features, self.out_features = weight_int8.shape[1], weight_int8.shape[0]
        self.register_buffer("weight_int8", weight_int8)   # [out, in] int8
        self.register_buffer("scales", scales)             # [out], the activations' dtype
        self.register_buffer("bias", bias)                 # [out] or None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        """Round `linear`'s weights to int8 with symmetric per-row scales."""
        w = linear.weight.detach().float()                           # [out, in]
        scales = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0        # [out]
        q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
        dtype = linear.weight.dtype
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(q.contiguous(), scales.to(dtype), bias)

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])                                # [N, in]
        if x2.dtype != self.scales.dtype:
            x2 = x2.to(self.scales.dtype)
        y = torch._weight_int8pack_mm(x2.contiguous(), self.weight_int8, self.scales)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)             # [..., out]

    def dequantized(self) -> Tensor:
        """The float weight [out, in] this layer computes with."""
        return self.weight_int8.float() * self.scales.float()[:, None]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def quantize_int8(model: nn.Module) -> nn.Module:
    """Replace `model`'s large nn.Linear layers by `Int8Linear`, in place; returns `model`.

    Needs a CPU model in float32 or bfloat16 (torch's int8 weight-packed kernel is for CPU
    here); the model is put in eval mode."""
    params = list(model.parameters())
    if params and params[0].device.type != "cpu":
        raise PLDRTypeError(f"int8 weights are for CPU decoding; the model is on "
                            f"{params[0].device}: use --device cpu with --dtype int8")
    replaced = 0
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            path = f"{name}.{child_name}" if name else child_name
            if isinstance(child, nn.Linear) and not set(path.split(".")) & set(KEEP_FLOAT):
                setattr(module, child_name, Int8Linear.from_linear(child))
                replaced += 1
    log.debug("int8: quantised %d linear layers", replaced)
    return model.eval().requires_grad_(False)


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer (int8 weights count one byte each)."""
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


__all__ = ["Int8Linear", "quantize_int8", "weight_bytes", "KEEP_FLOAT"]
