"""Split slices of a source, as `train[:90%]` or `train[100:2000]`, and the default
train/validation pair: the one syntax every data source understands.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import DataError

if TYPE_CHECKING:  # `datasets` takes a second to import; only structured data needs it.
    pass


DEFAULT_TRAIN_SPLIT = "train[:90%]"  # build_loaders without a split trains on this ...
DEFAULT_VAL_SPLIT = "train[90%:]"  # ... and validates on this held-out tail
_SPLIT_RE = re.compile(r"^(?P<name>\w+)"
                       r"(?:\[(?P<start>[^:\]]*):(?P<stop>[^:\]]*)\])?$")


_BOUND_RE = re.compile(r"^-?\d+(?:\.\d+)?%?$")


@dataclass(frozen=True)
class Split:
    """A split name and an optional slice of its documents: `train`, `train[:90%]`,
    `train[90%:95%]`, `train[:1000]`, `train[-5%:]` (Hugging Face `datasets` syntax).

    Percent boundaries round to the nearest document as `datasets` does, so a slice selects
    the same documents from every source."""

    name: str
    start: str = ""  # as written: "", "1000", "-5", "90%", "2.5%"
    stop: str = ""

    def __str__(self) -> str:
        if not self.start and not self.stop:
            return self.name
        return f"{self.name}[{self.start}:{self.stop}]"

    def bounds(self, n: int) -> tuple[int, int]:
        """The slice [start, stop) of a split with `n` documents, clipped to [0, n]."""
        start = _resolve_bound(self.start, n, default=0)
        stop = _resolve_bound(self.stop, n, default=n)
        return start, max(start, stop)


def parse_split(text: str | Split | None) -> Split:
    """Parse a split such as `train[:90%]`; None means all of `train`."""
    if text is None:
        return Split("train")
    if isinstance(text, Split):
        return text
    m = _SPLIT_RE.match(text.replace(" ", ""))
    bounds = [(m.group(k) or "").replace("_", "") for k in ("start", "stop")] if m else []
    if not m or any(b and not _BOUND_RE.match(b) for b in bounds):
        raise DataError(f"split {text!r} is not valid; write NAME or NAME[START:STOP] with "
                        "document counts or percentages, e.g. train, train[:90%], "
                        "train[90%:95%], train[:1000]")
    if bounds[0] and bounds[1] and bounds[0].endswith("%") != bounds[1].endswith("%"):
        raise DataError(f"split {text!r} mixes a percentage and a count; use one kind for both "
                        "boundaries")
    return Split(m.group("name"), bounds[0], bounds[1])


def _resolve_bound(bound: str, n: int, default: int) -> int:
    """One slice boundary as a document index: counts as they are, percents rounded to the
    nearest document, negatives from the end (as Python and `datasets` do)."""
    if not bound:
        return default
    if bound.endswith("%"):
        value = int(round(float(bound[:-1]) * n / 100.0))
    else:
        value = int(bound)
    if value < 0:
        value = max(n + value, 0)
    return min(value, n)


def default_splits(split: str | None, val_split: str | None) -> tuple[str, str | None]:
    """The (training, validation) splits to read: without `split`, `train[:90%]` and the
    held-out tail `train[90%:]`; with `split`, `val_split` only if given. A validation split
    of None, "" or "none" means no validation."""
    if split is None:
        split = DEFAULT_TRAIN_SPLIT
        val_split = DEFAULT_VAL_SPLIT if val_split is None else val_split
    if val_split is not None and val_split.strip().lower() in ("", "none"):
        val_split = None
    return split, val_split
