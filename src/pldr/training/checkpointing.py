"""Resumable training state: one format, Distributed Checkpoint (DCP), on one process or
many; and the final export, a model directory (safetensors).

    OUT/checkpoints/step-00000100/   .metadata + __R_0.distcp (model and optimizer, DCP)
                                     config.json, tokenizer.model (the model's, so the folder
                                     converts to a model directory on its own)
                                     trainer_state.json (step, data position, metrics, and
                                     the manifest: size and sha256 of every other file; last)
    OUT/final/                       config.json + model.safetensors + tokenizer.model

A checkpoint is written under `.tmp-step-N` and renamed when complete, so a kill at any
moment leaves complete checkpoints only. DCP reshards on load: a checkpoint of N processes
resumes on M. No RNG state is saved: nothing in training draws random numbers after the
weights are initialised (no dropout; the data order comes from (seed, epoch); the init runs
under fork_rng), so the weights, the optimizer, the data position and the metric sums decide
the rest of a run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import PLDRConfig
from ..devices import parse_dtype
from ..errors import CheckpointError
from ..files import atomic_write_text, is_temp_name, replace_dir, sha256_of
from ..model.model import PLDRModel
from ..model.pretrained import CONFIG_FILE, TOKENIZER_FILE, save_pretrained
from . import distributed as ptd

CHECKPOINTS = "checkpoints"
FINAL = "final"
TRAINER_STATE = "trainer_state.json"
STATE_FORMAT = "pldr-train-checkpoint"
STATE_VERSION = 2  # 1: pldr 0.1 (safetensors + optimizer.pt on one process, DCP on several)
_STEP_DIR = re.compile(r"^step-(\d+)$")
_TMP_PREFIX = ".tmp-"


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def list_checkpoints(out: str | os.PathLike) -> list[Path]:
    """Complete checkpoints of a run, oldest first. A folder counts only under its final
    name (`step-N`) and with its trainer_state.json, which is written last; temporary
    folders of a save that was cut short (`.tmp-step-N`) never count."""
    root = Path(out) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir() and (p / TRAINER_STATE).is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def find_resume_checkpoint(resume: str | None, out: Path) -> Path | None:
    """The checkpoint folder `resume` names: a path, or "auto" for the latest in `out`."""
    if resume is None:
        return None
    if resume == "auto":
        found = list_checkpoints(out)
        if not found:
            raise CheckpointError(f"`resume='auto'`: {str(out / CHECKPOINTS)!r} holds no "
                                  "complete checkpoint to resume; start without `resume`, or "
                                  "pass the right `out`")
        try:
            read_trainer_state(found[-1])
        except CheckpointError as e:
            raise CheckpointError(f"`resume='auto'`: the latest checkpoint is damaged ({e}); "
                                  + _previous_hint(found[:-1])) from None
        return found[-1]
    path = Path(resume)
    if path.is_dir() and not (path / TRAINER_STATE).is_file() and list_checkpoints(path):
        return list_checkpoints(path)[-1]  # a run folder: its latest checkpoint
    if not (path / TRAINER_STATE).is_file():
        raise CheckpointError(f"`resume={resume!r}` is not a training checkpoint (no "
                              f"{TRAINER_STATE}); pass a folder like OUT/checkpoints/step-N, a "
                              "run folder, or auto")
    return path


def _previous_hint(earlier: list[Path]) -> str:
    """What to do when a checkpoint cannot be read: resume the previous complete one."""
    if earlier:
        return f"resume the previous complete one with `resume={str(earlier[-1])!r}`"
    return "no earlier checkpoint exists: start the run again in a new `out`"


def checkpoint_step(ckpt: Path) -> int | None:
    """The step of a folder named step-N, else None."""
    m = _STEP_DIR.match(Path(ckpt).name)
    return int(m.group(1)) if m else None


def _file_manifest(folder: Path) -> dict[str, dict[str, Any]]:
    """name -> {"bytes", "sha256"} of the files of a checkpoint folder (its manifest, kept
    in trainer_state.json), as a model directory's manifest.json holds them."""
    return {p.name: {"bytes": p.stat().st_size, "sha256": sha256_of(p)}
            for p in sorted(folder.iterdir()) if p.is_file() and p.name != TRAINER_STATE}


def _check_files(ckpt: Path, files: Any, checksums: bool) -> None:
    """Name the first file of `ckpt` that is missing, has another size or (with
    `checksums`) another sha256 than when saved, before any tensor is read. Entries that
    are a plain size come from checkpoints of before the checksums (sizes only)."""
    if not isinstance(files, dict):
        return  # a checkpoint of before the manifest
    for name, want in files.items():
        size, digest = (want, None) if isinstance(want, int) else (
            want.get("bytes"), want.get("sha256")) if isinstance(want, dict) else (None, None)
        path = ckpt / name
        if not path.is_file():
            raise CheckpointError(f"{str(ckpt)!r} lacks {name}, written when it was saved")
        if path.stat().st_size != size:
            raise CheckpointError(f"{str(path)!r} has {path.stat().st_size} bytes, not the "
                                  f"{size} it was saved with: it is truncated or altered")
        if checksums and digest is not None and sha256_of(path) != digest:
            raise CheckpointError(f"{str(path)!r} does not match the sha256 it was saved "
                                  "with: it is corrupt or altered")


def read_trainer_state(ckpt: Path, checksums: bool = False) -> dict[str, Any]:
    """trainer_state.json of a checkpoint this version can resume; the sizes of its files
    (and with `checksums`, their sha256: this reads every byte, so it is done once, right
    before the tensors are loaded) are checked against the manifest the save wrote."""
    try:
        state = json.loads((ckpt / TRAINER_STATE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"cannot read {str(ckpt / TRAINER_STATE)!r}: {e}") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{str(ckpt)!r} is not a checkpoint written by `pldr train`")
    if state.get("version") != STATE_VERSION or not (ckpt / ptd.DCP_METADATA).is_file():
        raise CheckpointError(f"{str(ckpt)!r} is a checkpoint of an older pldr (version "
                              f"{state.get('version')}); this version resumes Distributed "
                              "Checkpoints only: start the run again")
    _check_files(ckpt, state.get("files"), checksums)
    return state


def verify_checkpoint(ckpt: Path) -> dict[str, Any]:
    """`read_trainer_state` with every file's sha256 checked (done once per resume, before
    any file of the checkpoint is used); a damaged checkpoint names the previous one."""
    try:
        return read_trainer_state(ckpt, checksums=True)
    except CheckpointError as e:
        raise CheckpointError(f"{e}; " + _previous_hint(_earlier(ckpt))) from None


def _earlier(ckpt: Path) -> list[Path]:
    """The complete checkpoints of `ckpt`'s run before it, oldest first."""
    return [c for c in list_checkpoints(ckpt.parent.parent)
            if (checkpoint_step(c) or 0) < (checkpoint_step(ckpt) or 0)]


def later_checkpoints(out: Path, step: int) -> list[Path]:
    """Complete checkpoints of the run in `out` past `step` (a branch that resuming `step`
    into `out` would overwrite)."""
    return [c for c in list_checkpoints(out) if (checkpoint_step(c) or 0) > step]


def remove_partial_saves(out: Path) -> None:
    """Delete what saves cut short left in OUT/checkpoints (temporary folders only)."""
    root = out / CHECKPOINTS
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith((_TMP_PREFIX, ".old-")) or is_temp_name(p.name):
                shutil.rmtree(p, ignore_errors=True)


class CheckpointManager:
    """Writes, reads and prunes a run's checkpoints and exports the final model; the one
    owner of OUT/checkpoints and OUT/final. All processes call every method (each writes its
    DCP shards); rank 0 writes the small files and renames."""

    def __init__(self, out: Path, dist: ptd.DistInfo, keep: int, config: PLDRConfig,
                 tokenizer: Any) -> None:
        self.out, self.dist, self.keep = out, dist, keep
        self.config, self.tokenizer = config, tokenizer
        self.last: Path | None = None   # the last checkpoint written or resumed from
        self.last_step = -1             # its step
        self.resumed: Path | None = None  # never pruned: the run can go back to it

    def save(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int,
             state: dict[str, Any]) -> Path:
        """Write OUT/checkpoints/step-N: the DCP shards, config.json, tokenizer.model, and
        `state` (the trainer's position) as trainer_state.json, last; then rename the folder
        into place and keep the last K."""
        root = self.out / CHECKPOINTS
        final = root / checkpoint_name(step)
        tmp = root / f"{_TMP_PREFIX}{checkpoint_name(step)}"
        if self.dist.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        ptd.barrier(self.dist)
        ptd.save_sharded(model, optimizer, tmp)
        ptd.barrier(self.dist)
        if self.dist.is_main:
            self.config.to_json(tmp / CONFIG_FILE)
            self.tokenizer.save(tmp / TOKENIZER_FILE)
            write_json(tmp / TRAINER_STATE, {"format": STATE_FORMAT, "version": STATE_VERSION,
                                             "step": step, "world_size": self.dist.world_size,
                                             **state, "files": _file_manifest(tmp)})
            replace_dir(tmp, final)
            self._prune()
        ptd.barrier(self.dist)
        self.last, self.last_step = final, step
        return final

    def load(self, ckpt: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        """Read model and optimizer from `ckpt` (written by any number of processes) and
        return its trainer state."""
        try:
            state = read_trainer_state(ckpt)
            _read_dcp(model, optimizer, ckpt)
        except CheckpointError as e:
            raise CheckpointError(f"{e}; " + _previous_hint(_earlier(ckpt))) from None
        self.last, self.last_step = ckpt, int(state["step"])
        self.resumed = ckpt
        return state

    def discard_later(self, step: int) -> list[Path]:
        """Delete this run's checkpoints past `step` and its final model (pldr's own
        output, removed only when the user asked with --truncate-later-steps)."""
        gone = later_checkpoints(self.out, step)
        if self.dist.is_main:
            for c in gone:
                shutil.rmtree(c)
            if (self.out / FINAL).is_dir():
                shutil.rmtree(self.out / FINAL)
        ptd.barrier(self.dist)
        return gone

    def _prune(self) -> None:
        """Keep the last K checkpoints, and always the one this run resumed from."""
        if self.keep:
            resumed = self.resumed.resolve() if self.resumed is not None else None
            for old in list_checkpoints(self.out)[:-self.keep]:
                if old.resolve() != resumed:
                    shutil.rmtree(old, ignore_errors=True)

    def export_final(self, model: nn.Module) -> Path:
        """The trained model as a model directory OUT/final (with the tokenizer)."""
        final = self.out / FINAL
        state = ptd.full_model_state(model, self.dist)
        if self.dist.is_main:
            with torch.device("meta"):
                plain = PLDRModel(self.config)
            plain.load_state_dict(state, assign=True)
            save_pretrained(plain, final, tokenizer=self.tokenizer)
        ptd.barrier(self.dist)
        return final


def _read_dcp(model: nn.Module, optimizer: torch.optim.Optimizer | None, ckpt: Path) -> None:
    """`ptd.load_sharded`, with a damaged or mismatched checkpoint reported as one
    CheckpointError naming the folder."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        ptd.load_sharded(model, optimizer, ckpt)
    except CheckpointError:
        raise
    # DCP's CheckpointException is a BaseException, not an Exception
    except (Exception, CheckpointException) as e:  # noqa: BLE001
        failures = getattr(e, "failures", None)  # rank -> the exception it raised
        cause = next(iter(failures.values())) if failures else e
        cause = cause[0] if isinstance(cause, tuple) else cause  # (exception, stack)
        reason = " ".join(f"{type(cause).__name__}: {cause}".split())[:300]
        raise CheckpointError(f"cannot read the Distributed Checkpoint {str(ckpt)!r} ({reason}); "
                              "it is damaged or does not fit the model; use another "
                              "checkpoint") from None


def write_json(path: Path, obj: Any) -> None:
    """`obj` as indented JSON, written atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def dcp_to_pretrained(dcp_dir: str | os.PathLike, out_dir: str | os.PathLike,
                      tokenizer: Any = None, dtype: str | torch.dtype | None = None) -> Path:
    """Convert a training checkpoint (DCP) into a model directory (config.json +
    model.safetensors [+ tokenizer.model]) that `load_model` and `pldr generate` read.

    The model config comes from the checkpoint's config.json and the tokenizer, unless
    given, from its tokenizer.model. `dtype` (e.g. "bfloat16") casts the weights before they
    are written; the default keeps them as stored (float32). Runs on one process; no process
    group is needed."""
    dcp_dir = ptd.check_dcp_dir(dcp_dir)
    dtype = parse_dtype(dtype)  # a bad name fails before any work
    if not (dcp_dir / CONFIG_FILE).is_file():
        raise CheckpointError(f"{str(dcp_dir)!r} has no {CONFIG_FILE}; it is not a checkpoint "
                              "written by `pldr train`")
    config = PLDRConfig.from_json(dcp_dir / CONFIG_FILE)
    with torch.device("meta"):
        model = PLDRModel(config)
    model.to_empty(device="cpu")
    model.init_weights()  # the v510G G_LM buffers; everything in the checkpoint is overwritten
    _read_dcp(model, None, dcp_dir)
    if dtype is not None:
        model.to(dtype=dtype)
    if tokenizer is None and (dcp_dir / TOKENIZER_FILE).is_file():
        tokenizer = dcp_dir / TOKENIZER_FILE
    save_pretrained(model, out_dir, tokenizer=tokenizer)
    return Path(out_dir)


__all__ = ["CHECKPOINTS", "FINAL", "TRAINER_STATE", "CheckpointManager", "checkpoint_name",
           "list_checkpoints", "later_checkpoints", "checkpoint_step", "find_resume_checkpoint",
           "read_trainer_state", "verify_checkpoint", "remove_partial_saves",
           "dcp_to_pretrained", "write_json"]
