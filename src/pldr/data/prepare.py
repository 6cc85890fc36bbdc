"""`prepare_store`: stream a corpus, tokenise it in worker processes, and write a token store
(store.py) that training reads memory-mapped.

    source --stream--> batches of ~batch_chars characters --N workers--> ids per batch
           --in order--> shards of >= shard_tokens ids (tmp folder, renamed) --> manifest

Only a few batches and one open shard are in memory at any time, whatever the corpus size.
The main process reads the source and writes the shards; workers only tokenise, so the
result depends neither on their number nor on their timing. Batch and shard boundaries follow
from the stream alone, so a prepare that was killed (kill -9 included) and is run again
re-reads the source up to the shards already written (checking that their documents are
unchanged), tokenises the rest and ends with the same store as an uninterrupted run.
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
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from itertools import chain, islice
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
from tqdm.auto import tqdm

from ..errors import DataError
from ..files import atomic_write_text, is_temp_name, temp_sibling
from .sources import STORE_MANIFEST, STORE_PENDING, DataSource, parse_source
from .stream import stream_source
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
DEFAULT_BATCH_CHARS = 1 << 20   # characters of text per unit of work sent to a worker
DEFAULT_VOCAB_SIZE = 32000      # the paper's tokenizer, for a tokenizer trained here
DEFAULT_SAMPLE_DOCS = 100_000   # documents a tokenizer trained here sees


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


def prepare_store(data: str | os.PathLike | DataSource, out: str | os.PathLike,
                  tokenizer: Tokenizer | None = None, *, split: str | None = None,
                  text_column: str | None = None, workers: int = 1,
                  shard_tokens: int = DEFAULT_SHARD_TOKENS,
                  batch_chars: int = DEFAULT_BATCH_CHARS, vocab_size: int = DEFAULT_VOCAB_SIZE,
                  sample_docs: int = DEFAULT_SAMPLE_DOCS, progress: bool = True) -> PrepareReport:
    """Tokenise the documents of `data` (any source, streamed) into a token store at `out`.

    `tokenizer` None: a SentencePiece tokenizer of `vocab_size` is trained on the first
    `sample_docs` documents (as `Tokenizer.train` makes them) and saved in the store. `workers`
    processes tokenise. Run again on an unfinished store, it continues where it stopped; on
    a complete one with the same source, it does nothing."""
    _check_positive(workers=workers, shard_tokens=shard_tokens, batch_chars=batch_chars,
                    vocab_size=vocab_size, sample_docs=sample_docs)
    started = time.perf_counter()
    out = Path(out)
    streamed = stream_source(data, split, text_column)
    source = _jsonable({"data": str(parse_source(data)), "identity": streamed.identity})
    settings = {"shard_tokens": shard_tokens, "batch_chars": batch_chars}
    if is_store(out):
        store = TokenStore.open(out)
        _check_same(store.manifest, source, settings, out)
        if tokenizer is not None:
            store.check_tokenizer(tokenizer)
        return PrepareReport(store, time.perf_counter() - started, 0,
                             len(store.manifest["shards"]), already_complete=True)
    tokenizer, pending = _begin(out, tokenizer, streamed, source, settings, vocab_size,
                                sample_docs)
    done = _written_shards(out)
    if done:
        log.info("resuming %s after %d complete shards", out, len(done))
    writer = _ShardWriter(out, np.dtype(pending["dtype"]), shard_tokens, len(done))
    bar = tqdm(desc="preparing", unit="doc", disable=not progress, dynamic_ncols=True)
    try:
        batches = _skip_done(_batches(streamed.documents(), batch_chars), done, bar)
        text_bytes = _tokenise(batches, tokenizer, writer, workers, bar, time.perf_counter())
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
            raise DataError(f"{name} must be a positive integer, got {v!r}")


def _jsonable(obj: Any) -> Any:
    """`obj` as it reads back from JSON (tuples become lists), so saved and new compare."""
    return json.loads(json.dumps(obj))


def _check_same(saved: dict[str, Any], source: dict[str, Any], settings: dict[str, Any],
                out: Path) -> None:
    """A store (or an unfinished one) at `out` must come from this source and settings."""
    if saved["source"]["identity"] != source["identity"] or saved["settings"] != settings:
        raise DataError(f"--out {str(out)!r} holds a token store of other data or settings "
                        f"(prepared from {saved['source']['data']!r}); choose another --out, "
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
                            "tokenizer; run again with the same --tokenizer (or without it), or "
                            "delete the folder to start over")
        return saved, pending
    # a first run killed before prepare.json was written may have left the tokenizer only
    if out.exists() and (not out.is_dir() or any(
            p.name != TOKENIZER_FILE and not is_temp_name(p.name) for p in out.iterdir())):
        raise DataError(f"--out {str(out)!r} exists and is not a token store; choose a new or "
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
    removing temporary folders of shards that were being written and anything beyond."""
    for p in out.iterdir():
        if is_temp_name(p.name):
            shutil.rmtree(p, ignore_errors=True)
    done: list[dict[str, Any]] = []
    while (out / shard_name(len(done)) / SHARD_FILE).is_file():
        meta = json.loads((out / shard_name(len(done)) / SHARD_FILE).read_text("utf-8"))
        done.append({"name": shard_name(len(done)), **meta})
    for p in out.glob("shard-*"):
        if p.is_dir() and p.name >= shard_name(len(done)):
            shutil.rmtree(p, ignore_errors=True)
    return done


# ----- the stream ---------------------------------------------------------------------------


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


def _text_digest(texts: list[str]) -> tuple[bytes, int]:
    """sha256 of a batch's texts (each length-prefixed) and their UTF-8 size."""
    h = hashlib.sha256()
    size = 0
    for t in texts:
        b = t.encode("utf-8", "surrogatepass")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
        size += len(b)
    return h.digest(), size


def _skip_done(batches: Iterator[list[str]], done: list[dict[str, Any]],
               bar: tqdm) -> Iterator[list[str]]:
    """Pass over the batches of the shards already written, checking that they hold the
    same documents as before; yield the rest."""
    for shard in done:
        h, count = hashlib.sha256(), 0
        while count < shard["documents"]:
            batch = next(batches, None)
            if batch is None:
                break
            h.update(_text_digest(batch)[0])
            count += len(batch)
            bar.update(len(batch))
        if count != shard["documents"] or h.hexdigest() != shard["text_sha256"]:
            raise DataError(f"the documents of {shard['name']} are not the ones the source "
                            "gives now (it changed since the prepare started); delete the "
                            "store and prepare it again")
    yield from batches


# ----- tokenising ---------------------------------------------------------------------------

_worker_tokenizer: Tokenizer | None = None


def _init_worker(model_proto: bytes) -> None:
    """A worker's setup: its own tokenizer, and death with the main process (kill -9 there
    must not leave workers behind)."""
    global _worker_tokenizer
    _worker_tokenizer = Tokenizer(model_proto)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's business
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except OSError:
            pass


def _encode(texts: list[str], dtype: str,
            tokenizer: Tokenizer | None = None) -> tuple[np.ndarray, np.ndarray, bytes, int]:
    """One batch: its ids laid end to end, each document's length, its text digest and
    UTF-8 size."""
    tok = tokenizer or _worker_tokenizer
    assert tok is not None, "worker not initialised"
    lists = tok.encode_batch(texts, eos=True, num_threads=1)
    lengths = np.fromiter(map(len, lists), dtype=np.int64, count=len(lists))
    ids = np.fromiter(chain.from_iterable(lists), dtype=dtype, count=int(lengths.sum()))
    return (ids, lengths, *_text_digest(texts))


def _tokenise(batches: Iterator[list[str]], tokenizer: Tokenizer, writer: "_ShardWriter",
              workers: int, bar: tqdm, started: float) -> int:
    """Encode every batch (in `workers` processes when more than one) and hand the results to
    `writer` in stream order, with at most 2 * workers batches in flight. Returns the UTF-8
    bytes encoded."""
    dtype = writer.dtype.name
    total = [0]

    def take(result: tuple[np.ndarray, np.ndarray, bytes, int]) -> None:
        writer.add(*result)
        total[0] += result[3]
        bar.update(len(result[1]))
        rate = total[0] / 1e6 / max(time.perf_counter() - started, 1e-9)
        bar.set_postfix(tokens=f"{writer.total_tokens:,}", MB_s=f"{rate:.2f}", refresh=False)

    if workers == 1:
        for texts in batches:
            take(_encode(texts, dtype, tokenizer))
        return total[0]
    methods = mp.get_all_start_methods()
    context = mp.get_context("fork" if "fork" in methods else None)
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                             initargs=(tokenizer.model_proto,)) as pool:
        in_flight: deque = deque()
        for texts in batches:
            in_flight.append(pool.submit(_encode, texts, dtype))
            if len(in_flight) >= 2 * workers:
                take(in_flight.popleft().result())
        while in_flight:
            take(in_flight.popleft().result())
    return total[0]


class _ShardWriter:
    """Appends batches of ids to the open shard (a temporary folder), and closes it (offsets,
    checksums, shard.json, then one rename) once it holds `shard_tokens` ids."""

    def __init__(self, out: Path, dtype: np.dtype, shard_tokens: int, index: int):
        self.out, self.dtype, self.shard_tokens, self.index = out, dtype, shard_tokens, index
        self.written: list[dict[str, Any]] = []
        self.total_tokens = 0
        self.tmp: Path | None = None

    def add(self, ids: np.ndarray, lengths: np.ndarray, digest: bytes, text_bytes: int) -> None:
        if self.tmp is None:
            self.tmp = temp_sibling(self.out / shard_name(self.index))
            self.tmp.mkdir()
            self.file = open(self.tmp / TOKENS_FILE, "wb")
            self.hash, self.text_hash = hashlib.sha256(), hashlib.sha256()
            self.lengths: list[np.ndarray] = []
            self.tokens = self.text_bytes = 0
        data = ids.astype(self.dtype.newbyteorder("<"), copy=False).tobytes()
        self.file.write(data)
        self.hash.update(data)
        self.text_hash.update(digest)
        self.lengths.append(lengths)
        self.tokens += len(ids)
        self.text_bytes += text_bytes
        self.total_tokens += len(ids)
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
