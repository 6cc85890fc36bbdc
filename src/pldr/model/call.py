"""What one model call tells its layers, built once before the first layer runs.

`describe` reads the inputs and, for a cached call, the cache's host-side slot state, and
returns a frozen `AttentionCall`: where the new tokens go (rows, write positions, RoPE
positions), what they attend to (the attention and metric masks), and where each row's G_LM
comes from. A layer then only does arithmetic: its G_LM is in the description (`known`), or
it computes one from A (`compute`). After the layers `InferenceCache.advance` moves the slots
on. Precedence of G_LM per row: given to the cache for that slot; kept by the cache from the
slot's first call (kv_g, g_only); a v510G model's own; else computed (A from the queries,
or kv_only's A fixed in the KV-cache).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from ..errors import PLDRError
from .cache import CacheTensors, InferenceCache


@dataclass
class LayerDeductive:
    """One layer's deductive outputs, each [B, H, dk, dk] (None where not computed)."""

    A: Tensor | None
    A_LM: Tensor | None
    A_P: Tensor | None
    G_LM: Tensor


@dataclass(frozen=True)
class KnownG:
    """G_LMs known before the layers run, each indexed by layer: [L, B, H, dk, dk] (or a
    sequence of L [H, dk, dk] buffers, broadcast over the rows), with the A, A_LM, A_P behind
    them where they are reported."""

    G_LM: Tensor | Sequence[Tensor]
    A: Tensor | None = None
    A_LM: Tensor | None = None
    A_P: Tensor | None = None

    def layer(self, i: int, B: int) -> LayerDeductive:
        pick = lambda t: None if t is None else t[i]  # noqa: E731
        return LayerDeductive(pick(self.A), pick(self.A_LM), pick(self.A_P),
                              self.G_LM[i].expand(B, -1, -1, -1))


@dataclass(frozen=True)
class Compute:
    """How a layer computes G_LM from A when the description does not hold it."""

    reuse_A: bool = False           # A from the KV-cache (kv_only steps), not the queries
    keep_A: bool = False            # write A to the KV-cache (a slot's first call)
    keep_G: bool = False            # write A, A_LM, A_P, G_LM to the G-cache (first call)
    given: Tensor | None = None     # [B, 1, 1, 1] rows whose `known` G_LM and A_LM win
    report_A_LM: bool = True        # with `given`: the given rows came with their A_LM


@dataclass(frozen=True)
class AttentionCall:
    """The description of one model call, shared by every layer; see the module docstring."""

    positions: Tensor               # [B, T] RoPE positions of the new tokens
    mask: Tensor | None             # [B, 1, T, S] bool (True = attend); None: causal, no pads
    metric_mask: Tensor | None      # [B, T] positions that enter A (None: all)
    known: KnownG | None            # the rows' G_LM when known before the layers
    compute: Compute | None         # None: every row's G_LM is in `known`
    cache: CacheTensors | None = None  # where layers read and write (a cached call)
    rows: Tensor | None = None      # the call's cache slots (None: every slot, in order)
    where: Tensor | None = None     # [B, T] cache positions of the new keys (KV calls)
    span: int = 0                   # cache positions the call attends over (KV calls)
    deductive: bool = False         # the caller reads the deductive outputs


def describe(real: Tensor | None, B: int, T: int, *, device: torch.device,
             max_seq_len: int, own_G: Sequence[Tensor] | None, metric_pads: bool,
             cache: InferenceCache | None = None, slots: Sequence[int] | None = None,
             deductive: bool = False, positions: Tensor | None = None) -> AttentionCall:
    """The description of a call of B x T new tokens (`real` [B, T]: True = a real token;
    None: no pads). `own_G`: a v510G model's G_LM buffers (None for v510); `metric_pads`:
    whether pads enter A (`config.metric_includes_pad`); `positions` [B, T]: the caller's
    RoPE positions, instead of those counted from the real tokens."""
    metric_mask = real if real is not None and not metric_pads else None
    rows = _rows(cache, slots, device)
    known, compute = _G_source(cache, slots, rows, own_G, deductive)  # checks before writes
    if cache is not None and cache.has_kv:
        counted, mask, where, span = _kv_positions(cache, slots, rows, real, T, max_seq_len)
    else:
        where, span = None, 0
        if real is None:
            counted, mask = torch.arange(T, device=device)[None].expand(B, T), None
        else:
            counted = count_positions(real)
            mask = causal_mask(torch.arange(T, device=device)[None].expand(B, T), real)
    return AttentionCall(positions=counted if positions is None else positions, mask=mask,
                         metric_mask=metric_mask, known=known, compute=compute,
                         cache=None if cache is None else cache.tensors,
                         rows=rows, where=where, span=span, deductive=deductive)


def _rows(cache: InferenceCache | None, slots: Sequence[int] | None,
          device: torch.device) -> Tensor | None:
    """The call's slots as a LongTensor on the device (None: every slot)."""
    if cache is None or slots is None:
        return None
    return host_to_device(list(slots), device)


def _kv_positions(cache: InferenceCache, slots: Sequence[int] | None, rows: Tensor | None,
                  real: Tensor, T: int, max_seq_len: int):
    """A KV call: record which new keys are real; return the RoPE positions [B', T], the
    attention mask [B', 1, T, span], the cache positions the tokens are written to
    [B', T] and the span (how many cache positions the call attends over: the longest live
    slot's plus T, or all of them when the cache is static).

    RoPE positions count on from the slot's real tokens so far (its real keys below its
    length: a call that failed after this wrote nothing that counts), from the call's first
    real token. The mask (`causal_mask`) is causal in cache positions."""
    states, device = cache.of(slots), real.device
    if cache.static:
        span = cache.max_len
    else:  # idle slots of a call over every slot compute rows nobody reads: not counted
        held = max((s.length for s in states if s.live or slots is not None), default=0)
        span = min(cache.max_len, held + T)
    kv = cache.tensors
    lengths = host_to_device([s.length for s in states], device)               # [B']
    steps = torch.arange(T, device=device)
    where = (lengths[:, None] + steps).clamp(max=span - 1)                     # [B', T]
    key_real = kv.key_real if rows is None else kv.key_real.index_select(0, rows)
    below = torch.arange(key_real.shape[1], device=device) < lengths[:, None]  # [B', S]
    seen = (key_real & below).sum(dim=1)  # [B'] real tokens so far (not a failed call's)
    kv.key_real[kv.row_index(rows), where] = real
    positions = count_positions(real, start=seen)                              # [B', T]
    # a live slot stays below max_seq_len (the callers check it); an idle one that used
    # every position would index past the RoPE tables in a call over every slot
    positions = positions.clamp(max=max_seq_len - 1)
    key_real = kv.key_real[:, :span]
    key_real = key_real if rows is None else key_real.index_select(0, rows)    # [B', span]
    return positions, causal_mask(where, key_real), where, span


def _G_source(cache: InferenceCache | None, slots: Sequence[int] | None, rows: Tensor | None,
              own_G: Sequence[Tensor] | None,
              deductive: bool) -> tuple[KnownG | None, Compute | None]:
    """Where the call's G_LM comes from, per row (the precedence of the module docstring)."""
    if cache is None:
        return (None, Compute()) if own_G is None else (KnownG(own_G), None)
    states, kv = cache.of(slots), cache.tensors
    fresh = {s.fresh for s in states}
    if len(fresh) > 1:
        raise PLDRError("a call mixes fresh slots with slots that already hold tokens; "
                        "prefill fresh slots in a call of their own (`slots=[...]`)")
    fresh = fresh.pop()
    given = [s.given for s in states]
    with_A_LM = all(s.given_A_LM for s in states if s.given)
    take = lambda t: kv.rows(t, rows)  # noqa: E731  [L, B', H, dk, dk]
    if not fresh and cache.keep_G and own_G is None:  # kept (given ones were kept too)
        if not deductive:  # a listed call's gathers of A, A_LM, A_P cost 1.5x a step
            return KnownG(take(kv.G_LM)), None
        return KnownG(take(kv.G_LM), take(kv.A_G), take(kv.A_LM), take(kv.A_P)), None
    if all(given):
        return KnownG(take(kv.G_LM), A_LM=take(kv.A_LM) if with_A_LM and deductive else None), None
    mixed = host_to_device(given, kv.G_LM.device)[:, None, None, None] if any(given) else None
    if own_G is not None:  # v510G: its buffers, where no G_LM is given
        if mixed is None:
            return KnownG(own_G), None
        own = torch.stack(list(own_G))[:, None]                               # [L, 1, H, dk, dk]
        return KnownG(torch.where(mixed, take(kv.G_LM), own)), None
    kv_fresh = cache.has_kv and fresh
    return (None if mixed is None else KnownG(take(kv.G_LM), A_LM=take(kv.A_LM)),
            Compute(reuse_A=cache.has_kv and not fresh, keep_A=kv_fresh,
                    keep_G=cache.keep_G and fresh, given=mixed, report_A_LM=with_A_LM))


def host_to_device(values: list, device: torch.device) -> Tensor:
    """A small host list as a tensor on `device` (bool or int64), without waiting on the
    device: on CUDA it goes through pinned memory and copies asynchronously."""
    dtype = torch.bool if values and isinstance(values[0], bool) else torch.long
    t = torch.tensor(values, dtype=dtype)
    if torch.device(device).type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def count_positions(real: Tensor, start: Tensor | None = None) -> Tensor:
    """RoPE positions [B, T] of real [B, T]: counted from each row's first real token (plus
    `start` [B], the positions a cache already holds), so left padding shifts nothing; pads
    get a position too (as in the original), which no real token sees."""
    T = real.shape[1]
    lead = (real.cumsum(dim=1) == 0).sum(dim=1, keepdim=True)              # [B, 1]
    positions = (torch.arange(T, device=real.device)[None] - lead).clamp(min=0)
    return positions if start is None else positions + start[:, None]


def causal_mask(where: Tensor, key_real: Tensor) -> Tensor:
    """Boolean mask [B, 1, T, S] (True = attend) of queries at key positions where [B, T]
    over keys key_real [B, S] (True = a real token): causal, without pad keys. A query that
    would see no key (a pad left of every real token) sees itself, so the softmax stays
    finite; its output is never used. An uncached call's queries sit at 0..T-1."""
    k_idx = torch.arange(key_real.shape[1], device=key_real.device)
    mask = (k_idx <= where[..., None]) & key_real[:, None, :]                  # [B, T, S]
    lonely = ~mask.any(dim=-1, keepdim=True)
    return (mask | (lonely & (k_idx == where[..., None])))[:, None]
