"""Tokenised documents: one flat int32 array plus document offsets, and the on-disk
token cache keyed by the data and the tokenizer, so a second run does not tokenise again.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
from tqdm.auto import tqdm

from ..errors import DataError
from ..files import atomic_path
from . import sources
from .sources import DataSource
from .splits import Split
from .store import TokenStore
from .tokenizer import Tokenizer

if TYPE_CHECKING:  # `datasets` takes a second to import; only structured data needs it.
    pass


_CACHE_FORMAT = 1  # bump when the cached arrays change meaning


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
    reading them again.

    A prepared token store (`pldr data prepare`) is read memory-mapped instead, nothing
    tokenised or cached; its tokenizer must be `tokenizer`."""
    if sources.parse_source(data).kind == "store":
        return _store_tokens(data, tokenizer, split, text_column)
    resolved = sources.resolve_source(data, split, text_column, progress)
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


def _store_tokens(data: str | os.PathLike | DataSource, tokenizer: Tokenizer,
                  split: str | Split | None, text_column: str | None) -> TokenizedDocs:
    """A split of a prepared token store, memory-mapped, after checking its tokenizer."""
    store = TokenStore.open(sources.parse_source(data).name)
    store.check_tokenizer(tokenizer)
    prepared = store.manifest["source"]["identity"].get("text_column")
    if text_column is not None and prepared is not None and text_column != prepared:
        raise DataError(f"the token store {str(store.path)!r} was prepared from column "
                        f"{prepared!r}, not {text_column!r}; drop --text-column or prepare "
                        "the data again")
    return TokenizedDocs(*store.slice(split))


def _cache_key(identity: dict[str, Any], tokenizer: Tokenizer) -> str:
    blob = json.dumps({"format": _CACHE_FORMAT, "data": identity, "eos": True,
                       "tokenizer": tokenizer.fingerprint}, sort_keys=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()
