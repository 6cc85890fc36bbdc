"""Writing files and folders so that a crash never leaves a half-written one.

Everything is written under a unique temporary name next to its target (same folder, so the
same file system) and renamed into place with `os.replace`, which is atomic: a reader sees
the old version or the new one, never a mix. A write that fails removes its temporary file.

A leaf module: it imports nothing from `pldr`, so every other module (data, tokenizer,
checkpoint, train) can use it.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

# `.NAME.tmp-PID-HEX` / `.NAME.old-PID-HEX`: what `temp_sibling` names look like
_TEMP_NAME = re.compile(r"^\..+\.(tmp|old)-\d+-[0-9a-f]{8}$")


def temp_sibling(path: str | os.PathLike, kind: str = "tmp") -> Path:
    """A unique hidden name next to `path` (`.NAME.KIND-PID-HEX`): unique per process and
    call, so two writers of the same target never share a temporary file."""
    path = Path(path)
    return path.with_name(f".{path.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def is_temp_name(name: str) -> bool:
    """Whether `name` is one `temp_sibling` makes, i.e. a leftover of an interrupted write
    that is safe to delete."""
    return bool(_TEMP_NAME.match(name))


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path` for the caller to write; when the block ends
    without an error it is renamed to `path`, and in any case no temporary file remains.

    For writers that need a file name (np.save, safetensors); plain bytes or text go
    through `atomic_write_bytes` / `atomic_write_text`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path)
    try:
        yield tmp
        if tmp.is_file():
            give_default_mode(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def give_default_mode(path: str | os.PathLike) -> None:
    """The mode a file created by `open()` would have (0666 less the umask). Some writers
    (safetensors, mkstemp) create files readable by their owner only, unlike their
    neighbours; every file written through `atomic_path` gets this mode."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def save_safetensors(tensors: dict, path: str | os.PathLike,
                     metadata: dict[str, str] | None = None) -> None:
    """Write `tensors` ({name: tensor}) as a .safetensors file, atomically and with the default
    mode: the one way pldr writes safetensors (safetensors' own `save_file` leaves 0600)."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically (creating its folder)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` as UTF-8 to `path` atomically (creating its folder)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def replace_dir(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Rename the finished folder `src` to `dst`. An existing `dst` is first renamed to a
    unique temporary name and deleted once `src` is in place; if that last rename fails, the
    old `dst` is put back. So a complete folder is at `dst` at every moment but between two
    renames, and a failure leaves what was there."""
    src, dst = Path(src), Path(dst)
    if dst.is_symlink():  # replace what the link points at; the user's link stays a link
        dst = dst.resolve()
    if not dst.exists():
        os.replace(src, dst)
        return
    old = temp_sibling(dst, "old")
    os.replace(dst, old)
    try:
        os.replace(src, dst)
    except OSError:
        os.replace(old, dst)
        raise
    shutil.rmtree(old, ignore_errors=True)


def sha256_of(path: str | os.PathLike) -> str:
    """The hex sha256 of a file, read in 4 MiB blocks (the checksum of our manifests)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


__all__ = ["sha256_of", "atomic_path", "atomic_write_bytes", "atomic_write_text", "replace_dir",
           "give_default_mode", "save_safetensors",
           "temp_sibling", "is_temp_name"]
