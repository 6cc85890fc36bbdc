"""Data sources, read as one stream of documents: the built-in corpus (`builtin`, Python's
documentation topics), local files and folders (.txt, .jsonl/.json, .parquet, .csv) and
`hf:NAME[:CONFIG]` datasets, sliced by a split such as `train[:90%]`.

This is the only reader. `stream_source(data, split)` describes the documents without reading
them: what they depend on (`identity`) and the independently readable pieces they come in
(`parts`: a .txt file or a byte range of one, a parquet row group, a .jsonl/.json/.csv file,
a shard of a dataset, a range of the built-in topics). `SourceStream.documents()` reads the
parts in order; `load_documents` is that stream as a list, for corpora that fit in memory;
`pldr data prepare` hands parts to worker processes that read them themselves. A split slice
counts documents (dataset rows for `hf:`); a percentage or a slice from the end first counts
them, part by part.

A folder holding a prepared token store (`store.json`, see `store.py`) is a source of kind
`store`: it holds token ids, not documents.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import urllib.parse
from dataclasses import dataclass, field
from itertools import chain, islice
from pathlib import Path
from typing import Any, Iterator, Sequence

from ..errors import DataError, import_extra
from .formats import (TEXT_COLUMNS, dataset_documents, datasets_progress, hf_rows,
                      import_datasets, parquet_count, parquet_documents, parquet_row_groups,
                      short_error, text_documents)
from .splits import Split, parse_split

BUILTIN = "builtin"  # Python's own documentation topics, about 465 kB of text
DEFAULT_HF_DATA = "hf:tiiuae/falcon-refinedweb"  # the original's training data
STRUCTURED_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet",
                       ".csv": "csv"}  # file suffix -> reader
KNOWN_SUFFIXES = {".txt", *STRUCTURED_SUFFIXES}
STORE_MANIFEST = "store.json"  # a complete prepared token store has this file ...
STORE_PENDING = "prepare.json"    # ... an unfinished one only this



@dataclass(frozen=True)
class DataSource:
    """Where documents come from, parsed from a `data` string by `parse_source`.

    kind `builtin`: Python's documentation topics (`pydoc_data.topics`), one document each.
    kind `files`: a local file or a folder of them (.txt, .jsonl, .json, .parquet, .csv).
    kind `hf`: a Hugging Face dataset, `hf:NAME` or `hf:NAME:CONFIG` (NAME may be a folder).
    kind `store`: a folder written by `pldr data prepare` (token ids, not documents)."""

    kind: str
    name: str
    config: str | None = None

    def __str__(self) -> str:
        if self.kind == "hf":
            return f"hf:{self.name}" + (f":{self.config}" if self.config else "")
        return self.name


def parse_source(data: str | os.PathLike | DataSource) -> DataSource:
    """Parse a data spec: `builtin`, `hf:NAME[:CONFIG]`, or a path to a file or folder."""
    if isinstance(data, DataSource):
        return data
    spec = os.fspath(data)
    if not spec:
        raise DataError("no data given; set `data` to 'builtin', a file or folder, or hf:NAME")
    if spec == BUILTIN:
        return DataSource("builtin", BUILTIN)
    if spec.startswith("hf:"):
        name, _, config = spec[3:].partition(":")
        if not name:
            raise DataError(f"`data` {spec!r} names no dataset; write hf:NAME or hf:NAME:CONFIG, "
                            f"e.g. {DEFAULT_HF_DATA}")
        return DataSource("hf", name, config or None)
    path = Path(spec).expanduser()
    if not path.exists():
        raise DataError(f"`data` path {spec!r} does not exist; pass an existing file or "
                        "folder, 'builtin', or hf:NAME for a Hugging Face dataset")
    if path.is_file():
        if path.suffix.lower() not in KNOWN_SUFFIXES:
            raise DataError(f"unknown data format {path.suffix or '(no extension)'!r} of "
                            f"{str(path)!r}; use .txt (documents separated by blank lines), "
                            ".jsonl, .json, .parquet or .csv, or hf:NAME")
    elif (path / STORE_MANIFEST).is_file():
        return DataSource("store", str(path))
    elif (path / STORE_PENDING).is_file():
        raise DataError(f"`data` {spec!r} is a token store whose preparation did not finish; "
                        "finish it with the same pldr.data.prepare_store(...) call (or `pldr "
                        "data prepare` command) it was started with")
    return DataSource("files", str(path))


# ----- parts ------------------------------------------------------------------------------


@dataclass(frozen=True)
class SourcePart:
    """One independently readable piece of a source, small enough to send to a process.

    kind `builtin`: topics [start, stop) of the sorted built-in topics.
    kind `text`: bytes [start, stop) of a .txt file (stop None: to the end), cut where a
    blank line ends so that its documents are exactly the file's documents in that range.
    kind `parquet`: row group `index` of a parquet file.
    kind `json` / `csv`: one .jsonl/.json or .csv file.
    kind `hf`: shard `index` of `shards` of a dataset's split, read in streaming mode.
    `size` estimates its text in bytes (0: unknown), for grouping parts into work units."""

    kind: str
    name: str
    text_column: str | None = None
    index: int = 0
    start: int = 0
    stop: int | None = None
    shards: int = 1
    config: str | None = None
    split: str = "train"
    size: int = 0

    def units(self) -> Iterator[str | None]:
        """What a split counts, in order: documents, or for `hf` rows (a missing text is None,
        counted but not a document)."""
        if self.kind == "builtin":
            return iter(builtin_texts()[self.start:self.stop])
        if self.kind == "text":
            return text_documents(Path(self.name), self.start, self.stop)
        if self.kind == "parquet":
            return parquet_documents(Path(self.name), self.index, self.text_column)
        if self.kind in ("json", "csv"):
            return dataset_documents(Path(self.name), self.kind, self.text_column)
        ds = open_hf(DataSource("hf", self.name, self.config), self.split)
        if self.shards > 1:
            ds = ds.shard(self.shards, self.index, contiguous=True)
        return hf_rows(ds, self.text_column, str(DataSource("hf", self.name, self.config)))

    def documents(self, start: int = 0, stop: int | None = None) -> Iterator[str]:
        """The documents of units [start, stop) of this part."""
        return (u for u in islice(self.units(), start, stop) if u is not None)

    def count(self) -> int:
        """How many units this part has (parquet: from its metadata when it can)."""
        if self.kind == "builtin":
            return len(builtin_texts()[self.start:self.stop])
        if self.kind == "parquet":
            known = parquet_count(Path(self.name), self.index, self.text_column)
            if known is not None:
                return known
        return sum(1 for _ in self.units())


@dataclass(frozen=True)
class SourceStream:
    """The documents of a source and split, as a stream (nothing read yet).

    `identity` (JSON-able) changes whenever the documents may: file paths, sizes and
    modification times, the built-in text, a dataset's name, config and split, the slice and
    the text column. `parts` are the pieces in order; `documents()` reads them one after
    another, with the split's slice applied."""

    source: DataSource
    split: Split
    identity: dict[str, Any]
    parts: tuple[SourcePart, ...]
    text_column: str | None = None
    dataset: Any = field(default=None, compare=False, repr=False)  # `hf`: the opened split
    _counts: dict[int, int] = field(default_factory=dict, compare=False, repr=False)

    @property
    def sliced(self) -> bool:
        """Whether the split takes a slice (rather than all of the named split)."""
        return bool(self.split.start or self.split.stop)

    def count(self) -> int:
        """Units (documents; dataset rows for `hf:`) of the whole named split."""
        info = getattr(self.dataset, "info", None)
        splits = getattr(info, "splits", None) or {}
        if self.split.name in splits and splits[self.split.name].num_examples:
            return int(splits[self.split.name].num_examples)  # a dataset that knows its rows
        return sum(self.part_counts())

    def part_counts(self, counts: Sequence[int] | None = None) -> list[int]:
        """Each part's unit count, counted once (or as given, e.g. by worker processes)."""
        if counts is not None:
            self._counts.update(enumerate(counts))
        for i, part in enumerate(self.parts):
            if i not in self._counts:
                self._counts[i] = part.count()
        return [self._counts[i] for i in range(len(self.parts))]

    def bounds(self) -> tuple[int, int | None]:
        """The split's slice as units [start, stop) of the whole stream; counting the parts
        only when a percentage or a bound from the end needs the total."""
        if any(b.endswith("%") or b.startswith("-") for b in (self.split.start, self.split.stop)):
            return self.split.bounds(self.count())
        stop = int(self.split.stop) if self.split.stop else None
        return int(self.split.start or 0), stop

    def ranges(self, counts: Sequence[int] | None = None
               ) -> list[tuple[SourcePart, int, int | None]]:
        """(part, start, stop) in order, covering exactly the split's units; parts outside
        the slice left out. A slice needs every part's count (`counts`, or counted here)."""
        if not self.sliced:
            return [(p, 0, None) for p in self.parts]
        start, stop = self.bounds()
        out, at = [], 0
        for part, n in zip(self.parts, self.part_counts(counts)):
            a, b = max(start - at, 0), n if stop is None else min(stop - at, n)
            if a < b:
                out.append((part, a, b))
            at += n
        return out

    def documents(self) -> Iterator[str]:
        """The split's documents in order, read part by part (never all in memory). An empty
        result is a clear error: no documents at all, or a slice that selects none."""
        start, stop = self.bounds()
        units = chain.from_iterable(p.units() for p in self.parts) if self.dataset is None \
            else hf_rows(self.dataset, self.text_column, str(self.source))  # opened once
        found = False
        for unit in islice(units, start, stop):
            if unit is not None:
                found = True
                yield unit
        if not found:
            raise self._nothing()

    def _nothing(self) -> DataError:
        n = self.count()
        if n == 0 or not self.sliced:
            return DataError(f"data {str(self.source)!r} holds no documents (its files are "
                             "empty)")
        return DataError(f"split {str(self.split)!r} of {self.source} selects no documents "
                         f"(it has {n}); widen the slice")


def stream_source(data: str | os.PathLike | DataSource, split: str | Split | None = None,
                  text_column: str | None = None, *, part_bytes: int | None = None
                  ) -> SourceStream:
    """The documents of `data` and `split` as a stream (see `SourceStream`).

    `split` defaults to all of `train`; builtin data and local files have only the `train`
    split. `text_column` names the text column of structured data (default `content`, then
    `text`); plain text ignores it. `part_bytes`: cut .txt files and the built-in topics into
    parts of about this many bytes (default: one part per file), for parallel reading."""
    source, split = parse_source(data), parse_split(split)
    if source.kind == "store":
        raise store_has_no_documents(source)
    if source.kind == "hf":
        return _hf_stream(source, split, text_column)
    if split.name != "train":
        raise DataError(f"{source.name} has only the split 'train', not {split.name!r}; take "
                        f"a slice of it instead, e.g. train[90%:]")
    if source.kind == "builtin":
        texts = builtin_texts()
        identity: dict[str, Any] = {"kind": "builtin", "sha256": hash_texts(texts)}
        parts = _builtin_parts(texts, part_bytes)
    else:
        files = source_files(source)
        identity = {"kind": "files", "files": [(str(p.resolve()), p.stat().st_size,
                                                p.stat().st_mtime_ns) for p in files],
                    "text_column": text_column}
        parts = tuple(chain.from_iterable(_file_parts(p, text_column, part_bytes)
                                          for p in files))
    identity["split"] = str(split)
    return SourceStream(source, split, identity, parts, text_column)


def load_documents(data: str | os.PathLike | DataSource, split: str | Split | None = None,
                   text_column: str | None = None, *, progress: bool = False) -> list[str]:
    """The documents (texts) of a data source and split, in memory: `stream_source(...)`
    read to the end. `progress` shows `datasets`' own progress bars while it opens data."""
    with datasets_progress(progress):
        return list(stream_source(data, split, text_column).documents())


def store_has_no_documents(source: DataSource) -> DataError:
    """The error for reading documents from a prepared token store."""
    return DataError(f"`data` {source.name!r} is a prepared token store: it holds token ids, "
                     "not documents; read them with pldr.data.load_tokens or build_loaders (as "
                     "`pldr train --data DIR` does), or read the source it was prepared from")


# ----- builtin ----------------------------------------------------------------------------


def builtin_texts() -> list[str]:
    """Python's documentation topics, one document per topic, sorted by topic name."""
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


def hash_texts(texts: list[str]) -> str:
    """sha256 of a list of texts (their lengths first, so the boundaries count too)."""
    h = hashlib.sha256(json.dumps([len(t) for t in texts]).encode("utf-8"))
    h.update("\0".join(texts).encode("utf-8", "surrogatepass"))
    return h.hexdigest()


def _builtin_parts(texts: list[str], part_bytes: int | None) -> tuple[SourcePart, ...]:
    """Consecutive topics of about `part_bytes` characters each (all in one part if None)."""
    if part_bytes is None:
        return (SourcePart("builtin", BUILTIN, size=sum(map(len, texts))),)
    parts, start, size = [], 0, 0
    for i, text in enumerate(texts):
        size += len(text)
        if size >= part_bytes or i == len(texts) - 1:
            parts.append(SourcePart("builtin", BUILTIN, start=start, stop=i + 1, size=size))
            start, size = i + 1, 0
    return tuple(parts)


# ----- local files ------------------------------------------------------------------------


def source_files(source: DataSource) -> list[Path]:
    """The data files of a `files` source: the file itself, or a folder's files (recursively,
    sorted, hidden files and other extensions skipped)."""
    path = Path(source.name).expanduser()
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in
                   KNOWN_SUFFIXES and not any(part.startswith(".") for part in
                                              p.relative_to(path).parts))
    if not files:
        raise DataError(f"data folder {str(path)!r} has no .txt, .jsonl, .json, .parquet or "
                        ".csv files")
    return files


def _file_parts(path: Path, text_column: str | None,
                part_bytes: int | None) -> Iterator[SourcePart]:
    """The parts of one file: byte ranges of a .txt file, a parquet file's row groups, or
    the whole file."""
    size = path.stat().st_size
    if size == 0:
        return
    reader = STRUCTURED_SUFFIXES.get(path.suffix.lower(), "text")
    if reader == "parquet":
        for index, size in enumerate(parquet_row_groups(path)):
            yield SourcePart("parquet", str(path), text_column, index=index, size=size)
    elif reader == "text" and part_bytes is not None and size > part_bytes:
        for start in range(0, size, part_bytes):
            yield SourcePart("text", str(path), start=start, stop=start + part_bytes,
                             size=min(part_bytes, size - start))
    else:
        yield SourcePart(reader, str(path), text_column, size=size)


# ----- Hugging Face datasets ----------------------------------------------------------------


def _hf_stream(source: DataSource, split: Split, text_column: str | None) -> SourceStream:
    """A dataset split in streaming mode; its parts are its shards (files)."""
    ds = open_hf(source, split.name)
    shards = max(int(getattr(ds, "n_shards", 1) or 1), 1)
    parts = tuple(SourcePart("hf", source.name, text_column, index=i, shards=shards,
                             config=source.config, split=split.name) for i in range(shards))
    identity: dict[str, Any] = {"kind": "hf", "name": source.name, "config": source.config,
                                "split": str(split), "text_column": text_column}
    local = Path(source.name).expanduser()
    if local.is_dir():  # a local dataset changes with its files
        identity["files"] = [(str(p.relative_to(local)), p.stat().st_size, p.stat().st_mtime_ns)
                             for p in sorted(local.rglob("*")) if p.is_file()]
    return SourceStream(source, split, identity, parts, text_column, ds)


def open_hf(source: DataSource, split_name: str) -> Any:
    """`datasets.load_dataset(NAME, CONFIG, split=..., streaming=True)` with errors that say
    what to do."""
    datasets = import_datasets()
    local = Path(source.name).expanduser().is_dir()
    if not local and not _hub_offline():
        _check_hub_reachable(source)
    try:
        return datasets.load_dataset(source.name, source.config, split=split_name,
                                     streaming=True)
    except ValueError as e:
        if "split" in str(e).lower():
            raise DataError(f"{source}: Unknown split {split_name!r} ({short_error(e)})"
                            ) from None
        if "BuilderConfig" in str(e) or "Config name" in str(e):
            raise DataError(f"{source}: {short_error(e)}") from None
        raise DataError(f"could not load {source}: {short_error(e)}") from None
    except (ConnectionError, FileNotFoundError) as e:
        if local:
            hint = "check the folder's data files"
        elif _hub_offline():
            hint = ("the hub is offline (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE) and the dataset is "
                    "not in the local Hugging Face cache; run once with network access, or pass "
                    "a local file or folder")
        else:
            hint = "check the dataset name (and CONFIG) on huggingface.co and your network"
        raise DataError(f"could not load {source}: {short_error(e)}; {hint}") from None
    except Exception as e:
        raise DataError(f"could not load {source}: {short_error(e)}") from None


def _hub_offline() -> bool:
    """True when the Hugging Face libraries are set to use only their local cache."""
    datasets = import_datasets()
    if getattr(datasets.config, "HF_HUB_OFFLINE", False):
        return True
    try:
        from huggingface_hub import constants
    except ImportError:
        return False
    return bool(constants.HF_HUB_OFFLINE)


def _check_hub_reachable(source: DataSource, timeout: float = 3.0) -> None:
    """Fail in seconds, not after the hub client's half-minute of retries, without network.

    Skipped behind an HTTP(S) proxy, where a direct connection says nothing."""
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return
    try:
        from huggingface_hub import constants
        endpoint = constants.ENDPOINT
    except ImportError:
        endpoint = "https://huggingface.co"
    url = urllib.parse.urlparse(endpoint)
    host = url.hostname or "huggingface.co"
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        raise DataError(f"cannot load {source}: the Hugging Face Hub ({host}) is not reachable "
                        f"({e.strerror or e}); connect to the network, or set HF_HUB_OFFLINE=1 "
                        "HF_DATASETS_OFFLINE=1 to use a dataset already in the local cache, or "
                        "pass a local file or folder") from None


__all__ = ["DataSource", "parse_source", "SourcePart", "SourceStream", "stream_source",
           "load_documents", "BUILTIN", "DEFAULT_HF_DATA", "TEXT_COLUMNS", "STORE_MANIFEST",
           "STORE_PENDING"]


# ----- tables of labelled rows (fine-tuning) ----------------------------------------------


def load_table(data: str | os.PathLike | DataSource, split: str | Split | None = None,
               *, progress: bool = False) -> Any:
    """The rows of a structured source (.jsonl/.json/.parquet/.csv files or `hf:NAME`) and
    split as a `datasets.Dataset`, every column and its features kept (e.g. the label names
    of a ClassLabel column), for data that is more than one text per row (fine-tuning
    examples). Local files have the split `train` only; a slice such as `train[:1000]` or
    `validation[:10%]` takes part of a split."""
    source, split = parse_source(data), parse_split(split)
    datasets = import_datasets()
    if source.kind == "hf":
        what = str(source)
        if not Path(source.name).expanduser().is_dir() and not _hub_offline():
            _check_hub_reachable(source)
        load = dict(path=source.name, name=source.config, split=split.name)
    elif source.kind == "files":
        if split.name != "train":
            raise DataError(f"{source.name} has only the split 'train', not {split.name!r}; "
                            "take a slice of it instead, e.g. train[90%:]")
        files = source_files(source)
        readers = {STRUCTURED_SUFFIXES.get(p.suffix.lower(), "text") for p in files}
        if len(readers) != 1 or "text" in readers:
            raise DataError(f"data {source.name!r} must be .jsonl/.json, .parquet or .csv "
                            "files of one format (rows with named columns), not "
                            f"{', '.join(sorted(p.suffix or p.name for p in files[:3]))}")
        what = ", ".join(str(p) for p in files[:3]) + (" ..." if len(files) > 3 else "")
        load = dict(path=next(iter(readers)), data_files=[str(p) for p in files], split="train")
    else:
        raise DataError(f"data {str(source)!r} is plain text; this needs rows with named "
                        "columns: a .jsonl/.json, .parquet or .csv file, or hf:NAME")
    try:
        with datasets_progress(progress):
            ds = datasets.load_dataset(**load)
    except Exception as e:  # datasets raises many kinds; all mean "cannot read this source"
        raise DataError(f"could not read {what}: {short_error(e)}") from None
    start, stop = split.bounds(len(ds))
    if start >= stop:
        raise DataError(f"split {str(split)!r} of {what} selects no rows (it has {len(ds)}); "
                        "widen the slice")
    return ds.select(range(start, stop)) if (start, stop) != (0, len(ds)) else ds
