"""Training: the loop, following the original's conventions (docs/training.md).

    batch [B, T+1] -> forward on ids[:, :-1] -> masked CE on ids[:, 1:] + sum c * dag
    -> backward -> clip gradients by value at 1.0 -> AdamW(0.9, 0.95, eps 1e-5) at lr(step)
    -> metrics record -> checkpoint every N steps (atomic) -> final model directory

A step reads nothing back from the device (on a GPU the host queues the next step while the
device runs this one): the loss weights stay tensors, a non-finite loss or gradient skips
the update on the device, and the step's figures wait in `_pending` until a step that logs,
evaluates or checkpoints reads them all in one copy (`_settle`), which is also where a
skipped step or non-finite weights stop the run, before anything is recorded or saved.

`train(TrainConfig(...))` runs it in-process; `pldr train` maps its flags onto `TrainConfig`.
Under `torchrun` the same code shards the model with FSDP2. The pieces around the loop:
prepare.py (inputs checked and loaded, run folder, model), checkpointing.py (resumable
state, one format: DCP; the final export), stats.py (a step's sums, one all-reduce) and
metrics.py (means, metrics.jsonl, TensorBoard). A run folder looks like this:

    OUT/tokenizer.model            the tokenizer (trained on the data unless given)
    OUT/train_config.json          the run's settings
    OUT/metrics.jsonl              one JSON object per report (split "train" or "val")
    OUT/tb/                        TensorBoard events
    OUT/checkpoints/step-00000100/ a resumable checkpoint (checkpointing.py)
    OUT/final/                     model directory: config.json, model.safetensors,
                                   tokenizer.model (what `pldr generate --model` reads)

Resuming restores the model, optimizer, schedule step, data position and metric sums, so a
resumed run logs the same losses as one that never stopped, on any number of processes.
Progress goes to the "pldr" logger (and a tqdm bar); only the CLI prints.
"""

from __future__ import annotations

import gc
import logging
import math
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import Tensor

from ..errors import PLDRError
from ..model.losses import loss_with_dag
from . import distributed as ptd
from .checkpointing import CheckpointManager
from .config import TrainConfig
from .metrics import DAG_KEYS, METRICS_FILE, MetricsLog, TrainMetrics, format_record
from .prepare import PreparedRun, build_training, make_run_folder, prepare_run
from .schedule import lr_at
from .signals import stop_on_signals
from .stats import StepStats
from .step import forward_backward, gradient_norm_sq, update

log = logging.getLogger("pldr")


_SUMS = 8  # a step row: StepStats.pack() [8], squared gradient norm, stop request, found_inf


@dataclass
class _Pending:
    """A step whose figures are still on the device: its all-reduced row and what the
    host knows of it."""

    step: int
    row: Tensor   # float64 [11] on the device
    lr: float
    epoch: int
    tokens: int


class TrainingError(PLDRError):
    """Training cannot go on (e.g. the loss became NaN); the last good checkpoint is kept."""


@dataclass
class TrainResult:
    """What a run did: where it wrote, how far it got, and the metric records it logged."""

    out_dir: Path
    step: int
    total_steps: int
    final_dir: Path | None = None        # None when interrupted
    checkpoint: Path | None = None       # the last checkpoint written (or resumed from)
    interrupted: bool = False
    records: list[dict[str, Any]] = field(default_factory=list)

    @property
    def train_losses(self) -> dict[int, float]:
        """step -> logged training loss of this call's train records."""
        return {r["step"]: r["loss"] for r in self.records if r["split"] == "train"}


class Trainer:
    """The loop of one prepared run: `Trainer(prepare_run(cfg)).run()` is what `train(cfg)`
    does. It owns the step, the metric trackers and the stop flag; the checkpoint manager
    owns what is on disk."""

    def __init__(self, run: PreparedRun, on_step: Callable[[int, dict], None] | None = None,
                 continue_hint: str = "continue with `resume='auto'`"):
        self.prepared = run
        self.cfg, self.dist, self.device = run.cfg, run.dist, run.dist.device
        self.on_step = on_step
        self.continue_hint = continue_hint  # how to go on from a checkpoint, said on a stop
        self.train_loader, self.val_loader = run.train_loader, run.val_loader
        self.total_steps = run.total_steps
        self.step = 0
        self.metrics = TrainMetrics()
        self.stop_flag = threading.Event()
        self.records: list[dict[str, Any]] = []
        self.checkpoints = CheckpointManager(run.out, run.dist, run.cfg.keep_checkpoints,
                                             run.config, run.tokenizer)
        self.last_eval_step = -1
        self.updating = False  # True while the optimizer changes the weights
        self.probe: Tensor | None = None  # a batch [b, T+1] of the last step, run before a save
        self.log: MetricsLog | None = None
        self.stop_early = False  # set by an evaluation hook: end the run as if complete
        self._pending: list[_Pending] = []  # steps whose figures are still on the device
        self._last_values: dict[str, Any] = {}
        self._stop_agreed = False  # under torchrun: some process was asked to stop
        self.skipped: Tensor = torch.zeros((), device=self.device)  # updates skipped (device)
        self.forward: Callable[..., Any] | None = None  # the compiled model, with --compile

    def _say(self, text: str) -> None:
        if self.dist.is_main:
            log.info(text)

    # ----- the loop ------------------------------------------------------------------------

    def run(self) -> TrainResult:
        run = self.prepared
        # the model is built and the checkpoint read before the run folder is touched, so a
        # failure of either leaves the folder (and its train_config.json) as it was
        self.model, self.optimizer = self._build()
        if self.cfg.compile:  # the same module's weights: checkpoints see no difference
            self.forward = torch.compile(self.model)
        if run.resume_dir is not None:
            self._load(run.resume_dir)
        make_run_folder(run)
        if run.resume_dir is not None:
            self._say(f"resumed from {run.resume_dir} at step {self.step}")
            if self.cfg.truncate_later_steps:
                for gone in self.checkpoints.discard_later(self.step):
                    self._say(f"truncate_later_steps: removed {gone}")
        # a fresh start over what a run that failed before its first checkpoint left drops
        # that run's records (-1: every record is later)
        restart = -1 if (run.out / METRICS_FILE).exists() else None
        self.log = MetricsLog(run.out, self.dist.is_main, run.tensorboard,
                              self.step if run.resume_dir is not None else restart)
        from tqdm.auto import tqdm

        start = self.step
        bar = tqdm(total=self.total_steps, initial=self.step, unit="step",
                   disable=not run.progress, dynamic_ncols=True)
        try:
            with stop_on_signals(self.stop_flag):
                interrupted = self._loop(bar)
            if interrupted:
                return self._result(interrupted=True)
            if self.step > start or run.resume_dir is None:  # not a finished run resumed
                if self.val_loader is not None and self.last_eval_step != self.step:
                    self._evaluate()
                if self.step != self.checkpoints.last_step:
                    self._save()
            return self._result(final_dir=self._export_final())
        except RuntimeError as e:
            reason = ptd.peer_failure(e) if self.dist.enabled else None
            if reason is None:
                raise
            raise TrainingError(f"rank {self.dist.rank}: another process of this run failed or "
                                f"stopped answering during step {self.step + 1} ({reason}); "
                                + self._resume_hint() + " (the same torchrun command)") from None
        finally:
            bar.close()
            self.log.close()

    def _loop(self, bar: Any) -> bool:
        """Train until total_steps; True when stopped early by a signal (checkpoint saved).

        A step that neither reports, evaluates nor checkpoints reads nothing back from the
        device: its figures wait on the device until the next step that does (`_settle`)."""
        batches = self._batches()
        timer = time.perf_counter()
        tokens_at_report = self.metrics.tokens
        while self.step < self.total_steps and not self.stop_early:
            # where a checkpoint resumes if a KeyboardInterrupt cuts this step short (one
            # process only: under torchrun a second Ctrl-C ends the run without a save)
            position: dict[str, Any] | None = None if self.dist.enabled else self._position()
            try:
                micro = [next(batches) for _ in range(self.cfg.grad_accum)]
                self._train_step(micro)
                position = None  # the step is complete: the live state is consistent
                self.updating = False  # only now, so no interrupt pairs new weights with `position`
                bar.update(1)
                report = self._report_due(self.step)
                evaluate = bool(self.cfg.eval_every and self.step % self.cfg.eval_every == 0
                                and self.val_loader is not None)
                save = bool(self.cfg.save_every and self.step % self.cfg.save_every == 0)
                values = None
                if report or evaluate or save or self.on_step is not None:
                    values = self._settle()  # the one read of the device since the last
                if report:
                    now = time.perf_counter()
                    tokens = self.metrics.tokens - tokens_at_report
                    record = {"step": self.step, "split": "train",
                              "epoch": self.metrics.epoch_index, **self.metrics.report(),
                              "step_loss": values["loss"], "lr": values["lr"],
                              "tokens": self.metrics.tokens,
                              "tokens_per_s": tokens / max(now - timer, 1e-9)}
                    self._record(record)
                    bar.set_postfix(loss=f"{record['loss']:.4f}",
                                    tok_s=f"{record['tokens_per_s']:.0f}")
                    timer, tokens_at_report = time.perf_counter(), self.metrics.tokens
                if evaluate:
                    self._evaluate()
                if save:
                    self._save()
                if self.on_step is not None:
                    self.on_step(self.step, values)
            except KeyboardInterrupt:
                # a second Ctrl-C (the first only sets stop_flag): save unless the weights are
                # half-updated or other ranks wait in a collective
                if self.dist.enabled or self.updating:
                    raise
                if position is not None:  # the step was cut short: forget its figures
                    self._pending = [p for p in self._pending if p.step <= position["step"]]
                self.model.train()
                self._save(position)
                self._say(f"interrupted at step {self.step}; " + self._resume_hint())
                return True
            stop = self.stop_flag.is_set() if not self.dist.enabled else self._stop_agreed
            if stop:
                if self.step != self.checkpoints.last_step:
                    self._save()
                self._say(f"stopped by a signal at step {self.step}; " + self._resume_hint())
                return True
        return False

    def _report_due(self, step: int) -> bool:
        """Whether step `step` ends with a train record."""
        return step % self.cfg.log_every == 0 or step == self.total_steps

    def _resume_hint(self) -> str:
        if self.checkpoints.last is None:
            return "no checkpoint yet: start again to train"
        return f"checkpoint {self.checkpoints.last}; {self.continue_hint}"

    def _batches(self) -> Iterator[Tensor]:
        """Training batches across epoch boundaries, from the loader's current position."""
        while True:
            yield from self.train_loader

    def _forwards(self, micro: list[Tensor]) -> list[Tensor]:
        """The step's rows as the forwards take them: each loader batch [b, T+1] split into
        pieces of --micro-batch-size rows."""
        size = self.prepared.micro_batch_size
        return [piece for ids in micro for piece in ids.split(size)]

    def _train_step(self, micro: list[Tensor]) -> None:
        """One optimizer step over `micro` batches [b, T+1] (this rank's rows), queued on the
        device without reading anything back.

        Each forward's loss is scaled so that the gradients FSDP averages over ranks (and
        that accumulate over forwards) equal the gradient of the loss of the whole global
        batch: the masked CE averages over all non-pad targets of all ranks and forwards
        (weight n_local / n_global * world_size), the DAG terms average over forwards and
        ranks (each is already a batch mean). The token counts stay on the device. The
        step's sums, its squared gradient norm and the stop request are all-reduced in one
        tensor; a non-finite loss or gradient skips the update on the device (`found_inf`)
        and is counted there. The row joins `_pending` for `_settle` to read."""
        cfg, W = self.cfg, self.dist.world_size
        pad = self.prepared.config.pad_id
        pieces = [ids.to(self.device, non_blocking=True) for ids in self._forwards(micro)]
        M = len(pieces)
        counts = [(ids[:, 1:] != pad).sum() for ids in pieces]         # 0-d int64 each
        n_global = ptd.all_reduce_sum(torch.stack(counts).sum().double(), self.dist)
        scale = W / n_global.clamp(min=1.0)  # n_global 0: every count is 0, so every weight
        stats = StepStats()
        # DAG values cost a float64 matrix exponential per head and layer: without DAG terms
        # in the loss they are computed on the steps that get reported only
        dag = any(cfg.dag_coeffs) or self._report_due(self.step + 1)
        for i, ids in enumerate(pieces):
            ptd.set_gradient_sync(self.model, i == M - 1)
            lo, predicted = forward_backward(
                self.model, ids, pad_id=pad, dag_coeffs=cfg.dag_coeffs,
                ce_weight=(counts[i] * scale).float(), dag_weight=1 / M, with_deductive=dag,
                amp_dtype=self.prepared.amp_dtype, pads=self.prepared.pads,
                forward=self.forward)
            stats.add_batch(lo, predicted, ids[:, 1:], counts[i], pad)
        grad_sq = gradient_norm_sq(self.model.parameters()).to(self.device)
        stop = torch.tensor([float(self.stop_flag.is_set())], dtype=torch.float64)
        row = ptd.all_reduce_sum(torch.cat([stats.pack(self.device), grad_sq.reshape(1),
                                            stop.to(self.device)]), self.dist)  # [8 + 2]
        found_inf = (~torch.isfinite(row[:_SUMS])).any().to(torch.float32)  # 0-d, 1.0: skip
        self.skipped = self.skipped + found_inf
        self.probe = pieces[0]
        lr = lr_at(self.step + 1, cfg.lr, cfg.warmup_steps, self.prepared.lr_total_steps,
                   cfg.lr_alpha)
        tokens = cfg.batch_size * self.prepared.context_length * len(micro)
        self.updating = True
        update(self.model, self.optimizer, lr, found_inf)
        self.step += 1
        self._pending.append(_Pending(self.step, torch.cat([row, found_inf.double()[None]]),
                                      lr, self.train_loader.epoch, tokens))
        # `updating` stays True until the loop drops its position

    def _settle(self) -> dict[str, Any]:
        """Read the figures of the steps since the last read (one copy to the host) and
        account for them: a step whose loss or gradients were not finite (its update was
        skipped) or weights that are no longer finite stop the run with a TrainingError
        naming the last good checkpoint; the others go into the metric means in order.
        Returns the last step's figures (loss, CE, accuracy, DAG values, lr, grad_norm). Under
        torchrun it also tells whether some process was asked to stop."""
        if not self._pending:
            return self._last_values
        pending, self._pending = self._pending, []
        weights_ok = self._finite_flag(self.model.parameters())
        rows = torch.cat([torch.stack([p.row for p in pending]).flatten(),
                          weights_ok.reshape(1), self.skipped.double().reshape(1)]).tolist()
        width = pending[0].row.numel()
        for k, p in enumerate(pending):
            row = rows[k * width:(k + 1) * width]
            total = StepStats.unpack(torch.tensor(row[:_SUMS], dtype=torch.float64))
            values = total.figures(self.cfg.dag_coeffs)
            if not math.isfinite(values["loss"]):
                self.optimizer.zero_grad(set_to_none=True)
                self._fail(f"the loss became {values['loss']} at step {p.step}")
            if row[-1]:  # found_inf: the update was skipped on the device
                self._fail(f"the gradients of step {p.step} hold NaN or inf; the step was "
                           "not taken")
            values["lr"] = p.lr
            values["grad_norm"] = math.sqrt(row[_SUMS])
            self.metrics.add({k2: values[k2] for k2 in ("loss", "ce", "accuracy",
                                                         *(n for _, n in DAG_KEYS))},
                             p.epoch, p.tokens)
            self._stop_agreed = self._stop_agreed or row[_SUMS + 1] > 0
            self._last_values = values
        if rows[-2] == 0:
            self._fail(f"the weights became NaN or inf by step {pending[-1].step} (after step "
                       f"{pending[0].step - 1}); nothing of it was saved")
        return self._last_values

    def _finite_flag(self, tensors: Iterator[Tensor | None]) -> Tensor:
        """1.0 when every given tensor (this rank's shards) is finite on every rank, else 0.0:
        a float64 0-d tensor on the device, nothing read back (one all-reduce)."""
        flags = [torch.isfinite(_local(t)).all() for t in tensors if t is not None]
        bad = torch.zeros((), dtype=torch.float64, device=self.device)
        if flags:
            bad = bad + (~torch.stack(flags)).sum()
        return (ptd.all_reduce_sum(bad, self.dist) == 0).double()

    def _all_finite(self, tensors: Iterator[Tensor | None]) -> bool:
        """Whether every given tensor (this rank's shards) is finite on every rank: one
        all-reduce and one sync (at checkpoint time only)."""
        return bool(self._finite_flag(tensors))

    def _fail(self, what: str) -> None:
        """Stop the run with a TrainingError naming the last good checkpoint, which resumes."""
        last = self.checkpoints.last
        if last is not None:
            where = (f"; the last good checkpoint is {last}: resume it with `resume={str(last)!r}` "
                     "and a lower `lr`")
        else:
            where = ("; no checkpoint was written yet, so the same settings with a lower `lr` "
                     "starts the run again")
        raise TrainingError(f"{what}{where} (or raise `warmup_steps`, or use float32)")

    @torch.no_grad()
    def _check_output(self) -> None:
        """Before a checkpoint is written: the live weights must give finite logits on a
        batch of the last step, so that every checkpoint written can be resumed (a huge
        update can leave the weights finite but the next forward NaN)."""
        if self.probe is None:
            return
        ids = self.probe.to(self.device)
        with self._autocast():
            logits = self.model(ids[:, :-1]).logits                        # [b, T, V]
        if not self._all_finite([logits]):
            self._fail(f"the weights after step {self.step} give NaN or inf outputs; their "
                       "checkpoint was not written")

    def _autocast(self):
        if self.prepared.amp_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.prepared.amp_dtype)

    @torch.no_grad()
    def _evaluate(self) -> dict[str, Any]:
        """Validation loss/accuracy (token-weighted over the whole split) and DAG values."""
        self.model.eval()
        pad = self.prepared.config.pad_id
        stats = StepStats()
        for i, ids in enumerate(self.val_loader.iter_epoch(0)):
            if self.cfg.eval_batches and i >= self.cfg.eval_batches:
                break
            n = int((ids[:, 1:] != pad).sum())  # counted before the copy: no device sync
            ids = ids.to(self.device)
            x, y = ids[:, :-1], ids[:, 1:]
            with self._autocast():
                out = self.model(x, return_deductive=True)
            lo = loss_with_dag(out.logits, y, out.deductive, (0.0, 0.0, 0.0), pad)
            stats.add_batch(lo, out.logits.argmax(-1), y, n, pad)
        total = stats.all_reduce(self.dist)
        self.model.train()
        record = {"step": self.step, "split": "val", "epoch": self.metrics.epoch_index,
                  **total.figures(self.cfg.dag_coeffs), "tokens": int(total.tokens)}
        self._record(record)
        self.last_eval_step = self.step
        return record

    def _record(self, record: dict[str, Any]) -> None:
        """Keep a metrics record, write it to metrics.jsonl / TensorBoard and, without a
        progress bar, log it as one line."""
        self.records.append(record)
        if self.log is not None:
            self.log.write(record)
        if not self.prepared.progress:
            self._say(format_record(record, self.total_steps))

    # ----- checkpoints ---------------------------------------------------------------------

    def _position(self) -> dict[str, Any]:
        """Where the data and the step stand: with the model, the optimizer and the metrics
        (read at save time, once the steps before are settled), what a checkpoint must hold
        to continue exactly here (taken before every step of a 1-process run, for a Ctrl-C
        mid-step: a few integers, no copy of the metrics)."""
        return {"loader": self.train_loader.state_dict(), "step": self.step,
                "extra": self._extra_state()}

    def _save(self, position: dict[str, Any] | None = None) -> Path | None:
        """A checkpoint of `position` (default: now) with the live model and optimizer.

        Nothing is written before the first step: a fresh start is the same run (and reading
        an optimizer's empty state would initialise it, changing its step count)."""
        position = position or self._position()
        if position["step"] == 0:
            return None
        self._settle()  # every step up to here is finite and in the metrics
        self._check_output()
        return self.checkpoints.save(self.model, self.optimizer, position["step"], {
            "loader": position["loader"], "metrics": self.metrics.state_dict(),
            "total_steps": self.total_steps, "lr_total_steps": self.prepared.lr_total_steps,
            "train_config": self.cfg.to_dict(), "extra": position.get("extra", {})})

    def _load(self, ckpt: Path) -> None:
        """Restore model, optimizer, step, data position and metrics from `ckpt`."""
        state = self.checkpoints.load(ckpt, self.model, self.optimizer)
        self.step = int(state["step"])
        self.train_loader.load_state_dict(state["loader"])
        self.metrics.load_state_dict(state["metrics"])
        self._load_extra_state(state.get("extra", {}))

    # ----- hooks: what a run other than pretraining (pldr.finetune) replaces -----------------

    def _build(self) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        """The model in train mode (sharded under torchrun) and its optimizer."""
        return build_training(self.prepared)

    def _export_final(self) -> Path:
        """Write the trained model to OUT/final; returns the directory."""
        return self.checkpoints.export_final(self.model)

    def _extra_state(self) -> dict[str, Any]:
        """JSON state besides the loop's own that a checkpoint must carry to resume exactly."""
        return {}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore what `_extra_state` returned."""

    def _result(self, final_dir: Path | None = None, interrupted: bool = False) -> TrainResult:
        return TrainResult(out_dir=self.prepared.out, step=self.step, total_steps=self.total_steps,
                           final_dir=final_dir, checkpoint=self.checkpoints.last,
                           interrupted=interrupted, records=self.records)


def _local(t: Tensor) -> Tensor:
    """This rank's part of a tensor (a DTensor shard under FSDP, else the tensor)."""
    return t.to_local() if hasattr(t, "to_local") else t


def train(cfg: TrainConfig, *, on_step: Callable[[int, dict], None] | None = None,
          continue_hint: str = "continue with `resume='auto'`") -> TrainResult:
    """Run training as `cfg` says; see `TrainConfig` and the module docstring.

    `on_step(step, values)` is called after every optimizer step with the step's global loss,
    accuracy, DAG values and learning rate. `continue_hint` is what a stopped run says after
    its checkpoint's name (a command that wraps training, like `pldr demo`, says its own).
    Under torchrun the process group is started here and ended when training ends."""
    started = ptd.env_world_size() > 1 and not torch.distributed.is_initialized()
    finished = False
    try:
        result = Trainer(prepare_run(cfg), on_step=on_step, continue_hint=continue_hint).run()
        finished = True
        return result
    finally:
        if started:
            gc.collect()  # drop the sharded model (its DTensors hold the group) first
            ptd.destroy_distributed(synchronize=finished)


__all__ = ["Trainer", "TrainResult", "TrainingError", "train", "format_record"]
