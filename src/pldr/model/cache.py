"""Inference caches, preallocated once and written in place (as in gpt-fast).

- `KVCache`: per layer the rotated keys and the values of every position seen so far, plus
  the metric tensor A that the first call (the prompt) fixed. `length` counts the positions
  filled; `key_real` marks which of them are real tokens (pads are never attended to) and
  `lead` counts each row's leading pads, so every row's positions start at its first real
  token (left padding does not shift RoPE angles).
- `GCache`: per layer A_LM and G_LM (and A, A_P for the deductive outputs) computed once and
  reused, so the metric learner and the power-law step do not run on later calls. A
  predefined G_LM is a G-cache that starts filled.

Both are plain containers: the model's forward reads and writes them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from ..config import PLDRConfig
from ..errors import PLDRError, PLDRTypeError


@dataclass
class KVCache:
    """Keys, values and the fixed metric tensor of every layer, for `batch` rows."""

    k: Tensor         # [L, B, H, S, dk] rotated keys
    v: Tensor         # [L, B, H, S, dk] values
    A: Tensor         # [L, B, H, dk, dk] metric tensor fixed by the first call
    key_real: Tensor  # [B, S] bool: position holds a real (non-pad) token
    lead: Tensor      # [B] long: leading pads of each row (its position offset)
    length: int = 0   # positions filled so far (same for every row)

    @classmethod
    def allocate(cls, config: PLDRConfig, batch_size: int, max_len: int,
                 device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32) -> "KVCache":
        """Zeroed buffers for `batch_size` rows of up to `max_len` positions."""
        if max_len > config.max_seq_len:
            raise PLDRError(f"a cache of {max_len} positions exceeds max_seq_len="
                            f"{config.max_seq_len}; shorten the prompt or max_new_tokens")
        L, H, dk = config.num_layers, config.num_heads, config.dk
        kw = dict(device=device, dtype=dtype)
        return cls(
            k=torch.zeros(L, batch_size, H, max_len, dk, **kw),
            v=torch.zeros(L, batch_size, H, max_len, dk, **kw),
            A=torch.zeros(L, batch_size, H, dk, dk, **kw),
            key_real=torch.zeros(batch_size, max_len, dtype=torch.bool, device=device),
            lead=torch.zeros(batch_size, dtype=torch.long, device=device),
        )

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]


@dataclass
class GCache:
    """A_LM and G_LM per layer (A and A_P too when known), filled once and then reused."""

    G_LM: Tensor                # [L, B or 1, H, dk, dk]
    A_LM: Tensor | None = None  # [L, B or 1, H, dk, dk]; None for a G_LM given without it
    A: Tensor | None = None     # [L, B, H, dk, dk]; None for a predefined G_LM
    A_P: Tensor | None = None
    filled: bool = False

    @classmethod
    def allocate(cls, config: PLDRConfig, batch_size: int,
                 device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32) -> "GCache":
        """An empty G-cache; the first forward that receives it fills it."""
        shape = (config.num_layers, batch_size, config.num_heads, config.dk, config.dk)
        z = lambda: torch.zeros(shape, device=device, dtype=dtype)  # noqa: E731
        return cls(A_LM=z(), G_LM=z(), A=z(), A_P=z())

    @classmethod
    def from_G_LM(cls, config: PLDRConfig, G_LM: Tensor | Sequence[Tensor],
                  A_LM: Tensor | Sequence[Tensor] | None = None,
                  device: torch.device | str | None = None,
                  dtype: torch.dtype = torch.float32) -> "GCache":
        """A filled G-cache from a predefined G_LM (per-layer list or [L, H, dk, dk])."""
        G = stack_per_layer(G_LM, config, "G_LM").to(device=device, dtype=dtype)
        if A_LM is not None:
            A_LM = stack_per_layer(A_LM, config, "A_LM").to(device=device, dtype=dtype)
        return cls(G_LM=G, A_LM=A_LM, filled=True)


def stack_per_layer(tensors: Tensor | Sequence[Tensor], config: PLDRConfig | None,
                    name: str = "G_LM") -> Tensor:
    """Per-layer [H, dk, dk] / [1, H, dk, dk] tensors (or one [L, (1,) H, dk, dk] tensor)
    as one [L, 1, H, dk, dk] tensor, with a clear error when the shapes do not fit.

    With `config` None (a file read without a model) the layers need only agree with each
    other and be square per head."""
    if isinstance(tensors, Tensor):
        items = list(tensors.unbind(0)) if tensors.dim() in (4, 5) else [tensors]
    elif isinstance(tensors, (list, tuple)):
        items = list(tensors)
    else:
        raise PLDRTypeError(f"{name} must be a tensor or a list of per-layer tensors, "
                            f"got {type(tensors).__name__}")
    if not items:
        raise PLDRError(f"{name} is empty; give one [H, dk, dk] tensor per layer")
    if config is not None and len(items) != config.num_layers:
        H, dk = config.num_heads, config.dk
        raise PLDRError(f"{name} has {len(items)} layers but the model has {config.num_layers}; "
                        f"give one [{H}, {dk}, {dk}] tensor per layer")
    out = []
    for i, t in enumerate(items):
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise PLDRTypeError(f"{name}[{i}] must be a float tensor, got "
                                f"{getattr(t, 'dtype', type(t).__name__)}")
        if t.dim() == 4 and t.shape[0] == 1:
            t = t[0]
        if config is not None:
            H, dk = config.num_heads, config.dk
            ok, need = tuple(t.shape) == (H, dk, dk), f"[{H}, {dk}, {dk}] (or [1, {H}, {dk}, {dk}])"
        elif out:
            ok, need = t.shape == out[0].shape, f"{list(out[0].shape)} like {name}[0]"
        else:
            ok, need = t.dim() == 3 and t.shape[1] == t.shape[2], "[H, dk, dk] or [1, H, dk, dk]"
        if not ok:
            raise PLDRError(f"{name}[{i}] has shape {list(t.shape)} but needs {need} per layer")
        out.append(t)
    return torch.stack(out)[:, None]  # [L, 1, H, dk, dk]
