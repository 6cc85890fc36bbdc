"""Streaming reads: the documents of any source (`sources.py`) one batch at a time, in the
order and with the filtering of `load_documents`, for corpora larger than memory. Used by
`pldr data prepare`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from itertools import chain, islice
from pathlib import Path
from typing import Any, Callable, Iterator

from ..errors import DataError
from .sources import (
    BUILTIN,
    DataSource,
    _builtin_texts,
    _check_train_only,
    _hash_texts,
    _import_datasets,
    _open_hf,
    _pick_column,
    _reader_of,
    _short,
    _source_files,
    _store_has_no_documents,
    parse_source,
)
from .splits import Split, parse_split
from .tokenizer import split_paragraphs

_TEXT_BLOCK = 1 << 22  # characters of a .txt file read at a time
_BLANK_LINES = re.compile(r"\n[ \t]*\n(?:[ \t]*\n)*")  # what separates .txt documents



@dataclass(frozen=True)
class StreamedSource:
    """A source read one document at a time: what its documents depend on (`identity`,
    JSON-able, as in `resolve_source`) and a function that starts a fresh pass over them."""

    identity: dict[str, Any]
    documents: Callable[[], Iterator[str]]


def stream_source(data: str | os.PathLike | DataSource, split: str | Split | None = None,
                  text_column: str | None = None) -> StreamedSource:
    """The documents of `data` and `split` as a stream: the same documents, in the same order,
    as `load_documents`, but never all in memory (.txt files are read in blocks, structured
    files and `hf:` datasets through `datasets` in streaming mode).

    A stream has no length, so `split` may slice by document counts (`train[:100000]`,
    `train[500:]`) but not by percentages or from the end."""
    source, split = parse_source(data), parse_split(split)
    if source.kind == "store":
        raise _store_has_no_documents(source)
    start, stop = _stream_bounds(split)
    if source.kind == "builtin":
        _check_train_only(split, BUILTIN)
        identity: dict[str, Any] = {"kind": "builtin", "sha256": _hash_texts(_builtin_texts())}
        def read() -> Iterator[str]:
            return iter(_builtin_texts())
    elif source.kind == "files":
        _check_train_only(split, source.name)
        files = _source_files(source)
        identity = {"kind": "files", "files": [(str(p.resolve()), p.stat().st_size,
                                                p.stat().st_mtime_ns) for p in files],
                    "text_column": text_column}
        def read() -> Iterator[str]:
            return chain.from_iterable(_stream_file(p, text_column) for p in files)
    else:
        ds = _open_hf(source, split.name, progress=False, streaming=True)
        identity = {"kind": "hf", "name": source.name, "config": source.config,
                    "split": split.name, "text_column": text_column}
        def read() -> Iterator[str]:
            return _stream_texts(ds, text_column, str(source))
    identity["split"] = str(split)
    return StreamedSource(identity, lambda: islice(read(), start, stop))


def _stream_bounds(split: Split) -> tuple[int, int | None]:
    """A split's slice as [start, stop) document counts, for a stream of unknown length."""
    bounds = []
    for b in (split.start, split.stop):
        if b.endswith("%") or b.startswith("-"):
            raise DataError(f"split {str(split)!r} needs the number of documents, which a "
                            "stream does not know; slice by counts from the start (e.g. "
                            f"{split.name}[:100000]), or prepare all of {split.name!r} and take "
                            "percentages when training (--split train[:90%])")
        bounds.append(int(b) if b else None)
    return bounds[0] or 0, bounds[1]


def _stream_file(path: Path, text_column: str | None) -> Iterator[str]:
    """The documents of one file, as `_read_group` gives them, read a block or a batch at a
    time."""
    reader = _reader_of(path)
    if reader == "text":
        yield from _stream_paragraphs(path)
        return
    if path.stat().st_size == 0:
        return
    if reader == "parquet":
        yield from _stream_parquet(path, text_column)
        return
    datasets = _import_datasets()
    try:
        ds = datasets.load_dataset(reader, data_files=[str(path)], split="train",
                                   streaming=True)
    except Exception as e:
        raise DataError(f"could not read {path} as {reader}: {_short(e)}") from None
    yield from _stream_texts(ds, text_column, str(path))


def _stream_paragraphs(path: Path, block: int = _TEXT_BLOCK) -> Iterator[str]:
    """`split_paragraphs` of a .txt file, reading `block` characters at a time.

    A block is cut at its last blank-line separator that the next block cannot extend (some
    character other than a space or tab follows it), so each piece splits exactly as the
    whole text would."""
    try:
        carry = ""
        with open(path, encoding="utf-8") as f:  # text mode: \r\n and \r become \n, as read_text
            while chunk := f.read(block):
                text = carry + chunk
                cut = None
                for m in _BLANK_LINES.finditer(text):
                    if text[m.end():].lstrip(" \t"):
                        cut = m
                if cut is None:
                    carry = text
                    continue
                yield from split_paragraphs(text[:cut.start()])
                carry = text[cut.end():]
        yield from split_paragraphs(carry)
    except UnicodeDecodeError as e:
        raise DataError(f"{str(path)!r} is not UTF-8 text (byte {e.start}: {e.reason}); "
                        "convert it to UTF-8 or leave it out of the data") from None


def _stream_parquet(path: Path, text_column: str | None, batch: int = 1000) -> Iterator[str]:
    """The text column of a parquet file, `batch` rows at a time, read with pyarrow without
    pre-buffering: memory stays flat whatever the file's size (`datasets`' streaming reader
    holds more of the file the larger it is)."""
    import pyarrow.parquet as pq

    try:
        file = pq.ParquetFile(path, pre_buffer=False)
        column = _pick_column(file.schema_arrow.names, text_column, str(path))
        for rows in file.iter_batches(batch_size=batch, columns=[column]):
            yield from _checked_texts(rows.column(0).to_pylist(), column, str(path))
    except DataError:
        raise
    except Exception as e:  # pyarrow's errors for a damaged or foreign file
        raise DataError(f"could not read {path} as parquet: {_short(e)}") from None


def _checked_texts(values: list[Any], column: str, what: str) -> Iterator[str]:
    """The values of a text column, nulls skipped; anything but text is a clear error."""
    bad = next((v for v in values if v is not None and not isinstance(v, str)), None)
    if bad is not None:
        raise DataError(f"column {column!r} of {what} holds {type(bad).__name__} values, not "
                        "text; name a text column (--text-column)")
    return (v for v in values if v is not None)


def _stream_texts(ds: Any, text_column: str | None, what: str,
                  batch: int = 1000) -> Iterator[str]:
    """The text column of a streaming `datasets.IterableDataset`, nulls skipped."""
    try:
        columns = ds.column_names
        if columns is None:  # json and csv streams know their columns only once read
            columns = list(next(iter(ds.take(1)), {}).keys())
        column = _pick_column(columns, text_column, what)
        for rows in ds.select_columns([column]).iter(batch_size=batch):
            yield from _checked_texts(rows[column], column, what)
    except DataError:
        raise
    except Exception as e:  # datasets raises many kinds; all mean "cannot read this data"
        raise DataError(f"could not read {what}: {_short(e)}") from None
