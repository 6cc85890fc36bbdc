"""Reading a fine-tuning split (table -> checked, encoded examples) and the resumable,
rank-sharded loader of example batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ..data.loader import EpochBatches
from ..errors import DataError
from . import tasks as T


@dataclass(frozen=True)
class Labels:
    """A head's label set: `names[i]` is class i (num_labels = len(names))."""

    names: tuple[str, ...]

    @property
    def label2id(self) -> dict[str, int]:
        return {n: i for i, n in enumerate(self.names)}


def read_split(data: str, split: str, *, progress: bool = False, param: str = "data") -> Any:
    """The rows of `data` and `split` as a `datasets.Dataset` (see pldr.data.load_table).
    `param`: the setting that named `data` (`eval_data` for the evaluation rows), so that an
    error about the source names the setting the user gave rather than load_table's `data`."""
    from ..data.sources import load_table

    try:
        return load_table(data, split, progress=progress)
    except DataError as e:
        if param == "data" or e.param != "data":
            raise
        raise type(e)(str(e).replace("`data`", f"`{param}`"), param=param) from None


def find_labels(task: str, table: Any, cols: dict[str, str], num_labels: int | None,
                given: Sequence[str] | None) -> Labels | None:
    """The label set of a head task: the model's own (`given`, a head model's id2label),
    else the label column's names (a ClassLabel, or the distinct strings), else class ids
    0 .. max + 1 (or --num-labels). None for QA and causal, which have no labels."""
    if task not in ("sequence-classification", "token-classification"):
        return None
    if given:
        return Labels(tuple(given))
    column = cols["label"] if task == "sequence-classification" else cols["tags"]
    sequence = task == "token-classification"
    names = T.label_names(table, column, sequence)
    values = table[column]
    flat = [v for row in values for v in row] if sequence and all(
        isinstance(r, list) for r in values) else list(values)
    names = names or T.string_labels(flat)
    if names is None:
        ints = [v for v in flat if isinstance(v, int) and not isinstance(v, bool)]
        if num_labels is None and any(isinstance(v, float) for v in flat):
            num_labels = 1  # float labels: a regression head
        count = num_labels or (max(ints) + 1 if ints else 0)
        if count < 1:
            role = "tags" if sequence else "label"
            raise DataError(f"column {column!r} holds no labels; check `{role}_column`")
        names = [f"LABEL_{i}" for i in range(count)]
    elif num_labels is not None and num_labels != len(names):
        raise DataError(f"`num_labels` {num_labels} does not match the {len(names)} label "
                        f"names of column {column!r} ({', '.join(names[:5])}...); drop "
                        "`num_labels`")
    return Labels(tuple(names))


def encode_split(task: str, table: Any, cols: dict[str, str], tokenizer: Any, max_len: int,
                 labels: Labels | None, stride: int | None, what: str) -> T.TaskData:
    """Every row of `table` encoded for `task` (T.encode_*), each checked: a bad row is one
    DataError naming it, before anything is written."""
    T.check_columns(table, cols, what)
    if task == "sequence-classification":
        return T.encode_sequence(table, cols, tokenizer, max_len, labels.label2id,
                                 len(labels.names), what)
    if task == "token-classification":
        return T.encode_tokens(table, cols, tokenizer, max_len, labels.label2id,
                               len(labels.names), what)
    if task == "question-answering":
        return T.encode_qa(table, cols, tokenizer, max_len, stride, what)
    return T.encode_causal(table, cols, tokenizer, max_len, what)


class ExampleBatches(EpochBatches):
    """Batches of examples (lists of `Example`, this rank's rows), walked and resumed as
    `pldr.data.TokenBatches` walks chunks (`EpochBatches`: a shuffled order per (seed,
    epoch), the global batch split over ranks, the last incomplete batch dropped)."""

    count_key = "num_examples"

    def __init__(self, examples: Sequence[T.Example], batch_size: int, *, seed: int = 0,
                 rank: int = 0, world_size: int = 1) -> None:
        self.examples = list(examples)
        super().__init__(len(self.examples), batch_size, seed=seed, rank=rank,
                         world_size=world_size)

    def batch(self, indices: np.ndarray) -> list[T.Example]:
        return [self.examples[i] for i in indices]


__all__ = ["Labels", "read_split", "find_labels", "encode_split", "ExampleBatches"]
