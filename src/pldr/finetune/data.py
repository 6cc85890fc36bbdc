"""Reading a fine-tuning split (table -> checked, encoded examples) and the resumable,
rank-sharded loader of example batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np

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


class ExampleBatches:
    """Batches of examples, as `pldr.data.TokenBatches` batches chunks: each epoch visits
    every example once in an order drawn from (seed, epoch); `batch_size` is the global
    batch and rank r takes rows [r*b, (r+1)*b) of it; the last incomplete batch is dropped;
    `state_dict()` is the position of the next batch, so a resumed run reads the same
    batches. Yields lists of `Example` (this rank's rows)."""

    def __init__(self, examples: Sequence[T.Example], batch_size: int, *, seed: int = 0,
                 rank: int = 0, world_size: int = 1) -> None:
        if batch_size % world_size:
            raise DataError(f"batch size {batch_size} must divide over {world_size} processes")
        self.examples = list(examples)
        self.batch_size, self.seed = batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.epoch = self.step = 0

    def __len__(self) -> int:
        return len(self.examples) // self.batch_size

    def order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.examples))

    def _batch(self, step: int, order: np.ndarray) -> list[T.Example]:
        b = self.batch_size // self.world_size
        first = step * self.batch_size + self.rank * b
        return [self.examples[i] for i in order[first:first + b]]

    def __iter__(self) -> Iterator[list[T.Example]]:
        if self.step >= len(self):
            self.epoch, self.step = self.epoch + 1, 0
        order = self.order(self.epoch)
        while self.step < len(self):
            step = self.step
            self.step += 1  # the position of the next batch, for a checkpoint taken now
            yield self._batch(step, order)
        self.epoch, self.step = self.epoch + 1, 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "step": self.step, "seed": self.seed,
                "batch_size": self.batch_size, "num_examples": len(self.examples)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        for key in ("seed", "batch_size", "num_examples"):
            if key in state and state[key] != self.state_dict()[key]:
                raise DataError(f"cannot resume: the checkpoint's {key} is {state[key]}, this "
                                f"run has {self.state_dict()[key]}; resume with the same data, "
                                "batch size and seed")
        self.epoch, self.step = int(state["epoch"]), int(state["step"])


__all__ = ["Labels", "read_split", "find_labels", "encode_split", "ExampleBatches"]
