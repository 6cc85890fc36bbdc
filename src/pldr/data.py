"""Training data: sources, tokenisation with an on-disk cache, chunking, and the batch loader.

The pipeline follows the original release (SPEC.md, "Training conventions of the original"):

1. `load_documents(data, split)` reads documents from a data source (`builtin`, a local file
   or folder, or `hf:NAME[:CONFIG]`) and takes a slice such as `train[:90%]`.
2. `load_tokens(...)` encodes every document with EOS appended (no BOS) into one flat int32
   array plus document offsets, cached on disk keyed by the data and the tokenizer.
3. `chunk_spans` / `chunk_tokens` group the documents (`group_size` of them at a time),
   concatenate each group and cut it into chunks in one of three modes: `pack`, `pad`,
   `nopad`. Chunks are `context_length + 1` tokens long: a model reads `chunk[:-1]` and
   predicts `chunk[1:]`.
4. `TokenBatches` yields LongTensor batches [B, context_length + 1] of chunks, shuffled per
   epoch from a seed, split over ranks without overlap, and resumable at any batch.

`build_loaders` does all four for a training and a validation split. This module imports
only the tokenizer, errors and files from `pldr`, never the model.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import socket
import urllib.parse
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .errors import DataError
from .files import atomic_path
from .tokenizer import Tokenizer, split_paragraphs

if TYPE_CHECKING:  # `datasets` takes a second to import; only structured data needs it.
    import datasets

PAD_ID = 0  # pads chunks and batches; the loss ignores it
BUILTIN = "builtin"  # Python's own documentation topics, about 465 kB of text
DEFAULT_HF_DATA = "hf:tiiuae/falcon-refinedweb"  # the original's training data
TEXT_COLUMNS = ("content", "text")  # tried in order when no text column is given
DEFAULT_TRAIN_SPLIT = "train[:90%]"  # build_loaders without a split trains on this ...
DEFAULT_VAL_SPLIT = "train[90%:]"  # ... and validates on this held-out tail
MODES = ("pack", "pad", "nopad")

_PLAIN_SUFFIXES = {".txt"}
_STRUCTURED_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet",
                        ".csv": "csv"}  # file suffix -> `datasets` loader
_CACHE_FORMAT = 1  # bump when the cached arrays change meaning


# ----- split syntax -----------------------------------------------------------------------

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


# ----- sources ----------------------------------------------------------------------------


@dataclass(frozen=True)
class DataSource:
    """Where documents come from, parsed from a `--data` string by `parse_source`.

    kind `builtin`: Python's documentation topics (`pydoc_data.topics`), one document each.
    kind `files`: a local file or a folder of them (.txt, .jsonl, .json, .parquet, .csv).
    kind `hf`: a Hugging Face dataset, `hf:NAME` or `hf:NAME:CONFIG` (NAME may be a folder)."""

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


# ----- reading documents ------------------------------------------------------------------


@dataclass(frozen=True)
class _Resolved:
    """A source and split made concrete: what its documents depend on, and how to read them."""

    identity: dict[str, Any]  # JSON-able; equal identities mean equal documents
    read: Callable[[], list[str]]


def load_documents(data: str | os.PathLike | DataSource, split: str | Split | None = None,
                   text_column: str | None = None, *, progress: bool = False) -> list[str]:
    """The documents (texts) of a data source and split.

    `split` defaults to all of `train`; builtin data and local files have only the `train`
    split. `text_column` names the text column of structured data (default `content`, then
    `text`); plain text ignores it."""
    return _resolve(parse_source(data), parse_split(split), text_column, progress).read()


def _resolve(source: DataSource, split: Split, text_column: str | None,
             progress: bool) -> _Resolved:
    if source.kind == "builtin":
        return _resolve_builtin(split)
    if source.kind == "files":
        return _resolve_files(source, split, text_column, progress)
    return _resolve_hf(source, split, text_column, progress)


def _resolve_builtin(split: Split) -> _Resolved:
    """Python's documentation topics, one document per topic, sorted by topic name."""
    from pydoc_data.topics import topics

    texts = [topics[k] for k in sorted(topics)]
    _check_train_only(split, BUILTIN)
    docs = _take(texts, split, BUILTIN)
    return _Resolved({"kind": "builtin", "sha256": _hash_texts(docs)}, lambda: docs)


def _hash_texts(texts: list[str]) -> str:
    """sha256 of a list of texts (their lengths first, so the boundaries count too)."""
    h = hashlib.sha256(json.dumps([len(t) for t in texts]).encode("utf-8"))
    h.update("\0".join(texts).encode("utf-8", "surrogatepass"))
    return h.hexdigest()


def _resolve_files(source: DataSource, split: Split, text_column: str | None,
                   progress: bool) -> _Resolved:
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

    return _Resolved(identity, read)


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


def _read_group(files: list[Path], text_column: str | None, progress: bool) -> list[str]:
    """Documents of files of one format: .txt split at blank lines, others via `datasets`."""
    reader = _reader_of(files[0])
    if reader == "text":
        return list(chain.from_iterable(split_paragraphs(p.read_text(encoding="utf-8"))
                                        for p in files))
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


def _resolve_hf(source: DataSource, split: Split, text_column: str | None,
                progress: bool) -> _Resolved:
    """A Hugging Face dataset (hub name or local folder); the identity is its fingerprint."""
    ds = _open_hf(source, split.name, progress)
    column = _pick_column(ds.column_names, text_column, str(source))
    start, stop = split.bounds(len(ds))
    if start >= stop:
        raise _empty_split(split, str(source), len(ds))
    identity = {"kind": "hf", "name": source.name, "config": source.config,
                "split": split.name, "rows": [start, stop], "column": column,
                "fingerprint": getattr(ds, "_fingerprint", None)}
    return _Resolved(identity, lambda: _texts(ds, column, start, stop, str(source)))


def _open_hf(source: DataSource, split_name: str, progress: bool) -> "datasets.Dataset":
    """`datasets.load_dataset(NAME, CONFIG, split=...)` with errors that say what to do."""
    datasets = _import_datasets()
    local = Path(source.name).expanduser().is_dir()
    if not local and not _hub_offline():
        _check_hub_reachable(source)
    try:
        with _datasets_progress(progress):
            return datasets.load_dataset(source.name, source.config, split=split_name)
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
    try:
        import datasets
    except ImportError:
        raise DataError("reading .jsonl/.json/.parquet/.csv or hf: data needs the `datasets` "
                        "package: pip install datasets") from None
    return datasets


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


# ----- tokenisation and its cache ---------------------------------------------------------


@dataclass(frozen=True)
class TokenizedDocs:
    """Token ids of many documents: one flat array and the offsets where each document starts.

    Document i is `ids[offsets[i]:offsets[i + 1]]` and ends with EOS."""

    ids: np.ndarray      # int32 [num_tokens]
    offsets: np.ndarray  # int64 [num_docs + 1], offsets[0] == 0, offsets[-1] == num_tokens

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> np.ndarray:
        return self.ids[self.offsets[i]:self.offsets[i + 1]]

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])

    @classmethod
    def from_lists(cls, samples: Sequence[Sequence[int]]) -> "TokenizedDocs":
        """Pack lists of ids (one per document) into the flat form."""
        lengths = np.fromiter((len(s) for s in samples), dtype=np.int64, count=len(samples))
        offsets = np.zeros(len(samples) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        ids = np.fromiter(chain.from_iterable(samples), dtype=np.int32, count=int(offsets[-1]))
        return cls(ids, offsets)

    def save(self, path: Path) -> None:
        """Write `<path>.ids.npy` and `<path>.offsets.npy`, each atomically (temporary file,
        then rename); the offsets go last, so their presence means the ids are complete."""
        _save_npy_atomic(path.with_name(path.name + ".ids.npy"), self.ids)
        _save_npy_atomic(path.with_name(path.name + ".offsets.npy"), self.offsets)

    @classmethod
    def load(cls, path: Path) -> "TokenizedDocs":
        """Read what `save` wrote; the ids are memory-mapped, not read into memory."""
        offsets = np.load(path.with_name(path.name + ".offsets.npy"), allow_pickle=False)
        ids = np.load(path.with_name(path.name + ".ids.npy"), mmap_mode="r", allow_pickle=False)
        if offsets.ndim != 1 or len(offsets) < 1 or offsets[-1] != len(ids) or offsets[0] != 0:
            raise ValueError(f"token cache {path} is inconsistent")
        return cls(ids, offsets)


def _save_npy_atomic(path: Path, array: np.ndarray) -> None:
    """`np.save` to `path` through a temporary file, so a reader never sees half an array."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array, allow_pickle=False)


def tokenize_documents(docs: Sequence[str], tokenizer: Tokenizer, *, batch_docs: int = 512,
                       progress: bool = True) -> TokenizedDocs:
    """Encode each document with EOS appended, `batch_docs` at a time (in parallel threads)."""
    parts: list[TokenizedDocs] = []
    with tqdm(total=len(docs), desc="tokenising", unit="doc", disable=not progress) as bar:
        for i in range(0, len(docs), batch_docs):
            batch = docs[i:i + batch_docs]
            parts.append(TokenizedDocs.from_lists(tokenizer.encode_batch(batch, eos=True)))
            bar.update(len(batch))
    return _concat(parts)


def _concat(parts: list[TokenizedDocs]) -> TokenizedDocs:
    if not parts:
        return TokenizedDocs(np.zeros(0, np.int32), np.zeros(1, np.int64))
    shifts = np.cumsum([0] + [p.num_tokens for p in parts[:-1]])
    offsets = np.concatenate([parts[0].offsets[:1]]
                             + [p.offsets[1:] + s for p, s in zip(parts, shifts)])
    return TokenizedDocs(np.concatenate([p.ids for p in parts]), offsets)


def token_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where tokenised data is cached: `cache_dir`, else $PLDR_CACHE_DIR, else
    $XDG_CACHE_HOME/pldr (~/.cache/pldr); the files go in its `tokens/` folder."""
    if cache_dir is None:
        cache_dir = os.environ.get("PLDR_CACHE_DIR") or \
            Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pldr"
    return Path(cache_dir).expanduser() / "tokens"


def load_tokens(data: str | os.PathLike | DataSource, tokenizer: Tokenizer,
                split: str | Split | None = None, text_column: str | None = None, *,
                cache_dir: str | os.PathLike | None = None, use_cache: bool = True,
                progress: bool = True, docs: Sequence[str] | None = None) -> TokenizedDocs:
    """The tokenised documents of a data source and split, from the cache when possible.

    The cache key is a sha256 of the data's identity (file paths, sizes and mtimes; the
    builtin text; or a hub dataset's fingerprint), the split, the text column and the
    tokenizer's model bytes, so a change to any of them tokenises again. The files are
    `<cache>/tokens/<key>.ids.npy` (int32) and `<key>.offsets.npy` (int64). `docs`, when the
    caller has already read this source and split (e.g. to train the tokenizer), saves
    reading them again."""
    resolved = _resolve(parse_source(data), parse_split(split), text_column, progress)
    key = _cache_key(resolved.identity, tokenizer)
    path = token_cache_dir(cache_dir) / key
    if use_cache:
        try:
            return TokenizedDocs.load(path)
        except FileNotFoundError:
            pass  # not cached yet
        except (OSError, ValueError, EOFError):
            pass  # a damaged cache file is rebuilt below
    tokens = tokenize_documents(resolved.read() if docs is None else docs, tokenizer,
                                progress=progress)
    if use_cache:
        tokens.save(path)
    return tokens


def _cache_key(identity: dict[str, Any], tokenizer: Tokenizer) -> str:
    blob = json.dumps({"format": _CACHE_FORMAT, "data": identity, "eos": True,
                       "tokenizer": tokenizer.fingerprint}, sort_keys=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


# ----- chunking ---------------------------------------------------------------------------


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
    _check_chunking(chunk_len, mode, group_size)
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
                 group_size: int | None = None) -> list[list[int]]:
    """`chunk_spans` on lists of ids: the chunks themselves, padded with 0 in `pad` mode.

    Pass `chunk_len = context_length + 1`: a model reads `chunk[:-1]` and predicts
    `chunk[1:]`."""
    docs = TokenizedDocs.from_lists(samples)
    starts, lengths = chunk_spans(docs.offsets, chunk_len, mode, group_size)
    chunks = [docs.ids[s:s + n].tolist() for s, n in zip(starts, lengths)]
    if mode == "pad":
        chunks = [c + [PAD_ID] * (chunk_len - len(c)) for c in chunks]
    return chunks


def _check_chunking(chunk_len: int, mode: str, group_size: int | None) -> None:
    if mode not in MODES:
        raise DataError(f"unknown chunking mode {mode!r}; choose one of {', '.join(MODES)}")
    if isinstance(chunk_len, bool) or not isinstance(chunk_len, int) or chunk_len < 2:
        raise DataError(f"chunk length must be an integer >= 2 (context_length + 1), got "
                        f"{chunk_len!r}")
    if group_size is not None and (not isinstance(group_size, int) or group_size < 1):
        raise DataError(f"group_size must be a positive integer or None, got {group_size!r}")


@dataclass(frozen=True)
class Chunks:
    """Chunks as spans of a flat token array; `rows` gathers them padded with 0."""

    tokens: np.ndarray   # int32 [num_tokens]
    starts: np.ndarray   # int64 [num_chunks]
    lengths: np.ndarray  # int64 [num_chunks], real tokens of each chunk (<= chunk_len)
    chunk_len: int

    @classmethod
    def from_tokens(cls, docs: TokenizedDocs, chunk_len: int, mode: str = "pack",
                    group_size: int | None = None) -> "Chunks":
        starts, lengths = chunk_spans(docs.offsets, chunk_len, mode, group_size)
        return cls(docs.ids, starts, lengths, chunk_len)

    def __len__(self) -> int:
        return len(self.starts)

    def rows(self, index: Sequence[int] | np.ndarray) -> np.ndarray:
        """Chunks `index` as an int64 array [len(index), chunk_len], short ones padded with 0."""
        out = np.full((len(index), self.chunk_len), PAD_ID, dtype=np.int64)
        for r, c in enumerate(index):
            s, n = self.starts[c], self.lengths[c]
            out[r, :n] = self.tokens[s:s + n]
        return out


# ----- the loader -------------------------------------------------------------------------


class TokenBatches:
    """Batches of chunks as LongTensors [batch_size / world_size, chunk_len].

    - Each epoch visits every chunk once in an order drawn from (seed, epoch), or in order
      when `shuffle=False`; the final incomplete batch is dropped, so `len()` is
      `num_chunks // batch_size`.
    - `batch_size` is the global batch: rank r gets rows [r*b, (r+1)*b) of every global batch,
      b = batch_size / world_size, so the ranks' rows are disjoint and, concatenated in rank
      order, equal the single-process batch. Runs on 1 or N ranks see the same data.
    - Iterating continues from the current position (`state_dict()`: epoch and step of the
      next batch) and moves it on; at the end of an epoch it moves to step 0 of the next.
      `load_state_dict` jumps to any batch without reading the ones before it. Use one
      iterator at a time; `iter_epoch` reads an epoch without touching the position (for
      validation)."""

    def __init__(self, chunks: Chunks, batch_size: int, *, shuffle: bool = True, seed: int = 0,
                 rank: int = 0, world_size: int = 1) -> None:
        _check_batching(batch_size, rank, world_size)
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise DataError(f"seed must be a non-negative integer, got {seed!r}")
        self.chunks = chunks
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = int(seed)
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.step = 0

    def __len__(self) -> int:
        """Batches per epoch."""
        return len(self.chunks) // self.batch_size

    @property
    def local_batch_size(self) -> int:
        """Rows of each batch on this rank."""
        return self.batch_size // self.world_size

    def order(self, epoch: int) -> np.ndarray:
        """The chunk order of an epoch (the same on every rank)."""
        if not self.shuffle:
            return np.arange(len(self.chunks))
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.chunks))

    def get_batch(self, step: int, epoch: int = 0, *,
                  order: np.ndarray | None = None) -> torch.Tensor:
        """This rank's rows of global batch `step` of `epoch`, as a LongTensor."""
        if not 0 <= step < len(self):
            raise IndexError(f"batch {step} is out of range (an epoch has {len(self)})")
        order = self.order(epoch) if order is None else order
        first = step * self.batch_size + self.rank * self.local_batch_size
        return torch.from_numpy(self.chunks.rows(order[first:first + self.local_batch_size]))

    def iter_epoch(self, epoch: int = 0, start: int = 0) -> Iterator[torch.Tensor]:
        """The batches of one epoch from batch `start`, leaving the position alone."""
        order = self.order(epoch)
        for step in range(start, len(self)):
            yield self.get_batch(step, epoch, order=order)

    def __iter__(self) -> Iterator[torch.Tensor]:
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
                "batch_size": self.batch_size, "num_chunks": len(self.chunks)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue at `state["epoch"]`, batch `state["step"]` (from `state_dict`)."""
        for key in ("seed", "batch_size", "num_chunks"):
            ours = self.seed if key == "seed" else self.state_dict()[key]
            if key in state and state[key] != ours:
                raise DataError(f"cannot resume the data loader: its saved {key} is "
                                f"{state[key]}, this one has {ours}; resume with the same data, "
                                "tokenizer, context length, batch size and seed")
        self.epoch, self.step = int(state["epoch"]), int(state["step"])


def _check_batching(batch_size: int, rank: int, world_size: int) -> None:
    """A global batch that splits evenly over `world_size` ranks, and a valid rank."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise DataError(f"batch_size must be a positive integer, got {batch_size!r}")
    if not isinstance(world_size, int) or world_size < 1 or not isinstance(rank, int) \
            or not 0 <= rank < world_size:
        raise DataError(f"rank {rank!r} / world_size {world_size!r} are not valid; need "
                        "0 <= rank < world_size")
    if batch_size % world_size:
        raise DataError(f"batch_size {batch_size} (the global batch) must be divisible by "
                        f"the number of processes {world_size}")


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
    documents if the caller has read them already."""
    if isinstance(context_length, bool) or not isinstance(context_length, int) \
            or context_length < 1:
        raise DataError(f"context_length must be a positive integer, got {context_length!r}")
    if isinstance(batch_agg_count, bool) or not isinstance(batch_agg_count, int) \
            or batch_agg_count < 1:
        raise DataError(f"batch_agg_count must be a positive integer, got {batch_agg_count!r}")
    _check_batching(batch_size, rank, world_size)
    _check_chunking(context_length + 1, mode, None)
    split, val_split = default_splits(split, val_split)
    group_size = batch_size * batch_agg_count

    def loader(split_: str, shuffle: bool, what: str, texts=None) -> TokenBatches:
        docs = load_tokens(data, tokenizer, split_, text_column, cache_dir=cache_dir,
                           progress=progress and rank == 0, docs=texts)
        chunks = Chunks.from_tokens(docs, context_length + 1, mode, group_size)
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
