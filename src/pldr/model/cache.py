"""The inference cache: one object per generation run or engine, `slots` rows of state,
preallocated once and written in place, so a decode step has static shapes.

Per slot it holds the KV part (rotated keys and values in fixed-size buffers, which of them
are real tokens, the metric tensor A its prompt fixed, the positions written and the next
RoPE position) and the G part (A_LM and G_LM per layer, from the slot's first call or given
from outside). Host-side bookkeeping of which slots are fresh, live or given a G_LM costs no
device sync. The docs' Generation page (docs/generation.md, "The model's forward and the
inference cache") describes the modes, the invariants and `static=True`.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from ..config import PLDRConfig
from ..errors import PLDRError, PLDRTypeError

CACHE_MODES = ("kv_g", "kv_only", "g_only", "no_cache")


class InferenceCache:
    """KV and G state of `slots` rows; see the module docstring."""

    def __init__(self, config: PLDRConfig, slots: int, max_len: int, *, kv: bool, keep_G: bool,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
                 static: bool = False):
        if kv and max_len > config.max_seq_len:
            raise PLDRError(f"a cache of {max_len} positions exceeds max_seq_len="
                            f"{config.max_seq_len}; shorten the prompt or max_new_tokens")
        L, H, dk = config.num_layers, config.num_heads, config.dk
        from .memory import cache_memory, check_fits  # memory builds models: import late

        check_fits(cache_memory(config, slots, max_len, kv, dtype),
                   torch.device(device if device is not None else "cpu"),
                   "lower the batch (the prompts, or the engine's `max_batch`) or the "
                   "positions it holds (`max_len`, `max_new_tokens`)",
                   f"an inference cache of {slots} rows x "
                   f"{max_len if kv else 0} positions")
        kw = dict(device=device, dtype=dtype)
        self.config, self.slots, self.keep_G, self.static = config, slots, keep_G, static
        self.max_len = max_len if kv else 0
        # KV part
        self.k = torch.zeros(L, slots, H, max_len, dk, **kw) if kv else None  # [L, B, H, S, dk]
        self.v = torch.zeros(L, slots, H, max_len, dk, **kw) if kv else None  # [L, B, H, S, dk]
        self.A = torch.zeros(L, slots, H, dk, dk, **kw) if kv else None       # [L, B, H, dk, dk]
        self.key_real = torch.zeros(slots, max_len if kv else 0, dtype=torch.bool, device=device)
        self.lengths = torch.zeros(slots, dtype=torch.long, device=device)    # [B] written
        self.seen = torch.zeros(slots, dtype=torch.long, device=device)       # [B] real tokens
        self.active = torch.ones(slots, dtype=torch.long, device=device)      # [B] 1 = live
        # G part, each [L, B, H, dk, dk]
        z = lambda: torch.zeros(L, slots, H, dk, dk, **kw)  # noqa: E731
        self.G_LM, self.A_LM, self.A_G, self.A_P = z(), z(), z(), z()
        self.given = torch.zeros(slots, dtype=torch.bool, device=device)      # [B]
        # host-side slot state (changes only in reset/release/set_G_LM and a slot's first call)
        self.fresh = [True] * slots
        self.live = [True] * slots
        self.given_host = [False] * slots
        self.given_A_LM = [False] * slots
        self.written = [0] * slots  # positions written per slot (`lengths` on the host;
        # not kept when static)
        self._n_fresh, self._n_given, self._n_given_A_LM = slots, 0, 0  # counts of the above
        self._all = torch.arange(slots, device=device)

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
        return self.k is not None

    @property
    def length(self) -> int:
        """The longest slot's written positions (a device sync: for tests and tools)."""
        return int(self.lengths.max())

    # ----- host-side slot state ------------------------------------------------------------

    def index(self, slots: Sequence[int] | None) -> Tensor | None:
        """The slot indices of a call's rows as a LongTensor on the cache's device (None:
        every slot, in order)."""
        if slots is None:
            return None
        return torch.tensor(list(slots), dtype=torch.long, device=self.lengths.device)

    def is_fresh(self, slots: Sequence[int] | None) -> bool:
        """Whether this call is the first on its slots (it fixes A and G_LM); the slots of one
        call must agree. For every slot (None) only counts are read, so a compiled decode
        step does not depend on which slots are live."""
        if slots is None:
            if self._n_fresh in (0, self.slots):
                return self._n_fresh > 0
            states = {True, False}
        else:
            states = {self.fresh[s] for s in slots}
        if len(states) > 1:
            raise PLDRError("a call mixes fresh slots with slots that already hold tokens; "
                            "prefill fresh slots in a call of their own (slots=[...])")
        return states.pop()

    def span(self, slots: Sequence[int] | None, T: int) -> int:
        """How many cache positions a call of T new tokens on `slots` attends over: the
        longest live slot's written positions plus T (all max_len when static)."""
        if self.static:
            return self.max_len
        if slots is None:  # idle slots compute rows nobody reads (their writes stay in range:
            # `begin` clamps their cache and RoPE positions), so their lengths do not count
            held = max((w for w, live in zip(self.written, self.live) if live), default=0)
        else:
            held = max(self.written[s] for s in slots)
        return min(self.max_len, held + T)

    def given_state(self, slots: Sequence[int] | None) -> tuple[bool, bool, bool]:
        """Whether any and all of the call's slots have a given G_LM, and whether every given
        one came with its A_LM."""
        if slots is None:
            n, n_A_LM, of = self._n_given, self._n_given_A_LM, self.slots
        else:
            n = sum(self.given_host[s] for s in slots)
            n_A_LM, of = sum(self.given_A_LM[s] for s in slots), len(slots)
        return n > 0, n == of, n_A_LM == n

    # ----- tensors of a call's rows --------------------------------------------------------

    @staticmethod
    def take(t: Tensor, layer: int, rows: Tensor | None) -> Tensor:
        """t[layer] for the call's rows ([B', ...]): a view for every slot, else a copy
        (index_select: twice as fast as advanced indexing here)."""
        return t[layer] if rows is None else t[layer].index_select(0, rows)

    @staticmethod
    def put(t: Tensor, layer: int, rows: Tensor | None, value: Tensor) -> None:
        """`t[layer][rows] = value`, in place."""
        if rows is None:
            t[layer].copy_(value)
        else:
            t[layer][rows] = value

    # ----- the KV part ---------------------------------------------------------------------

    def begin(self, rows: Tensor | None, real: Tensor,
              span: int) -> tuple[Tensor, Tensor, Tensor]:
        """Set up a cached call of real [B', T] (True = real token) on `rows`, attending
        over the first `span` cache positions (`span()`).

        Records which new keys are real and returns the cache positions the tokens are
        written to [B', T], their default RoPE positions [B', T] (counted on from `seen`, the
        slot's real tokens so far, from the call's first real token) and the attention mask
        [B', 1, T, span] (True = attend): causal in cache positions, pads excluded. A query
        that would see no key (a pad left of every real token) sees itself, so the softmax
        stays finite; its output is never used."""
        T, S = real.shape[1], span
        lengths = self.lengths if rows is None else self.lengths[rows]
        seen = self.seen if rows is None else self.seen[rows]
        steps = torch.arange(T, device=real.device)
        where = (lengths[:, None] + steps).clamp(max=S - 1)                 # [B', T]
        row_ix = (self._all if rows is None else rows)[:, None]              # [B', 1]
        self.key_real[row_ix, where] = real
        lead = (real.cumsum(dim=1) == 0).sum(dim=1, keepdim=True)           # [B', 1]
        positions = seen[:, None] + (steps[None] - lead).clamp(min=0)       # [B', T]
        # a live slot stays below max_seq_len (the callers check it); an idle one that used
        # every position would index past the RoPE tables in a call over every slot
        positions = positions.clamp(max=self.config.max_seq_len - 1)
        key_real = self.key_real[:, :S]
        key_real = key_real if rows is None else key_real[rows]              # [B', S]
        k_idx = torch.arange(S, device=real.device)
        mask = (k_idx <= where[..., None]) & key_real[:, None, :]            # [B', T, S]
        lonely = ~mask.any(dim=-1, keepdim=True)
        mask = mask | (lonely & (k_idx == where[..., None]))
        return where, positions, mask[:, None]

    def update(self, layer: int, k: Tensor, v: Tensor, rows: Tensor | None,
               where: Tensor, span: int) -> tuple[Tensor, Tensor]:
        """Write one layer's new keys and values k, v [B', H, T, dk] at the cache positions
        `where` [B', T] of each row; returns the keys and values of the rows' first `span`
        positions [B', H, span, dk] (a view when the call runs every slot)."""
        row_ix = (self._all if rows is None else rows)[:, None]   # [B', 1]
        self.k[layer][row_ix, :, where] = k.transpose(1, 2)       # [B', T, H, dk]
        self.v[layer][row_ix, :, where] = v.transpose(1, 2)
        keys, values = self.k[:, :, :, :span], self.v[:, :, :, :span]  # [L, B, H, span, dk]
        return self.take(keys, layer, rows), self.take(values, layer, rows)

    def advance(self, slots: Sequence[int] | None, rows: Tensor | None, real: Tensor) -> None:
        """After a call of real [B', T] on `rows`: move each live slot's lengths on, and
        mark the slots as no longer fresh."""
        if self.has_kv:
            T = real.shape[1]
            n_real = real.sum(dim=1)
            if rows is None:
                self.lengths += T * self.active
                self.seen += n_real * self.active
            else:
                self.lengths[rows] += T
                self.seen[rows] += n_real
            if not self.static:  # (static: `span` never reads it, and a compiled step
                # must not read or write per-slot host state: dynamo would guard on it)
                moved = [s for s in range(self.slots) if self.live[s]] if slots is None else slots
                for s in moved:
                    self.written[s] = min(self.max_len, self.written[s] + T)
        for s in range(self.slots) if slots is None and self._n_fresh else slots or ():
            self._set(s, fresh=False)

    # ----- slots ---------------------------------------------------------------------------

    def _set(self, slot: int, fresh: bool | None = None, given: bool | None = None,
             given_A_LM: bool | None = None) -> None:
        """Change a slot's host-side flags, keeping their counts."""
        if fresh is not None and fresh != self.fresh[slot]:
            self.fresh[slot] = fresh
            self._n_fresh += 1 if fresh else -1
        if given is not None and given != self.given_host[slot]:
            self.given_host[slot] = given
            self._n_given += 1 if given else -1
        if given_A_LM is not None and given_A_LM != self.given_A_LM[slot]:
            self.given_A_LM[slot] = given_A_LM
            self._n_given_A_LM += 1 if given_A_LM else -1

    def reset(self, slot: int) -> None:
        """Empty `slot` for a new request: nothing written, no A, no G_LM; fresh and live."""
        self.lengths[slot] = 0
        self.written[slot] = 0
        self.seen[slot] = 0
        self.key_real[slot] = False
        self.given[slot] = False
        self.active[slot] = 1
        self.live[slot] = True
        self._set(slot, fresh=True, given=False, given_A_LM=False)

    def clear(self, slot: int) -> None:
        """Zero every tensor of `slot` (keys, values, A, G parts): after a request whose
        values turned NaN, since a masked-out NaN value still poisons attention (0 * NaN)."""
        for t in (self.k, self.v, self.A, self.G_LM, self.A_LM, self.A_G, self.A_P):
            if t is not None:
                t[:, slot].zero_()

    def release(self, slot: int) -> None:
        """Mark `slot` idle: calls over every slot (compiled steps, and eager engine steps
        while most slots are busy) still run it, but nothing it computes is used, and its
        lengths stop moving. Its G_LM stays (see `set_G_LM`)."""
        self.active[slot] = 0
        self.live[slot] = False
        self._set(slot, fresh=False)

    def set_G_LM(self, G_LM: Tensor | Sequence[Tensor], A_LM: Tensor | Sequence[Tensor] | None = None,
                 slot: int | None = None) -> None:
        """A predefined G_LM (per-layer list or [L, H, dk, dk]) for `slot`, or for every slot
        when None: it replaces whatever G_LM the model would use (v510: the metric learner
        and power-law step; v510G: its buffer) at every call on that slot."""
        cfg = self.config
        G = stack_per_layer(G_LM, cfg, "G_LM").to(self.G_LM)                 # [L, 1, H, dk, dk]
        at = slice(None) if slot is None else slice(slot, slot + 1)
        self.G_LM[:, at] = G
        if A_LM is not None:
            self.A_LM[:, at] = stack_per_layer(A_LM, cfg, "A_LM").to(self.A_LM)
        self.given[at] = True
        for s in range(self.slots) if slot is None else [slot]:
            self._set(s, given=True, given_A_LM=A_LM is not None)


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
