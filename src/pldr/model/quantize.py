"""Low-precision linear layers for decoding on CPU: int8 (dynamic) and packed bfloat16.

Decoding one token reads every weight once, so it is bound by memory bandwidth, and at
batch 1 the speed of each matrix-vector product is the speed of its kernel: the plain
kernels torch picks for int8-weight or bf16 matrices at M = 1 are slower than float32 here,
so both kinds of layer call kernels that work on weights packed once at load time.

- `Int8Linear` (`--dtype int8`): weights rounded to int8 with one float scale per output
  channel (symmetric, scale = max|w_row| / 127), multiplied by FBGEMM's dynamic quantised
  linear (`torch.ops.quantized.linear_dynamic`). That kernel also rounds the *activations*,
  so int8 is not weight-only: it is W8A8 with dynamic activations. The kernel rounds its
  input [N, in] to uint8 with one scale and zero point for the whole call (from its min and
  max); with several rows each is first divided by its max|x| (and the output multiplied
  back), so the rounding step of a row is at most 2 max|x_row| / 255, whatever the other
  rows hold (a single row, batch-1 decoding, is rounded over its own range as it is; 7-bit
  activations, `reduce_range`, on CPUs without VNNI, whose 16-bit pair sums would otherwise
  saturate). Products accumulate in int32; the output is float32.
- `BF16Linear` (`--dtype bfloat16` on a CPU with native bf16): bf16 weights reordered once
  into oneDNN's blocked layout for batch 1 (`torch.ops.mkldnn._reorder_linear_weight`) and
  multiplied by `torch.ops.mkldnn._linear_pointwise` (float32 accumulation, as F.linear).

LayerNorms, the embedding and the power-law parameters keep their weights; int8 also keeps
the query projection and the metric learner's small dk x dk GLUs (which shape A, and from it
G_LM) float (`KEEP_FLOAT`). Both swaps are in place, for inference only (no gradients); they
replace `nn.Linear` modules by path, so they compose with however the layers are arranged.
"""

from __future__ import annotations

import logging
import warnings

import torch
from torch import Tensor, nn

from ..devices import cpu_flags, native_bf16
from ..errors import PLDRError, PLDRTypeError

log = logging.getLogger("pldr")

# nn.Linear layers that keep their weights, by a part of their name: the query projection (A,
# the metric tensor, is learned from the queries, and the power law A_P = A_LM ** pw amplifies
# its rounding: on the fixture model int8 queries move the logits ten times more than every
# other layer together) and the metric learner itself (small dk x dk GLUs)
KEEP_FLOAT = ("wq", "reslayerAs")


def vnni() -> bool:
    """Whether the CPU multiplies int8 with 32-bit accumulation (AVX512-VNNI or AMX-INT8), so
    FBGEMM can take full 8-bit activations without saturating."""
    return bool(cpu_flags() & {"avx512_vnni", "amx_int8"})


def _fbgemm_engine() -> str:
    """The quantised engine to pack with: FBGEMM on x86, QNNPACK elsewhere (ARM)."""
    engines = torch.backends.quantized.supported_engines
    if "fbgemm" in engines:
        return "fbgemm"
    if "qnnpack" in engines:
        return "qnnpack"
    raise PLDRTypeError("this torch build has no quantised CPU engine (fbgemm or qnnpack); "
                        "use `dtype='float32'` or `dtype='bfloat16'`")


class Int8Linear(nn.Module):
    """y = x W^T + b with W packed as int8 [out, in] with per-output-channel scales [out] and
    each row of x scaled to max|x| = 1, then rounded to uint8 (FBGEMM dynamic quantised
    linear); float32 in and out, other input dtypes are converted and the output returned in
    the input's dtype."""

    def __init__(self, packed, bias: Tensor | None, in_features: int, out_features: int,
                 reduce_range: bool):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.reduce_range = reduce_range
        self.packed = packed                 # torch's LinearPackedParamsBase: int8 W, scales
        self.register_buffer("bias", bias)   # [out] float32 or None

    @classmethod
    def from_linear(cls, linear: nn.Linear, reduce_range: bool | None = None) -> "Int8Linear":
        """Round `linear`'s weights to int8 with symmetric per-row scales and pack them.
        `reduce_range=None`: 7-bit activations unless the CPU has VNNI (`vnni`); 8-bit ones
        (`reduce_range=False`) need VNNI, since the kernels of other CPUs add pairs of products
        in 16 bits, which 8-bit activations overflow."""
        if reduce_range is False and not vnni():
            raise PLDRError("`reduce_range=False` (8-bit activations) needs a CPU with VNNI "
                            "(avx512_vnni or amx_int8): without it the int8 products overflow; "
                            "leave `reduce_range` at None (7-bit activations on this CPU)")
        w = linear.weight.detach().float()                           # [out, in]
        scales = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0        # [out]
        q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
        bias = None if linear.bias is None else linear.bias.detach().float().contiguous()
        with warnings.catch_warnings():  # torch deprecates quantised tensors; packing needs one
            warnings.filterwarnings("ignore", "torch.quantize_per_tensor")
            qweight = torch._make_per_channel_quantized_tensor(
                q, scales.double(), torch.zeros_like(scales, dtype=torch.long), 0)
        engine = torch.backends.quantized.engine
        torch.backends.quantized.engine = _fbgemm_engine()
        try:
            packed = torch.ops.quantized.linear_prepack(qweight, None)  # bias: added after
        finally:
            torch.backends.quantized.engine = engine
        rr = not vnni() if reduce_range is None else reduce_range
        return cls(packed, bias, w.shape[1], w.shape[0], rr)

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).float()                        # [N, in]
        if x2.shape[0] == 1:  # one row (batch-1 decoding) has its own range: no scaling
            y = torch.ops.quantized.linear_dynamic(x2, self.packed, self.reduce_range)
            y = y if self.bias is None else y + self.bias
        else:
            scaled, row_max = self.scaled_input(x2)                  # [N, in], [N, 1]
            y = torch.ops.quantized.linear_dynamic(scaled, self.packed, self.reduce_range)
            y = y * row_max if self.bias is None else torch.addcmul(self.bias, y, row_max)
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)  # [..., out]

    def unpacked(self) -> tuple[Tensor, Tensor]:
        """(int8 weight [out, in], float32 scales [out]) as packed."""
        qweight, _ = torch.ops.quantized.linear_unpack(self.packed)
        return qweight.int_repr(), qweight.q_per_channel_scales().float()

    def dequantized(self) -> Tensor:
        """The float weight [out, in] this layer computes with."""
        q, scales = self.unpacked()
        return q.float() * scales[:, None]

    def scaled_input(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(x / max|x| per row [N, in], max|x| per row [N, 1]): what the kernel rounds, and
        the factor its output is multiplied by."""
        x2 = x.reshape(-1, x.shape[-1]).float()
        row_max = x2.abs().amax(dim=1, keepdim=True).clamp(min=1e-30)
        return x2 / row_max, row_max

    @property
    def nbytes(self) -> int:
        """Bytes of the packed weights: one per int8 weight, plus float32 scales (the bias is
        a buffer)."""
        return self.out_features * (self.in_features + 4)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, int8 "
                f"(activations {7 if self.reduce_range else 8}-bit, rows scaled)")


class BF16Linear(nn.Module):
    """y = x W^T + b in bfloat16 with W reordered once into oneDNN's blocked layout."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach().to(torch.bfloat16)                # [out, in]
        # laid out for one row at a time (decoding); measured no slower for 16 or 64 rows.
        # oneDNN packs bf16 only on CPUs it computes bf16 on (AVX512-BW and up); elsewhere
        # the weight stays plain and F.linear computes the same bf16 product
        self.is_packed = torch.ops.mkldnn._is_mkldnn_bf16_supported()
        self.packed = torch.ops.mkldnn._reorder_linear_weight(w, 1) if self.is_packed else w
        self.bias = (None if linear.bias is None
                     else linear.bias.detach().to(torch.bfloat16).contiguous())

    # inductor cannot lower this op on an opaque packed weight: compiled callers
    # (generate/Engine with compile=True) run it eagerly between their graphs
    @torch.compiler.disable
    def forward(self, x: Tensor) -> Tensor:
        if x.dtype != torch.bfloat16:
            x = x.to(torch.bfloat16)
        if not self.is_packed:
            return nn.functional.linear(x, self.packed, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    @property
    def nbytes(self) -> int:
        """Bytes of the bf16 weights and bias."""
        return 2 * self.out_features * (self.in_features + 1)

    def extra_repr(self) -> str:
        layout = "packed" if self.is_packed else "plain (oneDNN cannot pack bf16 on this CPU)"
        return f"in_features={self.in_features}, out_features={self.out_features}, bf16 {layout}"


def _swap_linears(model: nn.Module, make, keep: tuple[str, ...] = ()) -> int:
    """Replace every nn.Linear of `model` whose path has no part in `keep` by make(linear),
    in place."""
    replaced = 0
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            path = f"{name}.{child_name}" if name else child_name
            if isinstance(child, nn.Linear) and not set(path.split(".")) & set(keep):
                setattr(module, child_name, make(child))
                replaced += 1
    return replaced


def _require_cpu(model: nn.Module, what: str, flag: str) -> None:
    params = list(model.parameters())
    if params and params[0].device.type != "cpu":
        raise PLDRTypeError(f"{what} are for CPU decoding; the model is on "
                            f"{params[0].device}: use `device='cpu'` with `dtype='{flag}'`")


def quantize_int8(model: nn.Module, reduce_range: bool | None = None) -> nn.Module:
    """Replace `model`'s large nn.Linear layers by `Int8Linear`, in place; returns `model`.

    Needs a CPU model; the model is put in eval mode. `reduce_range`: see
    `Int8Linear.from_linear`."""
    _require_cpu(model, "int8 weights", "int8")
    n = _swap_linears(model, lambda lin: Int8Linear.from_linear(lin, reduce_range), KEEP_FLOAT)
    log.debug("int8: quantised %d linear layers (FBGEMM dynamic, activations per call)", n)
    return model.eval().requires_grad_(False)


def pack_bf16(model: nn.Module) -> nn.Module:
    """Replace every nn.Linear of `model` by `BF16Linear`, in place; returns `model` (a
    bfloat16 CPU model, in eval mode). The query projection and the metric learner are
    packed too: packing changes the layout, not the numbers."""
    _require_cpu(model, "packed bf16 weights", "bfloat16")
    n = _swap_linears(model, BF16Linear)
    log.debug("bf16: packed %d linear layers for oneDNN", n)
    return model.eval().requires_grad_(False)


def for_decoding(model: nn.Module, dtype: str) -> nn.Module:
    """`model` (loaded in `devices.load_dtype(dtype)`) made ready to decode with the fastest
    kernels for an inference `--dtype`: int8 quantises it (`quantize_int8`); a bfloat16 model
    on a CPU with native bf16 gets packed bf16 layers (`pack_bf16`); otherwise it is
    returned as it is. In place; returns `model`."""
    if dtype == "int8":
        return quantize_int8(model)
    params = list(model.parameters())
    if (params and params[0].dtype == torch.bfloat16 and params[0].device.type == "cpu"
            and native_bf16()):
        return pack_bf16(model)
    return model


def module_bytes(module: nn.Module) -> int:
    """Bytes of `module`'s own parameters and buffers, or its packed weights (not its
    children's)."""
    own = list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
    packed = module.nbytes if isinstance(module, (Int8Linear, BF16Linear)) else 0
    return packed + sum(t.numel() * t.element_size() for t in own)


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every parameter, buffer and packed weight (int8 weights count one byte)."""
    return sum(module_bytes(m) for m in model.modules())


__all__ = ["Int8Linear", "BF16Linear", "quantize_int8", "pack_bf16", "for_decoding", "weight_bytes",
           "module_bytes", "vnni", "KEEP_FLOAT"]
