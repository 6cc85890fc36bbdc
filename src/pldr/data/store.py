"""A prepared token store: a corpus tokenised once (`pldr data prepare`, see prepare.py) and
read memory-mapped by every training run after it.

A store is a folder:

    DIR/store.json                 written last: its presence means the store is complete
    DIR/tokenizer.model            the tokenizer the ids come from
    DIR/shard-000000/tokens.bin    raw token ids, uint16 when the vocabulary fits, else uint32
    DIR/shard-000000/offsets.npy   int64 [documents + 1]: where each document starts in the shard
    DIR/shard-000000/shard.json    its counts, sha256 checksums and the prepare tasks it holds
    DIR/shard-000001/ ...

Documents are laid end to end in stream order, each ending with EOS, exactly as `load_tokens`
tokenises the source; so `TokenStore.slice(split)` gives the ids and offsets that tokenising
the source and split directly gives, and the same chunks and batches follow. The manifest
holds the tokenizer's checksum, the source's fingerprint, token and document counts and
every shard's checksums. While a store is being prepared the folder has `prepare.json`
instead; shards appear whole (each is written in a temporary folder and renamed).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError
from .sources import STORE_MANIFEST, STORE_PENDING
from .splits import Split, parse_split
from .tokenizer import Tokenizer

STORE_FORMAT = "pldr-token-store"
STORE_VERSION = 1
TOKENIZER_FILE = "tokenizer.model"
TOKENS_FILE, OFFSETS_FILE, SHARD_FILE = "tokens.bin", "offsets.npy", "shard.json"


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab_size <= 65536), else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def shard_name(index: int) -> str:
    return f"shard-{index:06d}"


def is_store(path: str | os.PathLike) -> bool:
    """Whether `path` is a complete prepared token store (a folder with its manifest)."""
    return (Path(path) / STORE_MANIFEST).is_file()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


class ShardedTokens:
    """The token ids of several shards, read as one flat array without loading them.

    Supports `len`, `dtype` and slicing with step 1 (`ids[a:b]` gives a numpy array, copied
    only when it spans two shards), which is all that chunks and batches use."""

    def __init__(self, shards: list[np.ndarray], start: int = 0, stop: int | None = None):
        self.shards = shards
        self.bounds = np.cumsum([0] + [len(s) for s in shards], dtype=np.int64)
        self.start = int(start)
        self.stop = int(self.bounds[-1] if stop is None else stop)

    def __len__(self) -> int:
        return self.stop - self.start

    @property
    def dtype(self) -> np.dtype:
        return self.shards[0].dtype if self.shards else np.dtype(np.uint16)

    @property
    def shape(self) -> tuple[int]:
        return (len(self),)

    def view(self, start: int, stop: int) -> "ShardedTokens":
        """Ids [start, stop) of this array, as another ShardedTokens."""
        return ShardedTokens(self.shards, self.start + start, self.start + stop)

    def __getitem__(self, key: slice) -> np.ndarray:
        if not isinstance(key, slice):
            i = int(key) + (len(self) if int(key) < 0 else 0)
            if not 0 <= i < len(self):
                raise IndexError(f"token {int(key)} is out of range ({len(self)} tokens)")
            return self[i:i + 1][0]
        a, b, step = key.indices(len(self))
        if step != 1:
            raise IndexError("ShardedTokens supports slices with step 1 only")
        a, b = self.start + a, self.start + max(a, b)
        parts = []
        i = int(np.searchsorted(self.bounds, a, side="right")) - 1
        while a < b:
            end = min(b, int(self.bounds[i + 1]))
            parts.append(self.shards[i][a - self.bounds[i]:end - self.bounds[i]])
            a, i = end, i + 1
        if not parts:
            return np.zeros(0, self.dtype)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        """All the ids as one array: a view of the mapped shard where it can be, a copy
        when `copy` is True (numpy trusts the answer: a view would stay tied to the file)."""
        out = self[:]
        if dtype is not None and np.dtype(dtype) != out.dtype:
            return out.astype(dtype)
        return np.array(out, copy=True) if copy else out


@dataclass(frozen=True)
class TokenStore:
    """A complete store opened for reading: its manifest, and its shards memory-mapped."""

    path: Path
    manifest: dict[str, Any]
    tokens: ShardedTokens  # all ids, documents end to end
    offsets: np.ndarray    # int64 [documents + 1] into `tokens`

    @classmethod
    def open(cls, path: str | os.PathLike) -> "TokenStore":
        """Open the store at `path`; a missing or foreign manifest is a clear error."""
        path = Path(path)
        manifest = read_manifest(path)
        dtype = np.dtype(manifest["dtype"])
        shards, offsets, shift = [], [np.zeros(1, np.int64)], 0
        for entry in manifest["shards"]:
            folder = path / entry["name"]
            ids = np.memmap(folder / TOKENS_FILE, dtype=dtype, mode="r") \
                if entry["tokens"] else np.zeros(0, dtype)
            starts = np.load(folder / OFFSETS_FILE, allow_pickle=False)
            if len(ids) != entry["tokens"] or len(starts) != entry["documents"] + 1 \
                    or starts[-1] != len(ids):
                raise DataError(f"shard {str(folder)!r} of the token store does not match "
                                "its manifest (damaged?); check the store with "
                                "pldr.data.TokenStore.open(...).verify() (`pldr data info "
                                "--verify`), or prepare it again")
            shards.append(ids)
            offsets.append(starts[1:] + shift)
            shift += len(ids)
        return cls(path, manifest, ShardedTokens(shards), np.concatenate(offsets))

    @property
    def num_documents(self) -> int:
        return len(self.offsets) - 1

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    @property
    def tokenizer_sha256(self) -> str:
        return self.manifest["tokenizer"]["sha256"]

    def tokenizer(self) -> Tokenizer:
        """The tokenizer the store was prepared with (its own copy)."""
        return Tokenizer.load(self.path / TOKENIZER_FILE)

    def check_tokenizer(self, tokenizer: Tokenizer) -> None:
        """A tokenizer other than the store's cannot read its ids: a clear error."""
        if tokenizer.fingerprint != self.tokenizer_sha256:
            ours = self.manifest["tokenizer"]
            raise DataError(
                f"the token store {str(self.path)!r} was prepared with another tokenizer "
                f"(sha256 {ours['sha256'][:12]}..., vocab {ours['vocab_size']}) than the one "
                f"given (sha256 {tokenizer.fingerprint[:12]}..., vocab {tokenizer.vocab_size}); "
                f"use the store's own {str(self.path / TOKENIZER_FILE)!r}, or prepare the data "
                "again with this tokenizer")

    def slice(self, split: str | Split | None = None) -> tuple[ShardedTokens, np.ndarray]:
        """The ids and offsets (from 0) of a split's documents, e.g. `train[:90%]`: the same
        documents the split selects from the source. A store holds one split, `train`."""
        split = parse_split(split)
        if split.name != "train":
            raise DataError(f"a token store holds one split, 'train' (the documents it was "
                            f"prepared from), not {split.name!r}; take a slice of it instead, "
                            "e.g. train[90%:]")
        a, b = split.bounds(self.num_documents)
        if a >= b:
            raise DataError(f"split {str(split)!r} of the token store {str(self.path)!r} "
                            f"selects no documents (it has {self.num_documents}); widen the slice")
        lo, hi = int(self.offsets[a]), int(self.offsets[b])
        return self.tokens.view(lo, hi), self.offsets[a:b + 1] - lo

    def verify(self) -> list[str]:
        """Recompute every shard's checksums; the names of files that do not match."""
        bad = []
        for entry in self.manifest["shards"]:
            for name, digest in entry["sha256"].items():
                if file_sha256(self.path / entry["name"] / name) != digest:
                    bad.append(f"{entry['name']}/{name}")
        return bad

    def summary(self) -> dict[str, Any]:
        """What the store holds, for `pldr data info`."""
        m = self.manifest
        size = sum((self.path / e["name"] / TOKENS_FILE).stat().st_size
                   for e in m["shards"] if e["tokens"])
        return {"path": str(self.path), "source": m["source"]["data"],
                "documents": m["documents"], "tokens": m["tokens"],
                "text_bytes": m["text_bytes"], "shards": len(m["shards"]),
                "dtype": m["dtype"], "token_bytes": size,
                "tokenizer_sha256": m["tokenizer"]["sha256"],
                "vocab_size": m["tokenizer"]["vocab_size"],
                "documents_sha256": m["source"]["documents_sha256"]}


def read_manifest(path: Path) -> dict[str, Any]:
    """The manifest of the store at `path`, checked to be one of ours."""
    file = path / STORE_MANIFEST
    if not file.is_file():
        hint = ("its preparation did not finish: run the same pldr.data.prepare_store(...) "
                "(`pldr data prepare`) again" if (path / STORE_PENDING).is_file()
                else "make one with pldr.data.prepare_store (`pldr data prepare`)")
        raise DataError(f"{str(path)!r} is not a prepared token store (no {STORE_MANIFEST}); "
                        f"{hint}")
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read {str(file)!r}: {e}; prepare the store again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != STORE_FORMAT:
        raise DataError(f"{str(file)!r} is not the manifest of a pldr token store")
    if manifest.get("version") != STORE_VERSION:
        raise DataError(f"token store {str(path)!r} has version {manifest.get('version')!r}; "
                        f"this pldr reads version {STORE_VERSION}: prepare it again")
    return manifest


__all__ = ["TokenStore", "ShardedTokens", "is_store", "token_dtype", "read_manifest",
           "STORE_FORMAT", "STORE_VERSION"]
