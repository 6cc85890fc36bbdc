"""Tokenised documents: one flat array plus document offsets, and `load_tokens`, which
gives them for any source and split. Tokens on disk are always a token store (store.py):
`load_tokens` on a source prepares one in the cache folder the first time (keyed by the
source, the split and the tokenizer) and memory-maps it after that, as it memory-maps a
store given as the source.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from itertools import chain, islice
from pathlib import Path
from typing import Any, Iterable, Sequence, Sized

import numpy as np
from tqdm.auto import tqdm

from ..errors import DataError
from ..files import replace_dir, temp_sibling
from .prepare import prepare_store
from .sources import DataSource, parse_source, stream_source
from .splits import Split
from .store import TokenStore, is_store
from .tokenizer import Tokenizer

CACHE_FORMAT = 2  # bump when a cached store changes meaning (1: .npy arrays)


@dataclass(frozen=True)
class TokenizedDocs:
    """Token ids of many documents: one flat array and the offsets where each document starts.

    Document i is `ids[offsets[i]:offsets[i + 1]]` and ends with EOS. From a prepared token
    store, `ids` is a memory-mapped `store.ShardedTokens` (uint16/uint32) that slices alike."""

    ids: np.ndarray      # int32 [num_tokens] (or ShardedTokens)
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


def tokenize_documents(docs: Iterable[str], tokenizer: Tokenizer, *, batch_docs: int = 512,
                       progress: bool = True) -> TokenizedDocs:
    """Encode each document with EOS appended, `batch_docs` at a time (in parallel threads),
    in memory (int32 ids)."""
    parts: list[TokenizedDocs] = []
    total = len(docs) if isinstance(docs, Sized) else None
    docs = iter(docs)
    with tqdm(total=total, desc="tokenising", unit="doc", disable=not progress) as bar:
        while batch := list(islice(docs, batch_docs)):
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
    """The tokenised documents of a data source and split, memory-mapped from a token store.

    A source is prepared once (`prepare_store`, one process) into the store
    `<cache>/tokens/<key>/`, the key a sha256 of the source's identity (file paths, sizes and
    mtimes; the builtin text; a dataset's name, config and split), the split, the text column
    and the tokenizer's model bytes, so a change to any of them tokenises again; the store is
    built under a temporary name and renamed, so concurrent runs (ranks) never see half of
    one, and a damaged one is rebuilt. `docs`: this source and split's documents when the
    caller has read them already (e.g. to train the tokenizer). `use_cache=False` tokenises
    in memory instead (int32 ids), writing nothing.

    A prepared token store given as `data` is read as it is; its tokenizer must be
    `tokenizer`."""
    if parse_source(data).kind == "store":
        return _store_tokens(data, tokenizer, split, text_column)
    stream = stream_source(data, split, text_column)
    if not use_cache:
        return tokenize_documents(stream.documents() if docs is None else docs, tokenizer,
                                  progress=progress)
    path = token_cache_dir(cache_dir) / _cache_key(stream.identity, tokenizer)
    store = _open_cached(path, tokenizer)
    if store is None:
        tmp = temp_sibling(path)
        try:
            prepare_store(stream, tmp, tokenizer, progress=progress, documents=docs)
            if _open_cached(path, tokenizer) is None:  # another process may have won
                replace_dir(tmp, path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        store = _open_cached(path, tokenizer)
        if store is None:
            raise DataError(f"the token cache {str(path)!r} cannot be read back; check the "
                            "cache folder (`cache_dir`, $PLDR_CACHE_DIR)")
    return TokenizedDocs(*store.slice())


def _open_cached(path: Path, tokenizer: Tokenizer) -> TokenStore | None:
    """The cached store at `path`, or None when it is missing or damaged."""
    if not is_store(path):
        return None
    try:
        store = TokenStore.open(path)
        store.check_tokenizer(tokenizer)
        return store
    except (DataError, OSError, ValueError, KeyError):
        return None


def _store_tokens(data: str | os.PathLike | DataSource, tokenizer: Tokenizer,
                  split: str | Split | None, text_column: str | None) -> TokenizedDocs:
    """A split of a prepared token store, memory-mapped, after checking its tokenizer."""
    store = TokenStore.open(parse_source(data).name)
    store.check_tokenizer(tokenizer)
    prepared = store.manifest["source"]["identity"].get("text_column")
    if text_column is not None and prepared is not None and text_column != prepared:
        raise DataError(f"the token store {str(store.path)!r} was prepared from column "
                        f"{prepared!r}, not {text_column!r}; drop `text_column` or prepare "
                        "the data again")
    return TokenizedDocs(*store.slice(split))


def _cache_key(identity: dict[str, Any], tokenizer: Tokenizer) -> str:
    blob = json.dumps({"format": CACHE_FORMAT, "data": identity, "eos": True,
                       "tokenizer": tokenizer.fingerprint}, sort_keys=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()
