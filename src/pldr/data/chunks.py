"""Chunking as the original does it: a group of documents concatenated and cut into
`context_length + 1` token chunks in one of three modes (`pack`, `pad`, `nopad`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np

from ..errors import DataError
from .tokens import TokenizedDocs

if TYPE_CHECKING:  # `datasets` takes a second to import; only structured data needs it.
    pass


PAD_ID = 0  # the default pad id (the paper's tokenizer); give config.pad_id for another
MODES = ("pack", "pad", "nopad")


def chunk_spans(offsets: np.ndarray, chunk_len: int, mode: str = "pack",
                group_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Start and length of each chunk of documents laid end to end (the original's grouping).

    Documents are taken `group_size` at a time (None: all in one group); each group is
    concatenated and cut into chunks of `chunk_len` tokens. The modes differ in the last,
    short piece of a group:
    - `pack`: it carries over into the next group, which is the same as cutting the whole
      token stream; the short remainder at the very end of the data is dropped.
    - `pad`: it is padded with 0 to `chunk_len` (lengths report the real tokens).
    - `nopad`: it is left short.
    A piece of a single token has no target to predict and is dropped in every mode.
    Returns int64 `starts` and int64 `lengths` (real tokens, <= chunk_len)."""
    check_chunking(chunk_len, mode, group_size)
    offsets = np.asarray(offsets, dtype=np.int64)
    if mode == "pack":
        count = int(offsets[-1] - offsets[0]) // chunk_len
        starts = offsets[0] + np.arange(count, dtype=np.int64) * chunk_len
        return starts, np.full(count, chunk_len, dtype=np.int64)
    bounds = offsets[::group_size] if group_size else offsets[:1]
    if bounds[-1] != offsets[-1] or len(bounds) == 1:
        bounds = np.append(bounds, offsets[-1])
    sizes = np.diff(bounds)
    counts = -(-sizes // chunk_len)  # chunks per group, the last one possibly short
    first = np.repeat(np.cumsum(counts) - counts, counts)
    within = np.arange(int(counts.sum()), dtype=np.int64) - first
    starts = np.repeat(bounds[:-1], counts) + within * chunk_len
    lengths = np.minimum(chunk_len, np.repeat(bounds[1:], counts) - starts)
    keep = lengths >= 2
    return starts[keep], lengths[keep]


def chunk_tokens(samples: Sequence[Sequence[int]], chunk_len: int, mode: str = "pack",
                 group_size: int | None = None, pad_id: int = PAD_ID) -> list[list[int]]:
    """`chunk_spans` on lists of ids: the chunks themselves, padded with `pad_id` (the
    model's `config.pad_id`) in `pad` mode.

    Pass `chunk_len = context_length + 1`: a model reads `chunk[:-1]` and predicts
    `chunk[1:]`."""
    docs = TokenizedDocs.from_lists(samples)
    starts, lengths = chunk_spans(docs.offsets, chunk_len, mode, group_size)
    chunks = [docs.ids[s:s + n].tolist() for s, n in zip(starts, lengths)]
    if mode == "pad":
        chunks = [c + [pad_id] * (chunk_len - len(c)) for c in chunks]
    return chunks


def check_chunking(chunk_len: int, mode: str, group_size: int | None) -> None:
    """A known mode, a chunk length of at least 2 and a positive group size (or None)."""
    if mode not in MODES:
        raise DataError(f"unknown chunking mode {mode!r}; choose one of {', '.join(MODES)}")
    if isinstance(chunk_len, bool) or not isinstance(chunk_len, int) or chunk_len < 2:
        raise DataError(f"`chunk_len` must be an integer >= 2 (context_length + 1), got "
                        f"{chunk_len!r}")
    if group_size is not None and (not isinstance(group_size, int) or group_size < 1):
        raise DataError(f"`group_size` must be a positive integer or None, got {group_size!r}")


@dataclass(frozen=True)
class Chunks:
    """Chunks as spans of a flat token array; `rows` gathers them padded with `pad_id`."""

    tokens: np.ndarray   # int32 [num_tokens]
    starts: np.ndarray   # int64 [num_chunks]
    lengths: np.ndarray  # int64 [num_chunks], real tokens of each chunk (<= chunk_len)
    chunk_len: int
    pad_id: int = PAD_ID

    @classmethod
    def from_tokens(cls, docs: TokenizedDocs, chunk_len: int, mode: str = "pack",
                    group_size: int | None = None, pad_id: int = PAD_ID) -> "Chunks":
        starts, lengths = chunk_spans(docs.offsets, chunk_len, mode, group_size)
        return cls(docs.ids, starts, lengths, chunk_len, pad_id)

    def __len__(self) -> int:
        return len(self.starts)

    def rows(self, index: Sequence[int] | np.ndarray) -> np.ndarray:
        """Chunks `index` as an int64 array [len(index), chunk_len], short ones padded."""
        out = np.full((len(index), self.chunk_len), self.pad_id, dtype=np.int64)
        for r, c in enumerate(index):
            s, n = self.starts[c], self.lengths[c]
            out[r, :n] = self.tokens[s:s + n]
        return out
