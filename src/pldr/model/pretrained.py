"""Our model directory: `config.json` + `model.safetensors` (+ `tokenizer.model`),
written under a temporary name and renamed, so a crash never leaves half a model.

The format lives with the model (not in `pldr.checkpoint`) so that `model.save_pretrained`
needs nothing above the model package; `pldr.checkpoint` reads these directories back.
It takes any module with a `config` and a `state_dict` (the model and the task heads), so it
never imports model.py, which imports it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Mapping

from torch import Tensor, nn

from ..config import PLDRConfig
from ..errors import CheckpointError, PLDRTypeError
from ..files import atomic_write_text, replace_dir, save_safetensors, sha256_of, temp_sibling


CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.model"
MANIFEST_FILE = "manifest.json"  # sizes and sha256 of the other files, checked on load
MANIFEST_FORMAT = "pldr-manifest"


def directory_config(directory: Path) -> PLDRConfig:
    """The config.json of a saved model directory (clear error when it is not one)."""
    if not (directory / CONFIG_FILE).is_file():
        raise CheckpointError(f"{str(directory)!r} has no {CONFIG_FILE}; it is not a model "
                              "directory written by save_pretrained (or pass config=...)")
    return PLDRConfig.from_json(directory / CONFIG_FILE)


def read_safetensors(path: Path) -> dict[str, Tensor]:
    """All tensors of a safetensors file, on CPU; a missing or unreadable file is a
    CheckpointError that names it."""
    from safetensors.torch import load_file

    if not path.is_file():
        raise CheckpointError(f"{str(path)!r} does not exist; a model directory needs "
                              f"{CONFIG_FILE} and {WEIGHTS_FILE}")
    try:
        return load_file(path, device="cpu")
    except Exception as e:  # noqa: BLE001  SafetensorError is not a builtin subclass
        raise CheckpointError(f"cannot read {str(path)!r} as safetensors: {e}") from None


def save_pretrained(model: nn.Module, directory: str | os.PathLike, tokenizer: Any = None) -> None:
    """Write `config.json`, `model.safetensors` (and `tokenizer.model`) to `directory`.

    Written into a temporary folder next to it and renamed, so a crash never leaves half a
    model. An existing model directory is replaced; in an existing directory that also holds
    other files, only our files are replaced (each atomically) and the others stay."""
    if not hasattr(model, "config") or not hasattr(model, "state_dict"):
        raise PLDRTypeError(f"save_pretrained needs a PLDRModel, got {type(model).__name__}")
    target = Path(directory).absolute()
    if target.exists() and not target.is_dir():
        raise CheckpointError(f"{str(target)!r} exists and is not a directory; choose "
                              "another directory")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(target)
    tmp.mkdir()  # not tempfile.mkdtemp: its 0700 mode would stick to the renamed directory
    try:
        write_model_files(model, tmp, tokenizer)
        _move_into_place(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_model_files(model: nn.Module, directory: Path, tokenizer: Any = None, *,
                      weights: bool = True) -> None:
    """config.json, model.safetensors and the tokenizer, into an existing directory.

    Shared by `save_pretrained` and training checkpoints, so both hold the same files.
    `weights=False` leaves out model.safetensors, for a sharded run whose weights are written
    by Distributed Checkpoint instead."""
    write_config(model, directory / CONFIG_FILE)
    if weights:
        save_safetensors(_plain_tensors(model.state_dict()), directory / WEIGHTS_FILE,
                         metadata={"format": "pt"})
    if tokenizer is not None:
        _write_tokenizer(tokenizer, directory / TOKENIZER_FILE, model.config.vocab_size)
    write_manifest(directory)


def write_config(model: PLDRModel, path: Path) -> None:
    """config.json: the model's config, and for a task head (model/heads.py) the class in
    "architectures", as transformers writes it, so loading knows which head it is."""
    config = model.config.to_dict()
    architecture = getattr(model, "architecture", None)
    if architecture is not None:
        config["architectures"] = [architecture]
    path.write_text(json.dumps(config, indent=2) + "\n")


def write_manifest(directory: Path) -> None:
    """manifest.json: the size and sha256 of each model file in `directory`."""
    files = {name: {"bytes": (directory / name).stat().st_size, "sha256": sha256_of(directory / name)}
             for name in (CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE) if (directory / name).is_file()}
    atomic_write_text(directory / MANIFEST_FILE, json.dumps(
        {"format": MANIFEST_FORMAT, "version": 1, "files": files}, indent=1) + "\n")


def verify_manifest(directory: Path) -> None:
    """Check every file the manifest lists against its size and sha256, before any tensor is
    used, so a truncated or altered file is named. A directory without a manifest (written
    by an older pldr, or by hand) is accepted as it is."""
    path = directory / MANIFEST_FILE
    if not path.is_file():
        return
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
        assert manifest["format"] == MANIFEST_FORMAT and isinstance(files, dict)
    except (ValueError, KeyError, TypeError, AssertionError, UnicodeDecodeError):
        raise CheckpointError(f"{str(path)!r} is not a pldr manifest; restore it or delete it "
                              "to load the directory unchecked") from None
    for name, want in files.items():
        f = directory / name
        if not f.is_file():
            raise CheckpointError(f"{str(f)!r} is missing (the manifest lists it); restore "
                                  "the model directory")
        size = f.stat().st_size
        if size != want.get("bytes"):
            raise CheckpointError(f"{str(f)!r} has {size} bytes but was saved with "
                                  f"{want.get('bytes')}: it is truncated or altered; restore it")
        if sha256_of(f) != want.get("sha256"):
            raise CheckpointError(f"{str(f)!r} does not match its saved checksum: it is "
                                  "corrupt or altered; restore it")


def _plain_tensors(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Contiguous CPU copies-where-needed that safetensors accepts: no two share memory."""
    seen: set[int] = set()
    out = {}
    for key, t in state.items():
        t = t.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen or t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[key] = t
    return out


def _write_tokenizer(tokenizer: Any, dest: Path, vocab_size: int) -> None:
    """A tokenizer object with `.save(path)`, a SentencePieceProcessor, or a .model path
    (checked to be a SentencePiece model whose pieces fit the model's vocabulary)."""
    if isinstance(tokenizer, (str, os.PathLike)):
        src = Path(tokenizer)
        if not src.is_file():
            raise CheckpointError(f"tokenizer file {str(src)!r} does not exist")
        _check_tokenizer_file(src, vocab_size)
        shutil.copyfile(src, dest)
    elif hasattr(tokenizer, "save"):
        tokenizer.save(str(dest))
    elif hasattr(tokenizer, "serialized_model_proto"):
        dest.write_bytes(tokenizer.serialized_model_proto())
    else:
        raise PLDRTypeError(f"tokenizer must be a path to a .model file or have a .save(path) "
                            f"method, got {type(tokenizer).__name__}")


def _check_tokenizer_file(path: Path, vocab_size: int) -> None:
    """Refuse a file that is not a SentencePiece model, or one with more pieces than the
    model has embeddings (its ids would index past the vocabulary)."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor()
    try:
        sp.LoadFromSerializedProto(path.read_bytes())
    except Exception:  # noqa: BLE001  sentencepiece raises RuntimeError or OSError
        raise CheckpointError(f"tokenizer file {str(path)!r} is not a SentencePiece .model; "
                              "pass the tokenizer the model was trained with") from None
    pieces = sp.get_piece_size()
    if pieces > vocab_size:
        raise CheckpointError(f"tokenizer {str(path)!r} has {pieces} pieces but the model's "
                              f"vocabulary has {vocab_size}; pass the tokenizer the model was "
                              "trained with")


def _move_into_place(tmp: Path, target: Path) -> None:
    """Rename the finished temporary folder to `target`, replacing what is there safely."""
    ours = {CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE, MANIFEST_FILE}
    if not target.exists() or {p.name for p in target.iterdir()} <= ours:
        replace_dir(tmp, target)  # no folder, an old model or an empty one: swap it out whole
        return
    for name in (WEIGHTS_FILE, TOKENIZER_FILE, MANIFEST_FILE, CONFIG_FILE):  # config last: it marks "done"
        if (tmp / name).exists():
            os.replace(tmp / name, target / name)
