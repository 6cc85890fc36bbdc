"""Training metrics as the original logs them: running (since the last report), global
(since the start) and epoch means of loss and accuracy, the three DAG values, and the token
count; written as JSON lines to OUT/metrics.jsonl and to TensorBoard (OUT/tb).

Every tracker's state is plain JSON, so a checkpoint carries it and a resumed run continues
the same means.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from ..files import atomic_write_text

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tb"
DAG_KEYS = (("A", "dag_A"), ("A_P", "dag_Ap"), ("G", "dag_G"))  # dag_values key -> record field


class MeanTracker:
    """Means of per-step values since the last reset (keys may come and go: DAG values are
    absent for v510G models). Its state is plain JSON, for checkpoints."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def add(self, values: dict[str, float | None]) -> None:
        for k, v in values.items():
            if v is not None:
                self.sums[k] = self.sums.get(k, 0.0) + float(v)
                self.counts[k] = self.counts.get(k, 0) + 1

    def mean(self, key: str) -> float | None:
        n = self.counts.get(key, 0)
        return self.sums[key] / n if n else None

    def reset(self) -> None:
        self.sums.clear()
        self.counts.clear()

    def state_dict(self) -> dict[str, Any]:
        return {"sums": dict(self.sums), "counts": dict(self.counts)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sums = {k: float(v) for k, v in state["sums"].items()}
        self.counts = {k: int(v) for k, v in state["counts"].items()}


class TrainMetrics:
    """The original's figures: running (since the last report), global (since the start) and
    epoch means of loss and accuracy, the three DAG values, and the token count."""

    def __init__(self) -> None:
        self.running, self.total, self.epoch = MeanTracker(), MeanTracker(), MeanTracker()
        self.epoch_index = 0
        self.tokens = 0

    def add(self, values: dict[str, float | None], epoch: int, tokens: int) -> None:
        if epoch != self.epoch_index:
            self.epoch.reset()
            self.epoch_index = epoch
        for tracker in (self.running, self.total, self.epoch):
            tracker.add(values)
        self.tokens += tokens

    def report(self) -> dict[str, Any]:
        """The train record's figures; resets the running means."""
        r = self.running
        record = {"loss": r.mean("loss"), "ce": r.mean("ce"), "accuracy": r.mean("accuracy"),
                  **{name: r.mean(name) for _, name in DAG_KEYS},
                  "global_loss": self.total.mean("loss"),
                  "global_accuracy": self.total.mean("accuracy"),
                  "epoch_loss": self.epoch.mean("loss"),
                  "epoch_accuracy": self.epoch.mean("accuracy")}
        r.reset()
        return record

    def state_dict(self) -> dict[str, Any]:
        return {"running": self.running.state_dict(), "total": self.total.state_dict(),
                "epoch": self.epoch.state_dict(), "epoch_index": self.epoch_index,
                "tokens": self.tokens}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.running.load_state_dict(state["running"])
        self.total.load_state_dict(state["total"])
        self.epoch.load_state_dict(state["epoch"])
        self.epoch_index = int(state["epoch_index"])
        self.tokens = int(state["tokens"])


class MetricsLog:
    """Writes records to OUT/metrics.jsonl and TensorBoard (OUT/tb), on rank 0 only."""

    def __init__(self, out: Path, enabled: bool, tensorboard: bool, resume_step: int | None):
        self.path = out / METRICS_FILE
        self.enabled = enabled
        self.writer = None
        if not enabled:
            return
        if resume_step is not None:
            _truncate_metrics(self.path, resume_step)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            purge = resume_step + 1 if resume_step is not None else None
            self.writer = SummaryWriter(str(out / TENSORBOARD_DIR), purge_step=purge)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            split, step = record["split"], record["step"]
            for k, v in record.items():
                if k not in ("step", "split") and isinstance(v, (int, float)) \
                        and not isinstance(v, bool):
                    self.writer.add_scalar(f"{split}/{k}", v, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop records logged after `step` (by a run that went on past the checkpoint we resume
    from), so the file reads as one uninterrupted run."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line + "\n")
        except json.JSONDecodeError:
            continue  # a line cut short by a kill
    atomic_write_text(path, "".join(kept))


def copy_history(src: Path, dst: Path, step: int, tensorboard: bool) -> None:
    """A fork's start: the records of run `src` up to `step` into `dst`'s metrics.jsonl and,
    when the fork writes TensorBoard events, `src`'s into `dst`/tb (later events are purged
    when the fork's writer opens at `step`). `src` is only read."""
    if (src / METRICS_FILE).is_file():
        atomic_write_text(dst / METRICS_FILE, (src / METRICS_FILE).read_text(encoding="utf-8"))
        _truncate_metrics(dst / METRICS_FILE, step)
    elif (dst / METRICS_FILE).exists():
        (dst / METRICS_FILE).unlink()  # a leftover of an earlier attempt
    if tensorboard and (src / TENSORBOARD_DIR).is_dir():
        shutil.rmtree(dst / TENSORBOARD_DIR, ignore_errors=True)
        shutil.copytree(src / TENSORBOARD_DIR, dst / TENSORBOARD_DIR)


def read_metrics(path: str | os.PathLike, split: str | None = None) -> list[dict[str, Any]]:
    """Records of a metrics.jsonl (or of OUT/metrics.jsonl when given a run folder)."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()
               if line.strip()]
    return [r for r in records if split is None or r.get("split") == split]


def format_record(r: dict[str, Any], total: int) -> str:
    """One console line for a metrics record."""
    parts = [f"{r['split']:5s} step {r['step']}/{total}", f"loss {r['loss']:.4f}",
             f"acc {r['accuracy']:.3f}"]
    if r["split"] == "train":
        parts += [f"lr {r['lr']:.2e}", f"tok/s {r['tokens_per_s']:.0f}"]
    if r.get("dag_G") is not None:
        parts.append(f"dag A/Ap/G {r['dag_A']:.3g}/{r['dag_Ap']:.3g}/{r['dag_G']:.3g}")
    return "  ".join(parts)



__all__ = ["METRICS_FILE", "TENSORBOARD_DIR", "DAG_KEYS", "MeanTracker", "TrainMetrics",
           "format_record",
           "MetricsLog", "copy_history", "read_metrics"]
