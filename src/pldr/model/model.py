"""`PLDRModel`: embedding, post-norm decoder layers with power law graph attention, and the
output head. One forward serves full sequences and cached steps: caches are just arguments.

    ids [B, T] -> x = LayerNorm(Embedding(ids) * sqrt(D))          [B, T, D]
    each layer:  h = LayerNorm(x + PowerLawAttention(x))
                 x = LayerNorm(h + GLU(h))                          [B, T, D]
    logits = Linear(x)                                              [B, T, V]

There is no final LayerNorm (as in the original). Module names equal the original's, so an
original state dict loads as is (docs/checkpoints.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..config import PLDRConfig
from ..errors import PLDRError, PLDRTypeError
from .attention import GLU, PowerLawAttention, rope_tables, scale_embedding
from .cache import GivenG, InferenceCache
from .call import AttentionCall, LayerDeductive, describe
from .linear import Linear
from .pretrained import save_pretrained  # the directory format (takes any model, duck-typed)


@dataclass
class Deductive:
    """Deductive outputs of every layer, each [L, B, H, dk, dk] (None where not defined:
    v510G has only G_LM; a predefined G_LM has no A or A_P)."""

    A: Tensor | None
    A_LM: Tensor | None
    A_P: Tensor | None
    G_LM: Tensor

    @classmethod
    def stack(cls, layers: Sequence[LayerDeductive]) -> "Deductive":
        def field(name: str) -> Tensor | None:
            ts = [getattr(d, name) for d in layers]
            return None if any(t is None for t in ts) else torch.stack(ts)
        return cls(A=field("A"), A_LM=field("A_LM"), A_P=field("A_P"), G_LM=field("G_LM"))


@dataclass
class PLDROutput:
    """What a forward returns: logits [B, T, V], the last decoder layer's output [B, T, D]
    and, when asked, the deductive outputs."""

    logits: Tensor
    hidden: Tensor
    deductive: Deductive | None = None


class DecoderLayer(nn.Module):
    """Post-norm decoder layer: attention and feed-forward, each with residual + LayerNorm."""

    def __init__(self, config: PLDRConfig, layer_idx: int):
        super().__init__()
        D, eps = config.d_model, config.layernorm_eps
        self.mha1 = PowerLawAttention(config, layer_idx)
        self.ffn = GLU(D, config.dff, D)
        self.layernorm1 = nn.LayerNorm(D, eps=eps)
        self.layernorm2 = nn.LayerNorm(D, eps=eps)
        self.checkpointed = False  # recompute in backward (PLDRModel.set_activation_checkpointing)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor,
                call: AttentionCall) -> tuple[Tensor, LayerDeductive]:
        if self.checkpointed and call.cache is None and torch.is_grad_enabled():
            # keeps only this layer's inputs; its activations are recomputed in backward,
            # inside the layer (so under FSDP2 the recompute needs no second unshard)
            return checkpoint(self._forward, x, cos, sin, call, use_reentrant=False)
        return self._forward(x, cos, sin, call)

    def _forward(self, x: Tensor, cos: Tensor, sin: Tensor,
                 call: AttentionCall) -> tuple[Tensor, LayerDeductive]:
        attn, ded = self.mha1(x, cos, sin, call)
        h = self.layernorm1(attn + x)
        return self.layernorm2(self.ffn(h) + h), ded


class Decoder(nn.Module):
    """Embedding, input LayerNorm and the stack of decoder layers (the original's `decoder`)."""

    def __init__(self, config: PLDRConfig):
        super().__init__()
        self.embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.dec_layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
        self.layernorm1 = nn.LayerNorm(config.d_model, eps=config.layernorm_eps)


class PLDRModel(nn.Module):
    """A PLDR-LLM of variant v510 (learned G_LM) or v510G (fixed G_LM given here).

    `G_LM` (v510G only): [L, H, dk, dk] or a list of L tensors [H, dk, dk] / [1, H, dk, dk];
    identity per head when omitted (the model is then an ordinary SDPA transformer)."""

    def __init__(self, config: PLDRConfig, G_LM: Tensor | Sequence[Tensor] | None = None):
        super().__init__()
        if not isinstance(config, PLDRConfig):
            raise PLDRTypeError(f"PLDRModel needs a PLDRConfig, got {type(config).__name__}; "
                                "use PLDRConfig.from_hpdict(...) for an original hpdict")
        if G_LM is not None and config.variant != "v510G":
            raise PLDRError("G_LM is given at construction only for variant v510G; for a "
                            "v510 model pass it to pldr.generate(..., G_LM=...)")
        self.config = config
        self.decoder = Decoder(config)
        self.final_layer = Linear(config.d_model, config.vocab_size)
        self._given_G_LM = None if G_LM is None else GivenG.check(G_LM, config).G_LM.detach().cpu()
        # RoPE cos/sin tables per device, float32 whatever the model's dtype (as the original
        # computes them); not buffers, so `.to(bfloat16)` cannot round them
        self._rope: dict[torch.device, tuple[Tensor, Tensor]] = {}
        self.init_weights()

    # ----- initialisation --------------------------------------------------------------------

    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialise from scratch as the original intends (wv included) and set the v510G
        G_LM. Call after `to_empty()` when built on the meta device."""
        if self.decoder.embedding.weight.is_meta:
            return
        nn.init.normal_(self.decoder.embedding.weight)
        for module in self.modules():
            if isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, GLU):
                for lin in (module.gluw1, module.gluw2, module.gluw3):
                    nn.init.xavier_uniform_(lin.weight)
                    nn.init.zeros_(lin.bias)
            elif isinstance(module, PowerLawAttention):
                module.reset_parameters()
                if not module.learned:
                    G = (self._given_G_LM[module.layer_idx] if self._given_G_LM is not None
                         else torch.eye(module.dk).expand_as(module.G_LM))
                    module.G_LM.copy_(G)
        if isinstance(self.final_layer, nn.Linear):  # a task head's body has none (heads.py)
            nn.init.xavier_uniform_(self.final_layer.weight)
            nn.init.zeros_(self.final_layer.bias)

    # ----- forward ---------------------------------------------------------------------------

    def forward(self, ids: Tensor, *, attention_mask: Tensor | None = None,
                positions: Tensor | None = None, cache: InferenceCache | None = None,
                slots: Sequence[int] | None = None, return_deductive: bool = False,
                logits_to_keep: int = 0, pads: bool | None = None) -> PLDROutput:
        """Logits for ids [B, T]; with a cache, a cached step of any number of new tokens.

        - `attention_mask` [B, T] (1/True = real token) and `positions` [B, T] (RoPE
          positions) are optional; without them the mask is `ids != config.pad_id` and the
          positions count from each row's first real token (left or right padding alike). A
          is summed over the real positions (all if `config.metric_includes_pad`).
        - `cache` (an `InferenceCache`) with `slots` (the cache slots of the rows; None: all
          slots): the first call on fresh slots fixes their A and G_LM (kept as the cache's
          mode says); with a KV part the new keys/values are written at each slot's own
          length and attended to with the slot's past, through fixed-size buffers.
        - `logits_to_keep=n > 0` computes the logits of the last n positions only.

        A forward is `describe` (one immutable description of the call, from the inputs and
        the cache's host-side slot state), `run` (the layers) and `cache.advance`. Uncached
        calls check the ids' values (one device sync); cached calls check shapes only,
        their callers (`generate`, `Engine`) check values at the API edge. `pads`
        True/False says the caller checked the ids itself and whether they hold pad ids (the
        trainer, whose loader built them): no value is read back, so a training step does
        not wait on the device."""
        B, T, found = self._check_inputs(ids, attention_mask, positions, cache, slots,
                                         pads is None)
        pads = found if pads is None else bool(pads) and attention_mask is None
        call = self.describe(ids, attention_mask=attention_mask, positions=positions,
                             cache=cache, slots=slots, deductive=return_deductive, pads=pads)
        out = self.run(ids, call, logits_to_keep=logits_to_keep)
        if cache is not None:
            cache.advance(slots, T)
        return out

    def describe(self, ids: Tensor, *, attention_mask: Tensor | None = None,
                 positions: Tensor | None = None, cache: InferenceCache | None = None,
                 slots: Sequence[int] | None = None, deductive: bool = False,
                 pads: bool = True) -> AttentionCall:
        """The description of a call on ids [B, T] (`pldr.model.call`), built before any
        layer runs; `pads`: whether the ids may hold pad ids (a KV call always checks)."""
        kv = cache is not None and cache.has_kv
        if attention_mask is not None:
            real = attention_mask.to(torch.bool)                           # [B, T]
        else:
            real = ids != self.config.pad_id if (pads or kv) else None
        return describe(real, *ids.shape, device=ids.device, max_seq_len=self.config.max_seq_len,
                        own_G=self.own_G_LM(), metric_pads=self.config.metric_includes_pad,
                        cache=cache, slots=slots, deductive=deductive, positions=positions)

    def run(self, ids: Tensor, call: AttentionCall, *, logits_to_keep: int = 0) -> PLDROutput:
        """The layers and the output head on ids [B, T] as `call` describes (no host state:
        what a compiled decode step runs)."""
        cfg = self.config
        cos_table, sin_table = self.rope_tables(ids.device)                # [max_seq_len, dk/2]
        cos, sin = cos_table[call.positions], sin_table[call.positions]    # [B, T, dk/2]
        x = self.decoder.embedding(ids)
        x = self.decoder.layernorm1(scale_embedding(x, cfg.d_model))       # [B, T, D]
        layer_outputs = []
        for layer in self.decoder.dec_layers:
            x, ded = layer(x, cos, sin, call)
            layer_outputs.append(ded)
        head_in = x[:, -logits_to_keep:] if logits_to_keep > 0 else x
        logits = self.final_layer(head_in).contiguous()  # a transposed view for a few rows
        return PLDROutput(logits=logits, hidden=x,
                          deductive=Deductive.stack(layer_outputs) if call.deductive else None)

    def own_G_LM(self) -> list[Tensor] | None:
        """A v510G model's fixed G_LM buffers, one [H, dk, dk] per layer (None for v510)."""
        if self.config.variant != "v510G":
            return None
        return [layer.mha1.G_LM for layer in self.decoder.dec_layers]

    def _check_inputs(self, ids: Tensor, attention_mask: Tensor | None,
                      positions: Tensor | None, cache: InferenceCache | None,
                      slots: Sequence[int] | None, values: bool = True) -> tuple[int, int, bool]:
        """Reject what would otherwise fail deep inside torch, with a message that says why.
        Returns B, T and whether the ids hold pads (known only for uncached calls without a
        mask: the one device sync, skipped when `values` is False; cached calls are checked
        by their caller)."""
        if not isinstance(ids, Tensor):
            raise PLDRTypeError(f"ids must be a LongTensor [B, T], got {type(ids).__name__}")
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise PLDRTypeError(f"ids must be integer token ids, got dtype {ids.dtype}; "
                                "convert with ids.long()")
        if ids.dim() != 2:
            raise PLDRError(f"ids must have shape [B, T], got {list(ids.shape)}"
                            + ("; add a batch dimension with ids[None]" if ids.dim() == 1 else ""))
        B, T = ids.shape
        if B == 0 or T == 0:
            raise PLDRError(f"ids is empty (shape {list(ids.shape)}); give at least one token")
        for name, t in (("attention_mask", attention_mask), ("positions", positions)):
            if t is not None and (not isinstance(t, Tensor) or tuple(t.shape) != (B, T)):
                raise PLDRError(f"{name} must be a tensor of the shape of ids {[B, T]}, got "
                                f"{list(getattr(t, 'shape', [])) or type(t).__name__}")
        if positions is not None and positions.is_floating_point():
            raise PLDRTypeError("positions must be integers; convert with positions.long()")
        if cache is not None:
            rows = cache.slots if slots is None else len(slots)
            if rows != B:
                raise PLDRError(f"the cache call has {rows} slots but ids has {B} rows")
            if cache.has_kv:
                return B, T, False
        if T > self.config.max_seq_len:
            raise PLDRError(f"{T} positions do not fit: max_seq_len is "
                            f"{self.config.max_seq_len}; shorten the input")
        if not values:
            return B, T, False
        V, pad = self.config.vocab_size, self.config.pad_id
        lo, hi, n_pad = torch.stack([*torch.aminmax(ids), (ids == pad).sum()]).tolist()
        if lo < 0 or hi >= V:
            bad = lo if lo < 0 else hi
            raise PLDRError(f"token id {bad} is outside the vocabulary [0, {V}); check the "
                            "tokenizer matches the model")
        return B, T, n_pad > 0 and attention_mask is None

    # ----- helpers ---------------------------------------------------------------------------

    def set_activation_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each decoder layer's activations in backward instead of keeping them
        (torch.utils.checkpoint, non-reentrant): training memory holds one layer's
        activations at a time, for about one more forward of compute. Uncached calls with
        gradients only; the results and gradients are those of the plain forward."""
        for layer in self.decoder.dec_layers:
            layer.checkpointed = bool(enabled)

    def rope_tables(self, device: torch.device | str) -> tuple[Tensor, Tensor]:
        """float32 cos and sin tables [max_seq_len, dk/2] on `device`, built once per device."""
        device = torch.device(device)
        if device not in self._rope:
            c = self.config
            self._rope[device] = tuple(t.to(device) for t in
                                       rope_tables(c.dk, c.max_seq_len, c.rope_base))
        return self._rope[device]

    @property
    def device(self) -> torch.device:
        return self.decoder.embedding.weight.device  # never quantised (model/quantize.py)

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.embedding.weight.dtype

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def save_pretrained(self, directory, tokenizer=None) -> None:
        """Write `config.json` + `model.safetensors` (+ `tokenizer.model`) to `directory`."""
        save_pretrained(self, directory, tokenizer=tokenizer)


@torch.no_grad()
def infer_G_LM(model: PLDRModel, ids: Tensor) -> list[Tensor]:
    """The G_LM that a v510 model infers from ids [T] or [B, T]: a list of L tensors
    [1, H, dk, dk] (averaged over the batch when B > 1), the format of `load_G_LM`."""
    if model.config.variant != "v510":
        raise PLDRError("infer_G_LM needs a v510 model (a v510G model's G_LM is fixed: "
                        "read model's G_LM buffers instead)")
    if isinstance(ids, Tensor) and ids.dim() == 1:
        ids = ids[None]
    out = model(ids.to(model.device), return_deductive=True)
    G = out.deductive.G_LM.mean(dim=1, keepdim=True)  # [L, 1, H, dk, dk]
    return list(G.unbind(0))


def to_v510G(model: PLDRModel, G_LM: Tensor | Sequence[Tensor]) -> PLDRModel:
    """The v510Gi ablation: a v510G model that shares every weight of a v510 `model` (no
    copy) and uses the given G_LM, e.g. `infer_G_LM(model, ids)`."""
    config = model.config.replace(variant="v510G")
    with torch.device("meta"):
        g_model = PLDRModel(config, G_LM=G_LM)
    shared = {k: v for k, v in model.state_dict().items() if k in g_model.state_dict()}
    G = GivenG.check(G_LM, config).G_LM.to(device=model.device, dtype=model.dtype)
    for i in range(config.num_layers):
        shared[f"decoder.dec_layers.{i}.mha1.G_LM"] = G[i]
    g_model.load_state_dict(shared, strict=True, assign=True)
    return g_model.train(model.training)


def parameter_count(config: PLDRConfig) -> int:
    """Elements of the parameters and buffers of a model of `config`, exactly, without
    memory: the model is built on the meta device (for the memory estimate before a run)."""
    with torch.device("meta"):
        model = PLDRModel(config)
    return sum(t.numel() for t in (*model.parameters(), *model.buffers()))
