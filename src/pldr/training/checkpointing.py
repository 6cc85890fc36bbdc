"""Resumable training state on disk: checkpoint folder names, finding the one to resume,
the trainer state file and RNG states.
"""

from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import CheckpointError

CHECKPOINTS = "checkpoints"
FINAL = "final"
TRAINER_STATE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"
STATE_FORMAT = "pldr-train-checkpoint"
STATE_VERSION = 1
_STEP_DIR = re.compile(r"^step-(\d+)$")


def rng_state() -> dict[str, Any]:
    """The torch (CPU and CUDA), numpy and Python RNG states as tensors and plain numbers, so
    they save with torch.save and load with weights_only=True."""
    return _saveable_rng(_capture_rng())


def _capture_rng() -> tuple[Any, ...]:
    """The RNG states as the libraries return them (copies), without converting them: cheap
    enough to take before every training step; `_saveable_rng` converts them for saving."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    return torch.get_rng_state(), cuda, np.random.get_state(), random.getstate()


def _saveable_rng(captured: tuple[Any, ...]) -> dict[str, Any]:
    """What `_capture_rng` took, in the form `rng_state` returns."""
    torch_state, cuda, np_state, py = captured
    version, py_state, gauss = py
    _, keys, pos, has_gauss, cached = np_state
    return {
        "torch": torch_state,
        "cuda": cuda,
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": int(version), "state": torch.tensor(py_state, dtype=torch.int64),
                   "gauss": gauss},
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` returned."""
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(x) for x in p["state"].tolist()), p["gauss"]))


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
    """The checkpoint folder `--resume` names: a path, or "auto" for the latest in `out`."""
    if resume is None:
        return None
    if resume == "auto":
        found = list_checkpoints(out)
        if not found:
            raise CheckpointError(f"--resume auto: {str(out / CHECKPOINTS)!r} holds no complete "
                                  "checkpoint to resume; start without --resume, or pass the "
                                  "right --out")
        return found[-1]
    path = Path(resume)
    if path.is_dir() and not (path / TRAINER_STATE).is_file() and list_checkpoints(path):
        return list_checkpoints(path)[-1]  # a run folder: its latest checkpoint
    if not (path / TRAINER_STATE).is_file():
        raise CheckpointError(f"--resume {resume!r} is not a training checkpoint (no "
                              f"{TRAINER_STATE}); pass a folder like OUT/checkpoints/step-N, a "
                              "run folder, or auto")
    return path


def read_trainer_state(ckpt: Path) -> dict[str, Any]:
    try:
        state = json.loads((ckpt / TRAINER_STATE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {str(ckpt / TRAINER_STATE)!r}: {e}") from None
    if state.get("format") != STATE_FORMAT or state.get("kind") not in ("single", "dcp"):
        raise CheckpointError(f"{str(ckpt)!r} is not a checkpoint written by `pldr train`")
    return state
