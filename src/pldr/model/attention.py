"""Power law graph attention: RoPE, the residual metric learner, the power-law step and the
attention call.

For one decoder layer and one head (dk = head size):

    q, k, v   = projections of x, q and k rotated by RoPE (config.rope_style)
    A         = LayerNorm(sum_t q_t^T q_t)          metric tensor, [dk, dk]
    A         = LayerNorm(A + GLU(...GLU(A)))       x num_reslayerA residual units
    A_LM      = iSwiGLU(W @ A + b) + 1e-9           iSwiGLU(x) = x * silu(x)
    A_P       = A_LM ** pw                          elementwise power
    G_LM      = a @ A_P + ba                        energy-curvature tensor
    attention = softmax((q @ G_LM) k^T / sqrt(dk)) v

Once G_LM is known the last line is ordinary scaled-dot-product attention with the query
q @ G_LM, so it runs through `F.scaled_dot_product_attention`. Module and parameter names
match the original release, so its state dicts load without renaming.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import PLDRConfig
from .call import AttentionCall, LayerDeductive
from .linear import Linear

A_LM_EPS = 1e-9  # keeps A_LM strictly positive so A_LM ** pw is defined


# ----- rotary position embedding ------------------------------------------------------------

def rope_tables(dk: int, max_seq_len: int, base: float) -> tuple[Tensor, Tensor]:
    """cos and sin tables [max_seq_len, dk/2] in float32: pair i at position p turns by
    p * base^(-2i/dk)."""
    theta = 1.0 / (base ** (torch.arange(0, dk, 2)[: dk // 2].float() / dk))  # [dk/2]
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), theta)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate feature pairs (2i, 2i+1) of x [B, T, H, dk] by the angles of cos/sin [B, T, dk/2].

    Interleaved-pairs convention (original LLaMA / GPT-J, torchtune), not Hugging Face's
    rotate-half; computed in float32 like the original (float64 inputs in float64)."""
    xf = x.to(_rope_dtype(x)).unflatten(-1, (-1, 2))  # [B, T, H, dk/2, 2]
    x0, x1 = xf[..., 0], xf[..., 1]
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]  # [B, T, 1, dk/2]
    out = torch.stack((x0 * cos - x1 * sin, x1 * cos + x0 * sin), dim=-1)
    return out.flatten(-2).type_as(x)


def apply_rope_half(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate feature pairs (i, i + dk/2) of x [B, T, H, dk] by the angles of cos/sin
    [B, T, dk/2]: the rotate-half convention (GPT-NeoX, Llama in transformers; PLDR-LLM-v52).

    Pair i turns by the same angle as pair (2i, 2i+1) of `apply_rope`, so with
    perm = [0, h, 1, h+1, ..., h-1, 2h-1] (h = dk/2): apply_rope(x[..., perm]) equals
    apply_rope_half(x)[..., perm]. Same precision as `apply_rope`."""
    x0, x1 = x.to(_rope_dtype(x)).chunk(2, dim=-1)    # [B, T, H, dk/2] each
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]  # [B, T, 1, dk/2]
    return torch.cat((x0 * cos - x1 * sin, x1 * cos + x0 * sin), dim=-1).type_as(x)


def _rope_dtype(x: Tensor) -> torch.dtype:
    """RoPE runs in float32 for float32 and narrower inputs (as the original) and in float64
    for float64 ones, so a float64 run stays float64 throughout."""
    return torch.promote_types(x.dtype, torch.float32)


ROPE_FUNCTIONS = {"interleaved": apply_rope, "half": apply_rope_half}  # by config.rope_style


# ----- building blocks -------------------------------------------------------------------------

class GLU(nn.Module):
    """SwiGLU unit: gluw3(silu(gluw1 x) * gluw2 x), in -> hidden -> out, all with bias."""

    def __init__(self, d_in: int, d_hidden: int, d_out: int):
        super().__init__()
        self.gluw1 = Linear(d_in, d_hidden)
        self.gluw2 = Linear(d_in, d_hidden)
        self.gluw3 = Linear(d_hidden, d_out)

    def forward(self, x: Tensor) -> Tensor:
        return self.gluw3(F.silu(self.gluw1(x)) * self.gluw2(x))


class ResidualMetricUnit(nn.Module):
    """One unit of the metric learner: A <- LayerNorm(A + GLU_n(... GLU_1(A))) over dk."""

    def __init__(self, config: PLDRConfig):
        super().__init__()
        dk = config.dk
        self.denseAs = nn.ModuleList(GLU(dk, config.A_dff, dk) for _ in range(config.num_denseA))
        self.layernormA = nn.LayerNorm(dk, eps=config.layernorm_eps)

    def forward(self, A: Tensor) -> Tensor:  # [B, H, dk, dk]
        h = A
        for glu in self.denseAs:
            h = glu(h)
        return self.layernormA(A + h)


class PowerLawStep(nn.Module):
    """A -> (A_LM, A_P, G_LM) with per-head parameters W, b, pw, a, ba, each [H, dk, dk]."""

    def __init__(self, config: PLDRConfig):
        super().__init__()
        shape = (config.num_heads, config.dk, config.dk)
        self.Wlst = nn.Parameter(torch.empty(shape))
        self.blst = nn.Parameter(torch.empty(shape))
        self.pwlst = nn.Parameter(torch.empty(shape))
        self.alst = nn.Parameter(torch.empty(shape))
        self.balst = nn.Parameter(torch.empty(shape))

    def forward(self, A: Tensor) -> tuple[Tensor, Tensor, Tensor]:  # A [B, H, dk, dk]
        z = self.Wlst @ A + self.blst
        A_LM = z * F.silu(z) + A_LM_EPS      # iSwiGLU, positive
        A_P = A_LM ** self.pwlst
        G_LM = self.alst @ A_P + self.balst
        return A_LM, A_P, G_LM

    def reset_parameters(self) -> None:
        """Xavier-normal W, pw, a over the whole [H, dk, dk] tensor; zero b and ba."""
        for p in (self.Wlst, self.pwlst, self.alst):
            nn.init.xavier_normal_(p)
        nn.init.zeros_(self.blst)
        nn.init.zeros_(self.balst)


# ----- the attention layer -----------------------------------------------------------------------

class PowerLawAttention(nn.Module):
    """Multi-head power law graph attention of one decoder layer (the original's `mha1`).

    Variant v510 learns G_LM from the metric tensor of its queries; v510G uses the fixed
    buffer `G_LM` [H, dk, dk] given at construction."""

    def __init__(self, config: PLDRConfig, layer_idx: int):
        super().__init__()
        D, H, dk = config.d_model, config.num_heads, config.dk
        self.layer_idx, self.num_heads, self.dk = layer_idx, H, dk
        self.learned = config.variant == "v510"
        self.rope = ROPE_FUNCTIONS[config.rope_style]
        self.wq, self.wk, self.wv = Linear(D, D), Linear(D, D), Linear(D, D)
        if self.learned:
            self.plgatt_layer = PowerLawStep(config)
        self.dense = Linear(D, D)
        if self.learned:
            self.reslayerAs = nn.ModuleList(ResidualMetricUnit(config)
                                            for _ in range(config.num_reslayerA))
            self.layernorm1 = nn.LayerNorm(dk, eps=config.layernorm_eps)
        else:
            self.register_buffer("G_LM", torch.eye(dk).expand(H, dk, dk).clone())

    # -- metric tensor and G_LM --

    def metric_tensor(self, q: Tensor, metric_mask: Tensor | None) -> Tensor:
        """A = LayerNorm(sum_t q_t^T q_t) over the positions in metric_mask [B, T] (all if
        None), then the residual metric learner. q [B, H, T, dk] -> A [B, H, dk, dk]."""
        if metric_mask is not None:
            q = q * metric_mask[:, None, :, None].to(q.dtype)
        A = self.layernorm1(q.transpose(-1, -2) @ q)
        for unit in self.reslayerAs:
            A = unit(A)
        return A

    def energy_curvature(self, q: Tensor, call: AttentionCall) -> LayerDeductive:
        """G_LM for this call, with the deductive outputs behind it: from the call's
        description when it holds the rows' G_LM (kept, given, a v510G model's own), else
        computed from A (this call's queries, or kv_only's A fixed in the KV-cache), kept
        in the cache on a slot's first call as the description says."""
        i, how, kv, rows = self.layer_idx, call.compute, call.cache, call.rows
        if how is None:
            return call.known.layer(i, q.shape[0])
        A = kv.read("A", i, rows) if how.reuse_A else self.metric_tensor(q, call.metric_mask)
        A_LM, A_P, G_LM = self.plgatt_layer(A)
        if how.given is not None:  # these rows' G_LM (and A_LM) is given: theirs win
            G_LM = torch.where(how.given, call.known.G_LM[i], G_LM)
            A_LM = torch.where(how.given, call.known.A_LM[i], A_LM)
        if how.keep_A:
            kv.write("A", i, rows, A)
        if how.keep_G:
            for name, value in (("A_G", A), ("A_LM", A_LM), ("A_P", A_P), ("G_LM", G_LM)):
                kv.write(name, i, rows, value)
        if how.given is not None:  # the given rows have no A or A_P (and maybe no A_LM)
            return LayerDeductive(None, A_LM if how.report_A_LM else None, None, G_LM)
        return LayerDeductive(A, A_LM, A_P, G_LM)

    # -- forward --

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor,
                call: AttentionCall) -> tuple[Tensor, LayerDeductive]:
        """x [B, T, D] -> attention output [B, T, D] and this layer's deductive outputs."""
        B, T, D = x.shape
        heads = lambda t: t.view(B, T, self.num_heads, self.dk)  # noqa: E731
        q = self.rope(heads(self.wq(x)), cos, sin).transpose(1, 2)  # [B, H, T, dk]
        k = self.rope(heads(self.wk(x)), cos, sin).transpose(1, 2)  # [B, H, T, dk]
        v = heads(self.wv(x)).transpose(1, 2)                        # [B, H, T, dk]
        if call.where is not None:  # a KV-cache call: attend over the slots' past too
            k, v = call.cache.write_kv(self.layer_idx, call.rows, call.where, k, v,
                                       call.span)                      # [B, H, span, dk]
        ded = self.energy_curvature(q, call)
        q_bent = q @ ded.G_LM.to(q.dtype)                              # [B, H, T, dk]
        out = attend(q_bent, k, v, call.mask)
        return self.dense(out.transpose(1, 2).reshape(B, T, D)), ded

    def reset_parameters(self) -> None:
        """The original's initialisation: xavier-uniform Linear weights (wv too), zero bias."""
        for lin in (self.wq, self.wk, self.wv, self.dense):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)
        if self.learned:
            self.plgatt_layer.reset_parameters()


QUERY_CHUNK = 512  # queries per SDPA call on a masked call: bounds the [T, S] score memory


def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    """SDPA of q [B, H, T, dk] over k, v [B, H, S, dk].

    Without a mask the call is uncached and unpadded: `is_causal=True` (whose top-left
    alignment is right only when T == S). With a mask (padded or cached calls) long inputs run
    in chunks of QUERY_CHUNK queries, which is exact and bounds the memory of the scores."""
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    T = q.shape[2]
    if T <= QUERY_CHUNK:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return torch.cat([F.scaled_dot_product_attention(q[:, :, a:a + QUERY_CHUNK], k, v,
                                                     attn_mask=mask[:, :, a:a + QUERY_CHUNK])
                      for a in range(0, T, QUERY_CHUNK)], dim=2)


def scale_embedding(x: Tensor, d_model: int) -> Tensor:
    """The original multiplies embeddings by sqrt(d_model) before the input LayerNorm."""
    return x * math.sqrt(d_model)
