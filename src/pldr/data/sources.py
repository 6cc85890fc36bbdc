"""Data sources: the built-in corpus (`builtin`, Python's documentation topics), local
files and folders (.txt, .jsonl/.json, .parquet, .csv) and `hf:NAME[:CONFIG]` datasets, read
into documents and sliced by a split such as `train[:90%]` (stream.py reads the same sources one document at
a time). A folder holding a prepared token
store (`store.json`, see `store.py`) is a source of kind `store`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import urllib.parse
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

from ..errors import DataError, import_extra
from .splits import Split, parse_split
from .tokenizer import split_paragraphs

if TYPE_CHECKING:  # `datasets` takes a second to import; only structured data needs it.
    import datasets


BUILTIN = "builtin"  # Python's own documentation topics, about 465 kB of text
DEFAULT_HF_DATA = "hf:tiiuae/falcon-refinedweb"  # the original's training data
TEXT_COLUMNS = ("content", "text")  # tried in order when no text column is given
_PLAIN_SUFFIXES = {".txt"}
_STRUCTURED_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet",
                        ".csv": "csv"}  # file suffix -> `datasets` loader
STORE_MANIFEST = "store.json"  # a complete prepared token store has this file ...
STORE_PENDING = "prepare.json"    # ... an unfinished one only this


@dataclass(frozen=True)
class DataSource:
    """Where documents come from, parsed from a `--data` string by `parse_source`.

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
        raise DataError("no data given; pass `builtin`, a file or folder, or hf:NAME")
    if spec == BUILTIN:
        return DataSource("builtin", BUILTIN)
    if spec.startswith("hf:"):
        name, _, config = spec[3:].partition(":")
        if not name:
            raise DataError(f"data {spec!r} names no dataset; write hf:NAME or hf:NAME:CONFIG, "
                            f"e.g. {DEFAULT_HF_DATA}")
        return DataSource("hf", name, config or None)
    path = Path(spec).expanduser()
    if not path.exists():
        raise DataError(f"data path {spec!r} does not exist; pass an existing file or folder, "
                        "`builtin`, or hf:NAME for a Hugging Face dataset")
    if path.is_file():
        _check_suffix(path)
    elif (path / STORE_MANIFEST).is_file():
        return DataSource("store", str(path))
    elif (path / STORE_PENDING).is_file():
        raise DataError(f"{spec!r} is a token store whose preparation did not finish; run the "
                        "same `pldr data prepare` command again to complete it")
    return DataSource("files", str(path))


def _check_suffix(path: Path) -> None:
    if path.suffix.lower() not in _PLAIN_SUFFIXES | set(_STRUCTURED_SUFFIXES):
        raise DataError(f"unknown data format {path.suffix or '(no extension)'!r} of "
                        f"{str(path)!r}; use .txt (documents separated by blank lines), "
                        ".jsonl, .json, .parquet or .csv, or hf:NAME")


def _source_files(source: DataSource) -> list[Path]:
    """The data files of a `files` source: the file itself, or a folder's files (recursively,
    sorted, hidden files and other extensions skipped)."""
    path = Path(source.name).expanduser()
    if path.is_file():
        return [path]
    known = _PLAIN_SUFFIXES | set(_STRUCTURED_SUFFIXES)
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in known
                   and not any(part.startswith(".") for part in p.relative_to(path).parts))
    if not files:
        raise DataError(f"data folder {str(path)!r} has no .txt, .jsonl, .json, .parquet or "
                        ".csv files")
    return files


@dataclass(frozen=True)
class ResolvedSource:
    """A source and split made concrete: what its documents depend on, and how to read them."""

    identity: dict[str, Any]  # JSON-able; equal identities mean equal documents
    read: Callable[[], list[str]]


def load_documents(data: str | os.PathLike | DataSource, split: str | Split | None = None,
                   text_column: str | None = None, *, progress: bool = False) -> list[str]:
    """The documents (texts) of a data source and split.

    `split` defaults to all of `train`; builtin data and local files have only the `train`
    split. `text_column` names the text column of structured data (default `content`, then
    `text`); plain text ignores it."""
    return resolve_source(data, split, text_column, progress).read()


def resolve_source(data: str | os.PathLike | DataSource, split: str | Split | None,
                   text_column: str | None, progress: bool) -> ResolvedSource:
    """What the documents of `data` and `split` depend on (for the token cache's key), and
    how to read them, without reading them yet."""
    source, split = parse_source(data), parse_split(split)
    if source.kind == "store":
        raise _store_has_no_documents(source)
    if source.kind == "builtin":
        return _resolve_builtin(split)
    if source.kind == "files":
        return _resolve_files(source, split, text_column, progress)
    return _resolve_hf(source, split, text_column, progress)


def _resolve_builtin(split: Split) -> ResolvedSource:
    """Python's documentation topics, one document per topic, sorted by topic name."""
    texts = _builtin_texts()
    _check_train_only(split, BUILTIN)
    docs = _take(texts, split, BUILTIN)
    return ResolvedSource({"kind": "builtin", "sha256": _hash_texts(docs)}, lambda: docs)


def _builtin_texts() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


def _hash_texts(texts: list[str]) -> str:
    """sha256 of a list of texts (their lengths first, so the boundaries count too)."""
    h = hashlib.sha256(json.dumps([len(t) for t in texts]).encode("utf-8"))
    h.update("\0".join(texts).encode("utf-8", "surrogatepass"))
    return h.hexdigest()


def _resolve_files(source: DataSource, split: Split, text_column: str | None,
                   progress: bool) -> ResolvedSource:
    """A local file or folder; the identity is each file's path, size and mtime."""
    _check_train_only(split, source.name)
    files = _source_files(source)
    stats = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    identity = {"kind": "files", "files": stats, "split": str(split),
                "text_column": text_column}

    def read() -> list[str]:
        docs = list(chain.from_iterable(
            _read_group(group, text_column, progress) for group in _format_groups(files)))
        if not docs:
            raise DataError(f"data {source.name!r} holds no documents (its files are empty)")
        return _take(docs, split, source.name)

    return ResolvedSource(identity, read)


def _format_groups(files: list[Path]) -> Iterator[list[Path]]:
    """Runs of consecutive files with the same reader, so each run loads in one call."""
    group: list[Path] = []
    for path in files:
        if group and _reader_of(group[0]) != _reader_of(path):
            yield group
            group = []
        group.append(path)
    if group:
        yield group


def _reader_of(path: Path) -> str:
    return _STRUCTURED_SUFFIXES.get(path.suffix.lower(), "text")


def _read_text(path: Path) -> str:
    """A .txt file's text; a file that is not UTF-8 (e.g. binary) is named."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{str(path)!r} is not UTF-8 text (byte {e.start}: {e.reason}); "
                        "convert it to UTF-8 or leave it out of the data") from None


def _read_group(files: list[Path], text_column: str | None, progress: bool) -> list[str]:
    """Documents of files of one format: .txt split at blank lines, others via `datasets`."""
    reader = _reader_of(files[0])
    if reader == "text":
        return list(chain.from_iterable(split_paragraphs(_read_text(p)) for p in files))
    if all(p.stat().st_size == 0 for p in files):
        return []
    datasets = _import_datasets()
    names = ", ".join(str(p) for p in files[:3]) + (" ..." if len(files) > 3 else "")
    try:
        with _datasets_progress(progress):
            ds = datasets.load_dataset(reader, data_files=[str(p) for p in files], split="train")
    except Exception as e:  # datasets raises many kinds; all mean "cannot read this file"
        raise DataError(f"could not read {names} as {reader}: {_short(e)}") from None
    column = _pick_column(ds.column_names, text_column, names)
    return _texts(ds, column, 0, len(ds), names)


def load_table(data: str | os.PathLike | DataSource, split: str | Split | None = None,
               *, progress: bool = False) -> "datasets.Dataset":
    """The rows of a structured source (.jsonl/.json/.parquet/.csv files or `hf:NAME`) and
    split as a `datasets.Dataset`, every column and its features kept (e.g. the label names
    of a ClassLabel column), for data that is more than one text per row (fine-tuning
    examples). Local files have the split `train` only; a slice such as `train[:1000]` or
    `validation[:10%]` takes part of a split."""
    source, split = parse_source(data), parse_split(split)
    if source.kind == "hf":
        ds = _open_hf(source, split.name, progress)
        what = str(source)
    elif source.kind == "files":
        _check_train_only(split, source.name)
        files = _source_files(source)
        readers = {_reader_of(p) for p in files}
        if len(readers) != 1 or "text" in readers:
            raise DataError(f"data {source.name!r} must be .jsonl/.json, .parquet or .csv "
                            "files of one format (rows with named columns), not "
                            f"{', '.join(sorted(p.suffix or p.name for p in files[:3]))}")
        datasets = _import_datasets()
        what = ", ".join(str(p) for p in files[:3]) + (" ..." if len(files) > 3 else "")
        try:
            with _datasets_progress(progress):
                ds = datasets.load_dataset(next(iter(readers)),
                                           data_files=[str(p) for p in files], split="train")
        except Exception as e:  # datasets raises many kinds; all mean "cannot read this file"
            raise DataError(f"could not read {what} as {next(iter(readers))}: {_short(e)}") \
                from None
    else:
        raise DataError(f"data {str(source)!r} is plain text; this needs rows with named "
                        "columns: a .jsonl/.json, .parquet or .csv file, or hf:NAME")
    start, stop = split.bounds(len(ds))
    if start >= stop:
        raise _empty_split(split, what, len(ds))
    return ds.select(range(start, stop)) if (start, stop) != (0, len(ds)) else ds


def _resolve_hf(source: DataSource, split: Split, text_column: str | None,
                progress: bool) -> ResolvedSource:
    """A Hugging Face dataset (hub name or local folder); the identity is its fingerprint."""
    ds = _open_hf(source, split.name, progress)
    column = _pick_column(ds.column_names, text_column, str(source))
    start, stop = split.bounds(len(ds))
    if start >= stop:
        raise _empty_split(split, str(source), len(ds))
    identity = {"kind": "hf", "name": source.name, "config": source.config,
                "split": split.name, "rows": [start, stop], "column": column,
                "fingerprint": getattr(ds, "_fingerprint", None)}
    return ResolvedSource(identity, lambda: _texts(ds, column, start, stop, str(source)))


def _open_hf(source: DataSource, split_name: str, progress: bool,
             streaming: bool = False) -> "datasets.Dataset":
    """`datasets.load_dataset(NAME, CONFIG, split=...)` with errors that say what to do."""
    datasets = _import_datasets()
    local = Path(source.name).expanduser().is_dir()
    if not local and not _hub_offline():
        _check_hub_reachable(source)
    try:
        with _datasets_progress(progress):
            return datasets.load_dataset(source.name, source.config, split=split_name,
                                         streaming=streaming)
    except ValueError as e:
        if "Unknown split" in str(e) or "BuilderConfig" in str(e) or "Config name" in str(e):
            raise DataError(f"{source}: {_short(e)}") from None
        raise DataError(f"could not load {source}: {_short(e)}") from None
    except (ConnectionError, FileNotFoundError) as e:
        if local:
            hint = "check the folder's data files"
        elif _hub_offline():
            hint = ("the hub is offline (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE) and the dataset is "
                    "not in the local Hugging Face cache; run once with network access, or pass "
                    "a local file or folder")
        else:
            hint = "check the dataset name (and CONFIG) on huggingface.co and your network"
        raise DataError(f"could not load {source}: {_short(e)}; {hint}") from None
    except Exception as e:
        raise DataError(f"could not load {source}: {_short(e)}") from None


def _hub_offline() -> bool:
    """True when the Hugging Face libraries are set to use only their local cache."""
    datasets = _import_datasets()
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


def _import_datasets() -> Any:
    return import_extra("datasets", "data", "reading .jsonl/.json/.parquet/.csv or hf: data")


@contextlib.contextmanager
def _datasets_progress(enabled: bool) -> Iterator[None]:
    """Show or hide `datasets`' own progress bars for one call, then restore the setting."""
    import datasets

    was_enabled = datasets.is_progress_bar_enabled()
    (datasets.enable_progress_bars if enabled else datasets.disable_progress_bars)()
    try:
        yield
    finally:
        (datasets.enable_progress_bars if was_enabled else datasets.disable_progress_bars)()


def _pick_column(columns: Sequence[str], text_column: str | None, what: str) -> str:
    """The text column: the one asked for, else `content`, else `text`."""
    candidates = [text_column] if text_column else list(TEXT_COLUMNS)
    for name in candidates:
        if name in columns:
            return name
    asked = repr(text_column) if text_column else " or ".join(map(repr, TEXT_COLUMNS))
    raise DataError(f"{what} has no text column {asked}; its columns are "
                    f"{', '.join(map(str, columns))}: name one as text_column (--text-column)")


def _texts(ds: "datasets.Dataset", column: str, start: int, stop: int, what: str) -> list[str]:
    """Rows [start, stop) of a text column as strings; missing (null) values are skipped."""
    values = ds.with_format("arrow")[start:stop].column(column).to_pylist()
    bad = next((v for v in values if v is not None and not isinstance(v, str)), None)
    if bad is not None:
        raise DataError(f"column {column!r} of {what} holds {type(bad).__name__} values, not "
                        "text; name a text column as text_column (--text-column)")
    return [v for v in values if v is not None]


def _check_train_only(split: Split, what: str) -> None:
    if split.name != "train":
        raise DataError(f"{what} has only the split 'train', not {split.name!r}; take a slice "
                        f"of it instead, e.g. train[90%:]")


def _take(docs: list[str], split: Split, what: str) -> list[str]:
    start, stop = split.bounds(len(docs))
    if start >= stop:
        raise _empty_split(split, what, len(docs))
    return docs[start:stop]


def _empty_split(split: Split, what: str, n: int) -> DataError:
    return DataError(f"split {str(split)!r} of {what} selects no documents (it has {n}); "
                     "widen the slice")


def _short(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) < 300 else text[:297] + "..."


def _store_has_no_documents(source: DataSource) -> DataError:
    return DataError(f"{source.name!r} is a prepared token store: it holds token ids, not "
                     "documents; train on it directly (`pldr train --data DIR`), or read the "
                     "source it was prepared from")
