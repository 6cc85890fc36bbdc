"""`prepare_store`: tokenise a corpus in worker processes that read their own part of it,
and write a token store (store.py) that training reads memory-mapped.

    source --stream_source--> parts (files, .txt byte ranges, parquet row groups, shards)
           --grouped--> tasks of ~TASK_BATCHES * batch_chars of text
           --N workers: read, tokenise batch by batch, write ids to a temporary file-->
           --in task order--> shards of >= shard_tokens ids (tmp folder, renamed) --> manifest

Each worker reads and decodes its own task's documents (the main process sends only the
task's description), tokenises them `batch_chars` characters at a time and writes the ids to
a temporary file beside the store; the main process appends finished tasks, in order, to the
open shard and closes it at the end of the task that brings it to `shard_tokens` ids. Tasks
and shard boundaries follow from the source alone, so the store is the same byte for byte
whatever the number of workers, and memory holds a batch per worker and a few tasks'
document lengths, whatever the corpus size. A prepare that was killed (kill -9 included)
and is run again keeps the complete shards (after checking, in the workers, that their
tasks still read the same text), and continues with the next task, ending with the same
store as an uninterrupted run.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import multiprocessing as mp
import os
import shutil
import signal
import sys
import time
from collections import deque
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import chain, islice
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
from tqdm.auto import tqdm

from ..errors import DataError
from ..files import atomic_write_text, is_temp_name, temp_sibling
from .sources import (
    STORE_MANIFEST,
    STORE_PENDING,
    DataSource,
    SourcePart,
    SourceStream,
    stream_source,
)
from .store import (
    OFFSETS_FILE,
    SHARD_FILE,
    STORE_FORMAT,
    STORE_VERSION,
    TOKENIZER_FILE,
    TOKENS_FILE,
    TokenStore,
    file_sha256,
    is_store,
    shard_name,
    token_dtype,
)
from .tokenizer import Tokenizer

log = logging.getLogger("pldr")

DEFAULT_SHARD_TOKENS = 1 << 26  # 64 Mi ids: 128 MiB shards of uint16
DEFAULT_BATCH_CHARS = 1 << 20   # characters of text a worker tokenises at a time
DEFAULT_VOCAB_SIZE = 32000      # the paper's tokenizer, for a tokenizer trained here
DEFAULT_SAMPLE_DOCS = 100_000   # documents a tokenizer trained here sees
TASK_BATCHES = 4                # a task (one worker's unit of work) holds ~4 batches of text
LAYOUT = 2                      # 2: shards end at task boundaries (1: at batch boundaries)

Task = tuple[tuple[SourcePart, int, "int | None"], ...]  # (part, first unit, stop) in order


@dataclass(frozen=True)
class PrepareReport:
    """What a `prepare_store` call did: the store, and how much it read and tokenised."""

    store: TokenStore
    seconds: float
    text_bytes: int       # UTF-8 bytes tokenised by this call (not those of resumed shards)
    resumed_shards: int   # shards that were already written and kept
    already_complete: bool = False

    @property
    def mb_per_s(self) -> float:
        return self.text_bytes / 1e6 / self.seconds if self.seconds > 0 else 0.0


def prepare_store(data: str | os.PathLike | DataSource | SourceStream, out: str | os.PathLike,
                  tokenizer: Tokenizer | None = None, *, split: str | None = None,
                  text_column: str | None = None, workers: int = 1,
                  shard_tokens: int = DEFAULT_SHARD_TOKENS,
                  batch_chars: int = DEFAULT_BATCH_CHARS, vocab_size: int = DEFAULT_VOCAB_SIZE,
                  sample_docs: int = DEFAULT_SAMPLE_DOCS, progress: bool = True,
                  documents: Sequence[str] | None = None) -> PrepareReport:
    """Tokenise the documents of `data` (any source, or a `stream_source` stream) into a
    token store at `out`.

    `tokenizer` None: a SentencePiece tokenizer of `vocab_size` is trained on the first
    `sample_docs` documents (as `Tokenizer.train` makes them) and saved in the store. `workers`
    processes read and tokenise. Run again on an unfinished store, it continues where it
    stopped; on a complete one with the same source, it does nothing. `documents`: the
    stream's documents when the caller has read them already (tokenised in this process)."""
    _check_positive(workers=workers, shard_tokens=shard_tokens, batch_chars=batch_chars,
                    vocab_size=vocab_size, sample_docs=sample_docs)
    started = time.perf_counter()
    out = Path(out)
    task_chars = TASK_BATCHES * batch_chars
    stream = data if isinstance(data, SourceStream) else \
        stream_source(data, split, text_column, part_bytes=task_chars)
    source = _jsonable({"data": str(stream.source), "identity": stream.identity})
    settings = {"shard_tokens": shard_tokens, "batch_chars": batch_chars, "layout": LAYOUT}
    if is_store(out):
        store = TokenStore.open(out)
        _check_same(store.manifest, source, settings, out)
        if tokenizer is not None:
            store.check_tokenizer(tokenizer)
        return PrepareReport(store, time.perf_counter() - started, 0,
                             len(store.manifest["shards"]), already_complete=True)
    tokenizer, pending = _begin(out, tokenizer, stream, source, settings, vocab_size,
                                sample_docs)
    done = _written_shards(out)
    if done:
        log.info("resuming %s after %d complete shards", out, len(done))
    writer = _ShardWriter(out, np.dtype(pending["dtype"]), shard_tokens, len(done))
    bar = tqdm(desc="preparing", unit="doc", disable=not progress, dynamic_ncols=True)
    job = _Job(out, writer.dtype.name, batch_chars, documents)
    workers = workers if documents is None else 1
    try:
        with _workers(workers, tokenizer) as pool:
            if documents is not None:
                tasks: list[Any] = [None]
            else:
                counts = list(pool.map(_count, stream.parts)) if stream.sliced else None
                tasks = _tasks(stream.ranges(counts), task_chars)
            first = done[-1]["tasks"][1] if done else 0
            ahead = 1 if workers == 1 else 2 * workers
            _check_unchanged(done, tasks, job, pool, ahead, bar)
            text_bytes = _tokenise(tasks[first:], first, job, pool, ahead, writer, bar)
        writer.close()
    finally:
        writer.abandon()
        bar.close()
    manifest = _manifest(pending, done + writer.written)
    atomic_write_text(out / STORE_MANIFEST, json.dumps(manifest, indent=1) + "\n")
    (out / STORE_PENDING).unlink(missing_ok=True)
    return PrepareReport(TokenStore.open(out), time.perf_counter() - started, text_bytes,
                         len(done))


def _check_positive(**values: int) -> None:
    for name, v in values.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise DataError(f"`{name}` must be a positive integer, got {v!r}")


def _jsonable(obj: Any) -> Any:
    """`obj` as it reads back from JSON (tuples become lists), so saved and new compare."""
    return json.loads(json.dumps(obj))


def _check_same(saved: dict[str, Any], source: dict[str, Any], settings: dict[str, Any],
                out: Path) -> None:
    """A store (or an unfinished one) at `out` must come from this source and settings."""
    if saved["source"]["identity"] != source["identity"] or saved["settings"] != settings:
        raise DataError(f"`out` {str(out)!r} holds a token store of other data or settings "
                        f"(prepared from {saved['source']['data']!r}); choose another `out`, "
                        "or delete it to prepare again")


def _begin(out: Path, tokenizer: Tokenizer | None, streamed: Any, source: dict[str, Any],
           settings: dict[str, Any], vocab_size: int, sample_docs: int
           ) -> tuple[Tokenizer, dict[str, Any]]:
    """Start a new store at `out`, or pick up the unfinished one there: its tokenizer and
    its `prepare.json` (what the finished manifest will repeat)."""
    marker = out / STORE_PENDING
    if marker.is_file():
        pending = json.loads(marker.read_text(encoding="utf-8"))
        _check_same(pending, source, settings, out)
        saved = Tokenizer.load(out / TOKENIZER_FILE)
        if tokenizer is not None and tokenizer.fingerprint != saved.fingerprint:
            raise DataError(f"the unfinished token store {str(out)!r} was started with another "
                            "tokenizer; run again with the same `tokenizer` (or without one), or "
                            "delete the folder to start over", param="tokenizer")
        return saved, pending
    # a first run killed before prepare.json was written may have left the tokenizer only
    if out.exists() and (not out.is_dir() or any(
            p.name != TOKENIZER_FILE and not is_temp_name(p.name) for p in out.iterdir())):
        raise DataError(f"`out` {str(out)!r} exists and is not a token store; choose a new or "
                        "empty folder")
    if tokenizer is None:
        log.info("no tokenizer given: training a tokenizer (%d pieces) on the first %d documents; "
                 "it is kept as %s", vocab_size, sample_docs, out / TOKENIZER_FILE)
        tokenizer = Tokenizer.train(islice(streamed.documents(), sample_docs), vocab_size,
                                    shuffle_input_sentence=True)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(out / TOKENIZER_FILE)
    pending = {"format": STORE_FORMAT, "version": STORE_VERSION,
               "tokenizer": {"file": TOKENIZER_FILE, "sha256": tokenizer.fingerprint,
                             "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id,
                             "pad_id": tokenizer.pad_id},
               "dtype": token_dtype(tokenizer.vocab_size).name, "source": source,
               "settings": settings}
    atomic_write_text(marker, json.dumps(pending, indent=1) + "\n")
    return tokenizer, pending


def _written_shards(out: Path) -> list[dict[str, Any]]:
    """The shards already complete (shard-0, shard-1, ... up to the first missing one), after
    removing temporary shard folders and task files that were being written, and anything
    beyond."""
    for p in out.iterdir():
        if is_temp_name(p.name):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
    done: list[dict[str, Any]] = []
    while (out / shard_name(len(done)) / SHARD_FILE).is_file():
        meta = json.loads((out / shard_name(len(done)) / SHARD_FILE).read_text("utf-8"))
        done.append({"name": shard_name(len(done)), **meta})
    for p in out.glob("shard-*"):
        if p.is_dir() and p.name >= shard_name(len(done)):
            shutil.rmtree(p, ignore_errors=True)
    return done


# ----- tasks ------------------------------------------------------------------------------


def _tasks(ranges: list[tuple[SourcePart, int, int | None]], task_chars: int) -> list[Task]:
    """Consecutive part ranges grouped into tasks of about `task_chars` of text (by the
    parts' size estimates; a part of unknown size is a task of its own). The grouping depends
    on the source only, never on the number of workers."""
    tasks: list[Task] = []
    group: list[tuple[SourcePart, int, int | None]] = []
    size = 0
    for item in ranges:
        group.append(item)
        size += item[0].size or task_chars
        if size >= task_chars:
            tasks.append(tuple(group))
            group, size = [], 0
    if group:
        tasks.append(tuple(group))
    return tasks


def _batches(docs: Iterable[str], batch_chars: int) -> Iterator[list[str]]:
    """Consecutive documents, cut after the one that brings a batch to `batch_chars`."""
    batch: list[str] = []
    size = 0
    for doc in docs:
        batch.append(doc)
        size += len(doc)
        if size >= batch_chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _text_digest(texts: list[str], h: Any) -> int:
    """Add a batch's texts (each length-prefixed) to the sha256 `h`; their UTF-8 size."""
    size = 0
    for t in texts:
        b = t.encode("utf-8", "surrogatepass")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
        size += len(b)
    return size


@dataclass(frozen=True)
class _Job:
    """What every task of one prepare shares: where to write, the id dtype, the batch size,
    and (for a cache built from documents already read) those documents."""

    out: Path
    dtype: str
    batch_chars: int
    documents: Sequence[str] | None = None


@dataclass(frozen=True)
class _TaskResult:
    """One task done: its ids in a temporary file (None when only its text was hashed), each
    document's token count, and its text's sha256 and UTF-8 size."""

    file: Path | None
    lengths: np.ndarray  # int64 [documents]
    text_sha256: str
    text_bytes: int


_worker_tokenizer: Tokenizer | None = None


def _init_worker(model_proto: bytes | None) -> None:
    """A worker's setup: its own tokenizer, and death with the main process (kill -9 there
    must not leave workers behind)."""
    global _worker_tokenizer
    _worker_tokenizer = None if model_proto is None else Tokenizer(model_proto)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's business
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except OSError:
            pass


def _count(part: SourcePart) -> int:
    """A part's unit count (run in a worker: counting reads the part)."""
    return part.count()


def _run_task(task: Task | None, job: _Job, encode: bool = True) -> _TaskResult:
    """Read a task's documents and tokenise them batch by batch, appending the ids to a
    temporary file beside the store; or, with `encode` False, only hash its text. Runs in a
    worker (or in the main process for one worker): memory holds one batch."""
    docs = job.documents if task is None else \
        chain.from_iterable(part.documents(a, b) for part, a, b in task)
    h, size, lengths = hashlib.sha256(), 0, []
    file = temp_sibling(job.out / "task") if encode else None
    with (open(file, "wb") if file else _nothing()) as f:
        for texts in _batches(docs, job.batch_chars):
            size += _text_digest(texts, h)
            if f is None:
                lengths.append(np.zeros(len(texts), np.int64))
                continue
            tok = _worker_tokenizer
            assert tok is not None, "worker not initialised"
            lists = tok.encode_batch(texts, eos=True, num_threads=1)
            n = np.fromiter(map(len, lists), dtype=np.int64, count=len(lists))
            ids = np.fromiter(chain.from_iterable(lists), dtype=job.dtype, count=int(n.sum()))
            f.write(ids.astype(np.dtype(job.dtype).newbyteorder("<"), copy=False).tobytes())
            lengths.append(n)
    counts = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
    return _TaskResult(file, counts, h.hexdigest(), size)


@contextmanager
def _nothing() -> Iterator[None]:
    yield None


class _Inline(Executor):
    """One worker: tasks run in this process, when their results are asked for."""

    def submit(self, fn: Callable, /, *args: Any, **kwargs: Any) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as e:  # noqa: BLE001  handed to the caller by .result()
            future.set_exception(e)
        return future

    def map(self, fn: Callable, *iterables: Iterable, **kwargs: Any) -> Iterator:
        return map(fn, *iterables)


@contextmanager
def _workers(workers: int, tokenizer: Tokenizer) -> Iterator[Executor]:
    """`workers` processes (forked where possible), each with the tokenizer; or, for one,
    this process."""
    global _worker_tokenizer
    if workers == 1:
        saved, _worker_tokenizer = _worker_tokenizer, tokenizer
        try:
            yield _Inline()
        finally:
            _worker_tokenizer = saved
        return
    methods = mp.get_all_start_methods()
    context = mp.get_context("fork" if "fork" in methods else None)
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                             initargs=(tokenizer.model_proto,)) as pool:
        yield pool


def _in_order(fn: Callable[[Any], Future], items: Iterable[Any], ahead: int) -> Iterator[Any]:
    """The results of `fn(item)` in order, with at most `ahead` submitted but not taken."""
    in_flight: deque = deque()
    for item in items:
        in_flight.append(fn(item))
        if len(in_flight) >= ahead:
            yield in_flight.popleft().result()
    while in_flight:
        yield in_flight.popleft().result()


def _check_unchanged(done: list[dict[str, Any]], tasks: list[Any], job: _Job, pool: Executor,
                     ahead: int, bar: tqdm) -> None:
    """The shards kept from an interrupted run must hold the text the source gives now:
    their tasks are read again (in the workers, not tokenised) and their digests compared."""
    if not done:
        return
    digests = _in_order(lambda t: pool.submit(_run_task, t, job, False),
                        tasks[:done[-1]["tasks"][1]], ahead)
    for shard in done:
        first, end = shard["tasks"]
        h, documents = hashlib.sha256(), 0
        for result in islice(digests, end - first):
            h.update(bytes.fromhex(result.text_sha256))
            documents += len(result.lengths)
            bar.update(len(result.lengths))
        if end > len(tasks) or documents != shard["documents"] \
                or h.hexdigest() != shard["text_sha256"]:
            raise DataError(f"the documents of {shard['name']} are not the ones the source "
                            "gives now (it changed since the prepare started); delete the "
                            "store and prepare it again")


def _tokenise(tasks: list[Any], first: int, job: _Job, pool: Executor, ahead: int,
              writer: "_ShardWriter", bar: tqdm) -> int:
    """Run the tasks (task `first` onwards) in the workers, at most 2 per worker ahead, and
    hand their results to `writer` in order. Returns the UTF-8 bytes tokenised."""
    started, total = time.perf_counter(), 0
    results = _in_order(lambda t: pool.submit(_run_task, t, job), tasks, ahead)
    try:
        for index, result in enumerate(results, start=first):
            writer.add(index, result)
            total += result.text_bytes
            bar.update(len(result.lengths))
            rate = total / 1e6 / max(time.perf_counter() - started, 1e-9)
            bar.set_postfix(tokens=f"{writer.total_tokens:,}", MB_s=f"{rate:.2f}",
                            refresh=False)
    finally:
        for p in job.out.iterdir():  # the files of tasks not taken (after an error)
            if p.name.startswith(".task.") and is_temp_name(p.name):
                p.unlink(missing_ok=True)
    return total


class _ShardWriter:
    """Appends finished tasks (their ids file, copied and hashed) to the open shard (a
    temporary folder), and closes it (offsets, checksums, shard.json, then one rename) at the
    end of the task that brings it to `shard_tokens` ids."""

    def __init__(self, out: Path, dtype: np.dtype, shard_tokens: int, index: int):
        self.out, self.dtype, self.shard_tokens, self.index = out, dtype, shard_tokens, index
        self.written: list[dict[str, Any]] = []
        self.total_tokens = 0
        self.tmp: Path | None = None

    def add(self, task: int, result: _TaskResult) -> None:
        if self.tmp is None:
            self.tmp = temp_sibling(self.out / shard_name(self.index))
            self.tmp.mkdir()
            self.file = open(self.tmp / TOKENS_FILE, "wb")
            self.hash, self.text_hash = hashlib.sha256(), hashlib.sha256()
            self.lengths: list[np.ndarray] = []
            self.tokens = self.text_bytes = 0
            self.first_task = task
        assert result.file is not None
        with open(result.file, "rb") as f:
            while block := f.read(1 << 22):
                self.file.write(block)
                self.hash.update(block)
        result.file.unlink()
        tokens = int(result.lengths.sum())
        self.text_hash.update(bytes.fromhex(result.text_sha256))
        self.lengths.append(result.lengths)
        self.tokens += tokens
        self.text_bytes += result.text_bytes
        self.total_tokens += tokens
        self.end_task = task + 1
        if self.tokens >= self.shard_tokens:
            self.close()

    def close(self) -> None:
        """Finish the open shard, if any: it appears under its name whole or not at all."""
        if self.tmp is None:
            return
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        lengths = np.concatenate(self.lengths)
        offsets = np.zeros(len(lengths) + 1, np.int64)
        np.cumsum(lengths, out=offsets[1:])
        np.save(self.tmp / OFFSETS_FILE, offsets, allow_pickle=False)
        meta = {"documents": len(lengths), "tokens": self.tokens, "text_bytes": self.text_bytes,
                "text_sha256": self.text_hash.hexdigest(),
                "tasks": [self.first_task, self.end_task],
                "sha256": {TOKENS_FILE: self.hash.hexdigest(),
                           OFFSETS_FILE: file_sha256(self.tmp / OFFSETS_FILE)}}
        (self.tmp / SHARD_FILE).write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
        final = self.out / shard_name(self.index)
        os.replace(self.tmp, final)
        self.written.append({"name": final.name, **meta})
        self.tmp, self.index = None, self.index + 1

    def abandon(self) -> None:
        """After an error: remove the half-written shard (a rerun writes it again)."""
        if self.tmp is not None:
            self.file.close()
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None


def _manifest(pending: dict[str, Any], shards: list[dict[str, Any]]) -> dict[str, Any]:
    """The finished store's manifest: prepare.json plus the counts and the shards."""
    documents = sum(s["documents"] for s in shards)
    if documents == 0:
        raise DataError(f"the data {pending['source']['data']!r} holds no documents")
    digest = hashlib.sha256("".join(s["text_sha256"] for s in shards).encode()).hexdigest()
    return {**pending, "source": {**pending["source"], "documents_sha256": digest},
            "documents": documents, "tokens": sum(s["tokens"] for s in shards),
            "text_bytes": sum(s["text_bytes"] for s in shards), "shards": shards}


__all__ = ["prepare_store", "PrepareReport", "DEFAULT_SHARD_TOKENS", "DEFAULT_BATCH_CHARS"]
