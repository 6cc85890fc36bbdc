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
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import PLDRConfig
from .cache import GCache, KVCache

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
        self.gluw1 = nn.Linear(d_in, d_hidden)
        self.gluw2 = nn.Linear(d_in, d_hidden)
        self.gluw3 = nn.Linear(d_hidden, d_out)

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


@dataclass
class LayerDeductive:
    """One layer's deductive outputs, each [B, H, dk, dk] (None where not computed)."""

    A: Tensor | None
    A_LM: Tensor | None
    A_P: Tensor | None
    G_LM: Tensor


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
        self.wq, self.wk, self.wv = nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, D)
        if self.learned:
            self.plgatt_layer = PowerLawStep(config)
        self.dense = nn.Linear(D, D)
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

    def energy_curvature(self, q: Tensor, metric_mask: Tensor | None,
                         kv_cache: KVCache | None, g_cache: GCache | None) -> LayerDeductive:
        """G_LM for this call, with the deductive outputs behind it.

        Order of precedence: the fixed buffer (v510G); a filled G-cache (nothing runs); the
        metric tensor fixed in the KV-cache (only the power-law step runs); otherwise A from
        this call's queries (stored in the KV-cache and G-cache when they are given)."""
        i = self.layer_idx
        if not self.learned:
            return LayerDeductive(None, None, None, self.G_LM[None].expand(q.shape[0], -1, -1, -1))
        if g_cache is not None and g_cache.filled:
            pick = lambda t: None if t is None else t[i]  # noqa: E731
            return LayerDeductive(pick(g_cache.A), pick(g_cache.A_LM), pick(g_cache.A_P),
                                  g_cache.G_LM[i])
        if kv_cache is not None and kv_cache.length > 0:
            A = kv_cache.A[i]
        else:
            A = self.metric_tensor(q, metric_mask)
            if kv_cache is not None:
                kv_cache.A[i].copy_(A)
        A_LM, A_P, G_LM = self.plgatt_layer(A)
        if g_cache is not None:
            for name, t in (("A", A), ("A_LM", A_LM), ("A_P", A_P), ("G_LM", G_LM)):
                getattr(g_cache, name)[i].copy_(t)
        return LayerDeductive(A, A_LM, A_P, G_LM)

    # -- forward --

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, attn_mask: Tensor,
                metric_mask: Tensor | None, kv_cache: KVCache | None = None,
                g_cache: GCache | None = None) -> tuple[Tensor, LayerDeductive]:
        """x [B, T, D] -> attention output [B, T, D] and this layer's deductive outputs.

        attn_mask [B, 1, T, S] (True = may attend) covers the S = cached + new keys."""
        B, T, D = x.shape
        heads = lambda t: t.view(B, T, self.num_heads, self.dk)  # noqa: E731
        q = self.rope(heads(self.wq(x)), cos, sin).transpose(1, 2)  # [B, H, T, dk]
        k = self.rope(heads(self.wk(x)), cos, sin).transpose(1, 2)  # [B, H, T, dk]
        v = heads(self.wv(x)).transpose(1, 2)                        # [B, H, T, dk]
        if kv_cache is not None:
            start, i = kv_cache.length, self.layer_idx
            kv_cache.k[i, :, :, start:start + T] = k
            kv_cache.v[i, :, :, start:start + T] = v
            k = kv_cache.k[i, :, :, :start + T]                       # [B, H, S, dk]
            v = kv_cache.v[i, :, :, :start + T]
        ded = self.energy_curvature(q, metric_mask, kv_cache, g_cache)
        q_bent = q @ ded.G_LM.to(q.dtype)                              # [B, H, T, dk]
        out = F.scaled_dot_product_attention(q_bent, k, v, attn_mask=attn_mask)
        return self.dense(out.transpose(1, 2).reshape(B, T, D)), ded

    def reset_parameters(self) -> None:
        """The original's initialisation: xavier-uniform Linear weights (wv too), zero bias."""
        for lin in (self.wq, self.wk, self.wv, self.dense):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)
        if self.learned:
            self.plgatt_layer.reset_parameters()


def attention_mask(key_real: Tensor, start: int, T: int) -> Tensor:
    """Boolean mask [B, 1, T, S] (True = attend) for T new queries at positions start..start+T-1
    over the S = start + T keys: causal (bottom-right aligned) and without pad keys.

    A query that would see no key at all (a pad left of every real token) may see itself, so
    the softmax stays finite; its output belongs to a pad and is never used."""
    S = key_real.shape[1]
    q_idx = torch.arange(start, start + T, device=key_real.device)[:, None]  # [T, 1]
    k_idx = torch.arange(S, device=key_real.device)[None, :]                 # [1, S]
    mask = (k_idx <= q_idx)[None] & key_real[:, None, :]                     # [B, T, S]
    lonely = ~mask.any(dim=-1, keepdim=True)
    mask = mask | (lonely & (k_idx == q_idx)[None])
    return mask[:, None]


def scale_embedding(x: Tensor, d_model: int) -> Tensor:
    """The original multiplies embeddings by sqrt(d_model) before the input LayerNorm."""
    return x * math.sqrt(d_model)
