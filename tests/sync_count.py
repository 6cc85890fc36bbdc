"""Counting host reads of tensor values: what would be a host-device sync on a GPU.

On a GPU the host waits for the device whenever Python needs a value a kernel computed:
`.item()`, `int()`/`float()`/`bool()` of a tensor, `.tolist()`, `.numpy()`, a copy to the
CPU, and ops whose output shape depends on the data (`nonzero`, boolean-mask indexing). On a
CPU nothing waits, so `SyncCounter` counts the reads themselves: every aten op that hands a
value to the host (`_local_scalar_dense`, under `.item()`, `bool()` and `is_nonzero`;
`equal`), every data-dependent shape, every copy from a non-CPU device to the CPU, and the
Python-level readers that bypass the dispatcher (`Tensor.tolist`, `Tensor.numpy`). Run under
it on the CPU, a loop that counts 0 reads does not sync on a GPU either.

    with SyncCounter(label=lambda: trainer.step) as syncs:
        ...
    syncs.count, syncs.by_label()   # how many, and how many under each label value

`label` is read at each event, so a test can tell which step a read belonged to.
"""

from __future__ import annotations

import traceback
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

# aten ops that return a value to the host, or whose output size depends on tensor values
HOST_READS = {
    aten._local_scalar_dense.default,   # .item(), int(t), float(t), bool(t), is_nonzero
    aten.equal.default,                 # torch.equal returns a Python bool
    aten.nonzero.default,               # data-dependent shapes: the host needs the count
    aten.masked_select.default,
    aten._unique2.default,
    aten.unique_consecutive.default,
    aten.unique_dim.default,
}
# ops that a copy to the host goes through (counted when the source is not on the CPU)
COPIES = {aten._to_copy.default, aten.copy_.default}
PYTHON_READERS = ("tolist", "numpy")


@dataclass
class SyncEvent:
    """One host read: what read it, the label at that moment, and where in pldr it came
    from (the innermost frame of src/pldr, for a failing test's message)."""

    op: str
    label: Any
    where: str


@dataclass
class _State:
    events: list[SyncEvent] = field(default_factory=list)
    inside_reader: int = 0


class SyncCounter(TorchDispatchMode):
    """A dispatch mode that records every host read of tensor values (see the module
    docstring). Not re-entrant; one per `with` block."""

    def __init__(self, label: Callable[[], Any] | None = None):
        super().__init__()
        self.label = label or (lambda: None)
        self.state = _State()
        self._saved: dict[str, Any] = {}

    # ----- results ----------------------------------------------------------------------------

    @property
    def events(self) -> list[SyncEvent]:
        return self.state.events

    @property
    def count(self) -> int:
        return len(self.state.events)

    def by_label(self) -> Counter:
        """label -> number of host reads recorded under it."""
        return Counter(e.label for e in self.state.events)

    def describe(self, label: Any = ...) -> str:
        """The events (of one label, or all) as lines, for an assertion message."""
        chosen = [e for e in self.state.events if label is ... or e.label == label]
        return "\n".join(f"{e.op} at {e.where} (label {e.label!r})" for e in chosen)

    # ----- recording --------------------------------------------------------------------------

    def _record(self, op: str) -> None:
        self.state.events.append(SyncEvent(op, self.label(), _caller()))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.state.inside_reader:
            if func in HOST_READS or (func is aten.index.Tensor and _bool_index(args)):
                self._record(str(func))
            elif func in COPIES and _device_to_host(func, args, kwargs):
                self._record(str(func))
        return func(*args, **kwargs)

    def __enter__(self):
        state = self.state
        for name in PYTHON_READERS:
            original = getattr(torch.Tensor, name)
            self._saved[name] = torch.Tensor.__dict__.get(name)  # None: inherited

            def reader(t, *a, _original=original, _name=name, **k):
                if state.inside_reader:
                    return _original(t, *a, **k)
                self._record(f"Tensor.{_name}")
                state.inside_reader += 1
                try:
                    return _original(t, *a, **k)
                finally:
                    state.inside_reader -= 1

            setattr(torch.Tensor, name, reader)
        try:
            return super().__enter__()
        except BaseException:
            self._restore()
            raise

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self._restore()

    def _restore(self) -> None:
        for name, original in self._saved.items():
            if original is None:
                delattr(torch.Tensor, name)
            else:
                setattr(torch.Tensor, name, original)
        self._saved.clear()


def _bool_index(args) -> bool:
    """Whether an index op takes a boolean mask (a data-dependent shape: x[mask])."""
    return any(i is not None and i.dtype == torch.bool for i in args[1])


def _device_to_host(func, args, kwargs) -> bool:
    """Whether a copy op moves data from a non-CPU device to the CPU."""
    if func is aten.copy_.default:
        dst, src = args[0], args[1]
        return dst.device.type == "cpu" and src.device.type != "cpu"
    src = args[0]
    dst = kwargs.get("device")
    return src.device.type != "cpu" and dst is not None and torch.device(dst).type == "cpu"


def _caller() -> str:
    """The innermost frame in pldr's sources (else the innermost outside torch)."""
    frames = traceback.extract_stack()[:-3]
    for f in reversed(frames):
        if "/pldr/" in f.filename and "/tests/" not in f.filename:
            return f"{f.filename.split('/pldr/')[-1]}:{f.lineno} ({f.name})"
    for f in reversed(frames):
        if "/torch/" not in f.filename:
            return f"{f.filename}:{f.lineno} ({f.name})"
    return "?"


__all__ = ["SyncCounter", "SyncEvent", "HOST_READS"]
