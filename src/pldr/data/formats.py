"""How each kind of file is read, for the one reader in `sources.py`: a .txt file or a byte
range of one (cut after a blank line, so ranges split as the whole text splits), a parquet row
group, a .jsonl/.json/.csv file through `datasets` in streaming mode; the text column and its
values checked; `datasets` imported with a clear error naming its extra."""

from __future__ import annotations

import codecs
import contextlib
import io
import os
import re
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from ..errors import DataError, import_extra
from .tokenizer import split_paragraphs

TEXT_COLUMNS = ("content", "text")  # tried in order when no text column is given
_TEXT_BLOCK = 1 << 22  # bytes of a .txt file read at a time
_BLANK_LINES = re.compile(r"\n[ \t]*\n(?:[ \t]*\n)*")  # what separates .txt documents
_ROWS = 1000  # rows of structured data read at a time


def read_text_error(path: Path, e: UnicodeDecodeError, offset: int = 0) -> DataError:
    return DataError(f"{str(path)!r} is not UTF-8 text (byte {offset + e.start}: {e.reason}); "
                     "convert it to UTF-8 or leave it out of the data")


def text_documents(path: Path, start: int, stop: int | None) -> Iterator[str]:
    """The documents of a .txt file whose first character lies in bytes [start, stop): the
    range is moved to cuts after blank lines (`_cut_at`), so ranges that tile the file give
    the file's documents exactly once, as `split_paragraphs` splits the whole text."""
    with open(path, "rb") as f:
        begin = _cut_at(f, start)
        end = None if stop is None else _cut_at(f, stop)
        if end is not None and end <= begin:
            return
        f.seek(begin)
        yield from _paragraphs(_decoded_blocks(f, path, begin, end))


_NL = rb"(?:\r\n|\r(?!\n)|\n)"  # a line break as Python's text mode reads one
_CUT = re.compile(_NL + rb"[ \t]*" + _NL + rb"(?:[ \t]*" + _NL + rb")*(?=[^ \t\r\n])")
_WHITE = b" \t\r\n"


def _cut_at(f: io.BufferedReader, offset: int) -> int:
    """The first position >= `offset` where a document may begin: 0, the end of the file,
    or a byte that is not a space, tab, CR or LF right after a blank line (two line breaks
    with only spaces or tabs between them and after the second). Cutting the text there
    splits it exactly as the whole text splits, whatever `offset` is."""
    size = os.fstat(f.fileno()).st_size
    if offset <= 0 or offset >= size:
        return min(max(offset, 0), size)
    start = offset
    while start > 0:  # back to the last document byte before offset (a blank line may end here)
        start = max(start - 4096, 0)
        f.seek(start)
        if f.read(offset - start).strip(_WHITE) or start == 0:
            break
    window = 1 << 16
    while True:
        f.seek(start)
        data = f.read(offset - start + window)
        for m in _CUT.finditer(data):
            if start + m.end() >= offset:
                return start + m.end()
        if start + len(data) >= size:
            return size
        window *= 2


def _decoded_blocks(f: io.BufferedReader, path: Path, begin: int,
                    end: int | None) -> Iterator[str]:
    """The text of bytes [begin, end) in blocks, decoded as UTF-8 with universal newlines
    (as Python's text mode reads a file)."""
    decoder = io.IncrementalNewlineDecoder(codecs.getincrementaldecoder("utf-8")(),
                                           translate=True)
    at = begin
    while end is None or at < end:
        data = f.read(_TEXT_BLOCK if end is None else min(_TEXT_BLOCK, end - at))
        try:
            yield decoder.decode(data, final=not data)
        except UnicodeDecodeError as e:
            raise read_text_error(path, e, at) from None
        if not data:
            return
        at += len(data)
    try:
        yield decoder.decode(b"", final=True)
    except UnicodeDecodeError as e:
        raise read_text_error(path, e, at) from None


def _paragraphs(blocks: Iterable[str]) -> Iterator[str]:
    """`split_paragraphs` of the concatenated `blocks`, never holding more than a block and a
    document. A block is cut at its last blank-line separator that the next block cannot
    extend (some character other than a space or tab follows it), so each piece splits
    exactly as the whole text would."""
    carry = ""
    for chunk in blocks:
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


def parquet_file(path: Path) -> Any:
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path, pre_buffer=False)
    except Exception as e:  # pyarrow's errors for a damaged or foreign file
        raise DataError(f"could not read {path} as parquet: {short_error(e)}") from None


def parquet_row_groups(path: Path) -> list[int]:
    """The uncompressed size of each row group of a parquet file."""
    meta = parquet_file(path).metadata
    return [meta.row_group(i).total_byte_size for i in range(meta.num_row_groups)]


def parquet_documents(path: Path, index: int, text_column: str | None) -> Iterator[str]:
    """The texts of one row group's text column, `_ROWS` rows at a time, nulls skipped;
    read with pyarrow without pre-buffering, so memory stays flat."""
    file = parquet_file(path)
    column = pick_column(file.schema_arrow.names, text_column, str(path))
    try:
        for rows in file.iter_batches(batch_size=_ROWS, row_groups=[index], columns=[column]):
            yield from checked_texts(rows.column(0).to_pylist(), column, str(path))
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"could not read {path} as parquet: {short_error(e)}") from None


def parquet_count(path: Path, index: int, text_column: str | None) -> int | None:
    """Non-null texts of a row group from its statistics, or None when they are missing."""
    file = parquet_file(path)
    column = pick_column(file.schema_arrow.names, text_column, str(path))
    group = file.metadata.row_group(index)
    for j in range(group.num_columns):
        chunk = group.column(j)
        if chunk.path_in_schema == column:
            stats = chunk.statistics
            if stats is not None and stats.has_null_count:
                return group.num_rows - stats.null_count
    return None


def dataset_documents(path: Path, reader: str, text_column: str | None) -> Iterator[str]:
    """The texts of a .jsonl/.json or .csv file through `datasets` in streaming mode."""
    datasets = import_datasets()
    try:
        ds = datasets.load_dataset(reader, data_files=[str(path)], split="train",
                                   streaming=True)
    except Exception as e:
        raise DataError(f"could not read {path} as {reader}: {short_error(e)}") from None
    return (t for t in hf_rows(ds, text_column, f"{path} as {reader}", read_error=True)
            if t is not None)


def hf_rows(ds: Any, text_column: str | None, what: str,
            read_error: bool = False) -> Iterator[str | None]:
    """The text column of a streaming `datasets.IterableDataset`, row by row (None where a
    row has no text; anything but text is a clear error)."""
    try:
        columns = ds.column_names
        if columns is None:  # json and csv streams know their columns only once read
            columns = list(next(iter(ds.take(1)), {}).keys())
        column = pick_column(columns, text_column, what)
        for rows in ds.select_columns([column]).iter(batch_size=_ROWS):
            values = rows[column]
            check_text(values, column, what)
            yield from values
    except DataError:
        raise
    except Exception as e:  # datasets raises many kinds; all mean "cannot read this data"
        raise DataError(f"could not read {what}: {short_error(e)}") from None


def import_datasets() -> Any:
    """The `datasets` library, or a clear error naming the extra that installs it."""
    return import_extra("datasets", "data", "reading .jsonl/.json/.parquet/.csv or hf: data")


@contextlib.contextmanager
def datasets_progress(enabled: bool) -> Iterator[None]:
    """Show or hide `datasets`' own progress bars for one block, then restore the setting
    (nothing to do when `datasets` was never imported)."""
    import sys

    datasets = sys.modules.get("datasets")
    if datasets is None:
        yield
        return
    was_enabled = datasets.is_progress_bar_enabled()
    (datasets.enable_progress_bars if enabled else datasets.disable_progress_bars)()
    try:
        yield
    finally:
        (datasets.enable_progress_bars if was_enabled else datasets.disable_progress_bars)()


# ----- columns and values -----------------------------------------------------------------


def pick_column(columns: Sequence[str], text_column: str | None, what: str) -> str:
    """The text column: the one asked for, else `content`, else `text`."""
    candidates = [text_column] if text_column else list(TEXT_COLUMNS)
    for name in candidates:
        if name in columns:
            return name
    asked = repr(text_column) if text_column else " or ".join(map(repr, TEXT_COLUMNS))
    raise DataError(f"{what} has no text column {asked}; its columns are "
                    f"{', '.join(map(str, columns))}: name one as `text_column`",
                    param="text_column")


def check_text(values: list[Any], column: str, what: str) -> None:
    bad = next((v for v in values if v is not None and not isinstance(v, str)), None)
    if bad is not None:
        raise DataError(f"column {column!r} of {what} holds {type(bad).__name__} values, not "
                        "text; name a text column as `text_column`", param="text_column")


def checked_texts(values: list[Any], column: str, what: str) -> Iterator[str]:
    """The values of a text column, nulls skipped; anything but text is a clear error."""
    check_text(values, column, what)
    return (v for v in values if v is not None)


def short_error(e: BaseException) -> str:
    """An exception as one line of at most 300 characters."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) < 300 else text[:297] + "..."
