"""The inference cache of one generation run or engine: `slots` rows, preallocated once.

Two parts, one job each:

- `CacheTensors` holds tensors only, written in place so that a decode step has static
  shapes: rotated keys and values with which of them are real tokens, the metric tensor A a
  slot's prompt fixed, and its A_LM, A_P and G_LM (kept from that call, or given). Layers read
  and write it by layer; `buffers()` is the one list a compiled or CUDA-graph step pins.
- `InferenceCache` owns every slot's state, on the host (`SlotState`: positions written,
  live, fresh, whether its G_LM is given). Reading it costs no device sync, and a compiled
  step never sees it: `pldr.model.call.describe` turns it into the call's description before
  the layers run, and `advance` moves the slots on after them.

A G_LM from outside the model enters as a `GivenG`, shape-checked once where it enters. The
docs' Generation page (docs/generation.md, "The model's forward and the inference cache")
describes the modes and the invariants.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from ..config import PLDRConfig
from ..errors import PLDRError, PLDRTypeError

CACHE_MODES = ("kv_g", "kv_only", "g_only", "no_cache")


class CacheTensors:
    """Every tensor of an inference cache; row b of each is slot b."""

    def __init__(self, config: PLDRConfig, slots: int, max_len: int, kv: bool,
                 device: torch.device | str | None, dtype: torch.dtype):
        L, H, dk = config.num_layers, config.num_heads, config.dk
        kw = dict(device=device, dtype=dtype)
        self.k = torch.zeros(L, slots, H, max_len, dk, **kw) if kv else None  # [L, B, H, S, dk]
        self.v = torch.zeros(L, slots, H, max_len, dk, **kw) if kv else None  # [L, B, H, S, dk]
        self.A = torch.zeros(L, slots, H, dk, dk, **kw) if kv else None       # [L, B, H, dk, dk]
        self.key_real = torch.zeros(slots, max_len, dtype=torch.bool, device=device)  # [B, S]
        # the G part, each [L, B, H, dk, dk]; A_G is the A behind the kept G_LM
        self.G_LM, self.A_LM, self.A_G, self.A_P = (torch.zeros(L, slots, H, dk, dk, **kw)
                                                    for _ in range(4))

    def buffers(self) -> list[Tensor]:
        """The tensors a compiled step reads and writes in place (CUDA graphs need their
        addresses fixed)."""
        return [t for t in (self.k, self.v, self.A, self.key_real, self.G_LM, self.A_LM,
                            self.A_G, self.A_P) if t is not None]

    @staticmethod
    def rows(t: Tensor, rows: Tensor | None) -> Tensor:
        """t [L, B, ...] for the call's rows [L, B', ...]: t itself for every slot, else a
        copy (index_select: twice as fast as advanced indexing here)."""
        return t if rows is None else t.index_select(1, rows)

    def read(self, name: str, layer: int, rows: Tensor | None) -> Tensor:
        """One layer's `name` tensor for the call's rows [B', ...]."""
        t = getattr(self, name)[layer]
        return t if rows is None else t.index_select(0, rows)

    def write(self, name: str, layer: int, rows: Tensor | None, value: Tensor) -> None:
        """`name[layer][rows] = value`, in place."""
        t = getattr(self, name)[layer]
        if rows is None:
            t.copy_(value)
        else:
            t[rows] = value

    def write_kv(self, layer: int, rows: Tensor | None, where: Tensor, k: Tensor, v: Tensor,
                 span: int) -> tuple[Tensor, Tensor]:
        """Write one layer's new keys and values k, v [B', H, T, dk] at the cache positions
        `where` [B', T]; returns the keys and values of the rows' first `span` positions
        [B', H, span, dk] (a view when the call runs every slot)."""
        row_ix = self.row_index(rows)                                   # [B', 1]
        self.k[layer][row_ix, :, where] = k.transpose(1, 2)             # [B', T, H, dk]
        self.v[layer][row_ix, :, where] = v.transpose(1, 2)
        keys, values = self.k[layer, :, :, :span], self.v[layer, :, :, :span]
        if rows is None:
            return keys, values
        return keys.index_select(0, rows), values.index_select(0, rows)

    def row_index(self, rows: Tensor | None) -> Tensor:
        """The slot of each of a call's rows as a column [B', 1] for advanced indexing."""
        if rows is None:
            rows = torch.arange(self.key_real.shape[0], device=self.key_real.device)
        return rows[:, None]

    def zero(self, slot: int, upto: int | None = None, unless: Tensor | None = None) -> None:
        """Zero `slot` in every tensor (keys and values: the first `upto` positions). With
        `unless` (a 0-d bool on the device) a row is zeroed only where it is False, without
        reading it back. A request whose values turned NaN leaves through here: a masked-out
        NaN value still poisons attention (0 * NaN)."""
        kv_part = (slice(None), slot, slice(None), slice(0, upto))
        for t, part in ((self.k, kv_part), (self.v, kv_part),
                        *((t, (slice(None), slot)) for t in (self.A, self.G_LM, self.A_LM,
                                                             self.A_G, self.A_P))):
            if t is None:
                continue
            if unless is None:
                t[part] = 0
            else:
                t[part] = torch.where(unless, t[part], torch.zeros((), dtype=t.dtype,
                                                                   device=t.device))


@dataclass
class SlotState:
    """What the host knows of one slot; `InferenceCache` is its one owner."""

    length: int = 0           # positions written
    live: bool = True         # its lengths move on (idle slots still run in calls over all)
    fresh: bool = True        # no call yet: the next one fixes its A and G_LM
    given: bool = False       # its G_LM is given (held in CacheTensors.G_LM)
    given_A_LM: bool = False  # ... and came with its A_LM


class InferenceCache:
    """The slots of one generation run or engine: their host-side state (`state`, one
    `SlotState` per slot) and their tensors (`tensors`); see the module docstring."""

    def __init__(self, config: PLDRConfig, slots: int, max_len: int, *, kv: bool, keep_G: bool,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
                 static: bool = False):
        if kv and max_len > config.max_seq_len:
            raise PLDRError(f"a cache of {max_len} positions exceeds max_seq_len="
                            f"{config.max_seq_len}; shorten the prompt or max_new_tokens")
        from .memory import cache_memory, check_fits  # memory builds models: import late

        check_fits(cache_memory(config, slots, max_len, kv, dtype),
                   torch.device(device if device is not None else "cpu"),
                   "lower the batch (the prompts, or the engine's `max_batch`) or the "
                   "positions it holds (`max_len`, `max_new_tokens`)",
                   f"an inference cache of {slots} rows x {max_len if kv else 0} positions")
        self.config, self.slots, self.keep_G, self.static = config, slots, keep_G, static
        self.max_len = max_len if kv else 0
        self.tensors = CacheTensors(config, slots, self.max_len, kv, device, dtype)
        self.state = [SlotState() for _ in range(slots)]

    @classmethod
    def for_mode(cls, config: PLDRConfig, mode: str, slots: int, max_len: int,
                 device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32, static: bool = False) -> "InferenceCache":
        """The cache of a generation mode: a KV part for kv_g/kv_only, and computed G_LMs
        kept for kv_g/g_only (the other modes keep only given ones)."""
        if mode not in CACHE_MODES:
            raise PLDRError(f"unknown cache mode {mode!r}; choose one of {', '.join(CACHE_MODES)}")
        return cls(config, slots, max_len, kv=mode in ("kv_g", "kv_only"),
                   keep_G=mode in ("kv_g", "g_only"), device=device, dtype=dtype, static=static)

    @property
    def has_kv(self) -> bool:
        return self.tensors.k is not None

    @property
    def lengths(self) -> list[int]:
        """Positions written per slot."""
        return [s.length for s in self.state]

    @property
    def length(self) -> int:
        """The longest slot's written positions."""
        return max(self.lengths)

    def of(self, slots: Sequence[int] | None) -> list[SlotState]:
        """The states of a call's slots (None: every slot, in order)."""
        return self.state if slots is None else [self.state[s] for s in slots]

    def advance(self, slots: Sequence[int] | None, T: int) -> None:
        """After a call of T new tokens on `slots` (None: every slot, where only the live
        ones move): they hold T more positions, and none of them is fresh."""
        for s in self.of(slots):  # listed slots move even when idle; a call over all: live ones
            if self.has_kv and (s.live or slots is not None):
                s.length = min(self.max_len, s.length + T)
            s.fresh = False

    def reset(self, slot: int) -> None:
        """Empty `slot` for a new request: nothing written, no A, no G_LM; fresh and live."""
        self.state[slot] = SlotState()
        self.tensors.key_real[slot] = False

    def clear(self, slot: int) -> None:
        """Zero every tensor of `slot` (`CacheTensors.zero`)."""
        self.tensors.zero(slot)

    def release(self, slot: int) -> None:
        """Mark `slot` idle: calls over every slot (compiled steps, and eager engine steps
        while most slots are busy) still run it, but nothing it computes is used, and its
        lengths stop moving. Its G_LM stays (see `set_G_LM`)."""
        self.state[slot].live = self.state[slot].fresh = False

    def set_G_LM(self, G_LM: "GivenG | Tensor | Sequence[Tensor]",
                 A_LM: Tensor | Sequence[Tensor] | None = None, slot: int | None = None) -> None:
        """A predefined G_LM (a `GivenG`, a per-layer list or [L, H, dk, dk]) for `slot`, or
        for every slot when None: it replaces whatever G_LM the model would use (v510: the
        metric learner and power-law step; v510G: its buffer) at every call on that slot."""
        given = GivenG.check(G_LM, self.config, A_LM)
        at = slice(None) if slot is None else slice(slot, slot + 1)
        t = self.tensors
        t.G_LM[:, at] = given.G_LM[:, None].to(t.G_LM)
        if given.A_LM is not None:
            t.A_LM[:, at] = given.A_LM[:, None].to(t.A_LM)
        for s in self.state[at]:
            s.given, s.given_A_LM = True, given.A_LM is not None


@dataclass(frozen=True)
class GivenG:
    """A G_LM from outside the model's own computation (given by a caller, read from a file,
    or a v510G model's buffers) that passed the shape check: [L, H, dk, dk], with its
    [L, H, dk, dk] A_LM when one came along. Functions that take a G_LM accept one as is."""

    G_LM: Tensor
    A_LM: Tensor | None = None

    @classmethod
    def check(cls, G_LM: "GivenG | Tensor | Sequence[Tensor]", config: PLDRConfig,
              A_LM: Tensor | Sequence[Tensor] | None = None) -> "GivenG":
        """`G_LM` (and `A_LM`) checked against `config` where they enter; a `GivenG` passes
        as it is (with `A_LM`, if given, checked and attached)."""
        A = None if A_LM is None else stack_per_layer(A_LM, config, "A_LM")[:, 0]
        if isinstance(G_LM, GivenG):
            return G_LM if A is None else dataclasses.replace(G_LM, A_LM=A)
        return cls(stack_per_layer(G_LM, config, "G_LM")[:, 0], A)

    # a sequence of the per-layer [1, H, dk, dk] tensors, as `load_G_LM` returns them
    def __len__(self) -> int:
        return self.G_LM.shape[0]

    def __getitem__(self, layer: int) -> Tensor:
        return self.G_LM[layer][None]

    def __iter__(self):
        return iter(self.G_LM[:, None].unbind(0))


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
        raise PLDRError(f"{name} has {len(items)} layers but the model has "
                        f"{config.num_layers}; give one [{H}, {dk}, {dk}] tensor per layer")
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
