"""The batch loader: chunks shuffled per epoch from a seed, split over ranks without
overlap and resumable at any batch; `build_loaders` runs the whole pipeline for a training and
a validation split.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np
import torch

from ..errors import DataError
from .chunks import Chunks, check_chunking
from .sources import DataSource, parse_source
from .splits import default_splits
from .tokenizer import Tokenizer
from .tokens import load_tokens

if TYPE_CHECKING:  # `datasets` takes a second to import; only structured data needs it.
    pass


class EpochBatches:
    """A resumable walk over `count` items in global batches; subclasses say what a batch of
    item indices is (`batch`).

    - Each epoch visits every item once in an order drawn from (seed, epoch), or in order
      when `shuffle=False`; the final incomplete batch is dropped, so `len()` is
      `count // batch_size`.
    - `batch_size` is the global batch: rank r gets rows [r*b, (r+1)*b) of every global batch,
      b = batch_size / world_size, so the ranks' rows are disjoint and, concatenated in rank
      order, equal the single-process batch. Runs on 1 or N ranks see the same data.
    - Iterating continues from the current position (`state_dict()`: epoch and step of the
      next batch) and moves it on; at the end of an epoch it moves to step 0 of the next.
      `load_state_dict` jumps to any batch without reading the ones before it. Use one
      iterator at a time; `iter_epoch` reads an epoch without touching the position (for
      validation)."""

    count_key = "count"  # the state_dict key of the item count (checked on resume)
    resume_hint = "the same data, batch size and seed"

    def __init__(self, count: int, batch_size: int, *, shuffle: bool = True, seed: int = 0,
                 rank: int = 0, world_size: int = 1) -> None:
        _check_batching(batch_size, rank, world_size)
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise DataError(f"`seed` must be a non-negative integer, got {seed!r}")
        self.count, self.batch_size, self.shuffle, self.seed = count, batch_size, shuffle, seed
        self.rank, self.world_size = rank, world_size
        self.epoch = self.step = 0

    def batch(self, indices: np.ndarray):
        """The batch of the items at `indices` (this rank's rows)."""
        raise NotImplementedError

    def __len__(self) -> int:
        """Batches per epoch."""
        return self.count // self.batch_size

    @property
    def local_batch_size(self) -> int:
        """Rows of each batch on this rank."""
        return self.batch_size // self.world_size

    def order(self, epoch: int) -> np.ndarray:
        """The item order of an epoch (the same on every rank)."""
        if not self.shuffle:
            return np.arange(self.count)
        return np.random.default_rng([self.seed, epoch]).permutation(self.count)

    def get_batch(self, step: int, epoch: int = 0, *, order: np.ndarray | None = None):
        """This rank's rows of global batch `step` of `epoch`."""
        if not 0 <= step < len(self):
            raise IndexError(f"batch {step} is out of range (an epoch has {len(self)})")
        order = self.order(epoch) if order is None else order
        first = step * self.batch_size + self.rank * self.local_batch_size
        return self.batch(order[first:first + self.local_batch_size])

    def iter_epoch(self, epoch: int = 0, start: int = 0) -> Iterator:
        """The batches of one epoch from batch `start`, leaving the position alone."""
        order = self.order(epoch)
        for step in range(start, len(self)):
            yield self.get_batch(step, epoch, order=order)

    def __iter__(self) -> Iterator:
        if self.step >= len(self):
            self.epoch, self.step = self.epoch + 1, 0
        order = self.order(self.epoch)
        while self.step < len(self):
            step = self.step
            self.step += 1  # the position of the *next* batch, for a checkpoint taken now
            yield self.get_batch(step, self.epoch, order=order)
        self.epoch, self.step = self.epoch + 1, 0

    def state_dict(self) -> dict[str, int]:
        """The position of the next batch, plus what must match when resuming."""
        return {"epoch": self.epoch, "step": self.step, "seed": self.seed,
                "batch_size": self.batch_size, self.count_key: self.count}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue at `state["epoch"]`, batch `state["step"]` (from `state_dict`)."""
        ours = self.state_dict()
        for key in ("seed", "batch_size", self.count_key):
            if key in state and state[key] != ours[key]:
                raise DataError(f"cannot resume the data loader: its saved {key} is "
                                f"{state[key]}, this one has {ours[key]}; resume with "
                                f"{self.resume_hint}")
        self.epoch, self.step = int(state["epoch"]), int(state["step"])


class TokenBatches(EpochBatches):
    """Batches of chunks as LongTensors [batch_size / world_size, chunk_len], walked as
    `EpochBatches` says."""

    count_key = "num_chunks"
    resume_hint = "the same data, tokenizer, context length, batch size and seed"

    def __init__(self, chunks: Chunks, batch_size: int, **kw) -> None:
        super().__init__(len(chunks), batch_size, **kw)
        self.chunks = chunks

    def batch(self, indices: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(self.chunks.rows(indices))


def _check_batching(batch_size: int, rank: int, world_size: int) -> None:
    """A global batch that splits evenly over `world_size` ranks, and a valid rank."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise DataError(f"`batch_size` must be a positive integer, got {batch_size!r}")
    if not isinstance(world_size, int) or world_size < 1 or not isinstance(rank, int) \
            or not 0 <= rank < world_size:
        raise DataError(f"`rank` {rank!r} / `world_size` {world_size!r} are not valid; need "
                        "0 <= rank < world_size")
    if batch_size % world_size:
        raise DataError(f"`batch_size` {batch_size} (the global batch) must be divisible by "
                        f"the number of processes {world_size}")


def build_loaders(data: str | os.PathLike | DataSource, tokenizer: Tokenizer,
                  context_length: int, batch_size: int, *, split: str | None = None,
                  val_split: str | None = None, text_column: str | None = None,
                  mode: str = "pack", batch_agg_count: int = 1, seed: int = 0, rank: int = 0,
                  world_size: int = 1, cache_dir: str | os.PathLike | None = None,
                  progress: bool = True, train_docs: Sequence[str] | None = None,
                  ) -> tuple[TokenBatches, TokenBatches | None]:
    """Training and validation loaders of [batch_size / world_size, context_length + 1].

    Without `split`, training reads `train[:90%]` and validation the held-out tail
    `train[90%:]`; with `split` given, validation reads `val_split` only if given (None or
    "none": no validation loader). Documents are grouped `batch_size * batch_agg_count` at a
    time for the `pad`/`nopad` modes, as in the original. The training loader is shuffled
    with `seed`; the validation loader is in order. `train_docs`: the training split's
    documents if the caller has read them already. `data` may be a prepared token store
    (`pldr data prepare`): it is memory-mapped, and gives the batches its source gives."""
    if isinstance(context_length, bool) or not isinstance(context_length, int) \
            or context_length < 1:
        raise DataError(f"`context_length` must be a positive integer, got {context_length!r}")
    if isinstance(batch_agg_count, bool) or not isinstance(batch_agg_count, int) \
            or batch_agg_count < 1:
        raise DataError(f"`batch_agg_count` must be a positive integer, got {batch_agg_count!r}")
    _check_batching(batch_size, rank, world_size)
    check_chunking(context_length + 1, mode, None)
    split, val_split = default_splits(split, val_split)
    group_size = batch_size * batch_agg_count

    def loader(split_: str, shuffle: bool, what: str, texts=None) -> TokenBatches:
        docs = load_tokens(data, tokenizer, split_, text_column, cache_dir=cache_dir,
                           progress=progress and rank == 0, docs=texts)
        chunks = Chunks.from_tokens(docs, context_length + 1, mode, group_size,
                                    pad_id=tokenizer.pad_id)
        batches = TokenBatches(chunks, batch_size, shuffle=shuffle, seed=seed, rank=rank,
                               world_size=world_size)
        if len(batches) == 0:
            raise DataError(f"the {what} data ({parse_source(data)}, {split_}) gives "
                            f"{len(chunks)} chunks of {context_length + 1} tokens, fewer than "
                            f"one batch of {batch_size}; use more data, a larger slice, or a "
                            "smaller batch size or context length")
        return batches

    train = loader(split, True, "training", train_docs)
    val = loader(val_split, False, "validation") if val_split is not None else None
    return train, val
