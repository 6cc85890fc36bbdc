"""Training: the loop, the optimizer and learning-rate schedule, metrics and resumable
checkpoints, following the original's conventions (SPEC.md, "Training conventions").

    batch [B, T+1] -> forward on ids[:, :-1] -> masked CE on ids[:, 1:] + sum c * dag
    -> backward -> clip gradients by value at 1.0 -> AdamW(0.9, 0.95, eps 1e-5) at lr(step)
    -> metrics line -> checkpoint every N steps (atomic) -> final save_pretrained directory

`train(TrainConfig(...))` runs it in-process; `pldr train` maps its flags onto `TrainConfig`.
Under `torchrun` the same code shards the model with FSDP2 and checkpoints with Distributed
Checkpoint (pldr.distributed). A run directory looks like this:

    OUT/tokenizer.model            the tokenizer (trained on the data unless given)
    OUT/train_config.json          the run's settings
    OUT/metrics.jsonl              one JSON object per report (split "train" or "val")
    OUT/tb/                        TensorBoard events
    OUT/checkpoints/step-00000100/ a resumable checkpoint: trainer_state.json (written last),
                                   config.json, tokenizer.model, rng*.pt and either
                                   model.safetensors + optimizer.pt (one process) or DCP shards
    OUT/final/                     save_pretrained directory: config.json, model.safetensors,
                                   tokenizer.model (what `pldr generate --model` reads)

Resuming restores the model, optimizer, schedule step, RNG states, data position and metric
accumulators, so a resumed run logs the same losses as one that never stopped.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import random
import shutil
import signal
import sys
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import Tensor

from ..config import PLDRConfig
from ..devices import parse_dtype
from ..errors import CheckpointError, ConfigError, DataError, PLDRError
from ..files import atomic_write_text, is_temp_name, replace_dir
from ..model.losses import loss_with_dag
from ..model.model import PLDRModel
from ..model.pretrained import (
    CONFIG_FILE,
    TOKENIZER_FILE,
    WEIGHTS_FILE,
    read_safetensors,
    save_pretrained,
    write_model_files,
)
from . import distributed as ptd
from .checkpointing import (
    CHECKPOINTS,
    FINAL,
    OPTIMIZER_FILE,
    STATE_FORMAT,
    STATE_VERSION,
    TRAINER_STATE,
    _capture_rng,
    _saveable_rng,
    checkpoint_name,
    find_resume_checkpoint,
    list_checkpoints,
    read_trainer_state,
    set_rng_state,
)
from .config import TrainConfig
from .metrics import DAG_KEYS, METRICS_FILE, MetricsLog, TrainMetrics
from .schedule import lr_at

ADAMW_BETAS = (0.9, 0.95)
ADAMW_EPS = 1e-5
CLIP_VALUE = 1.0


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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_model(config: PLDRConfig, device: torch.device, seed: int) -> PLDRModel:
    """A freshly initialised model: built on the meta device (no memory, no init), then
    materialised on `device` and initialised under `seed`, so every process (and a 1-process
    run) starts from the same weights."""
    with torch.device("meta"):
        model = PLDRModel(config)
    model.to_empty(device=device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        model.init_weights()
    return model


def _is_run_dir(out: Path) -> bool:
    return any((out / name).exists() for name in (CHECKPOINTS, METRICS_FILE, FINAL))


def _train_tokenizer(cfg: TrainConfig, split: str, vocab_size: int):
    """A SentencePiece model trained on the run's training documents, and those documents
    (so the loader need not read them again)."""
    from ..data.sources import load_documents
    from ..data.tokenizer import Tokenizer

    docs = load_documents(cfg.data, split, cfg.text_column)
    # SentencePiece samples this many documents when there are more (keeps memory bounded)
    return Tokenizer.train(docs, vocab_size, input_sentence_size=200_000,
                           shuffle_input_sentence=True), docs


@torch.no_grad()
def _add_batch_stats(stats: Tensor, lo: Any, logits: Tensor, y: Tensor, n_targets: int,
                     pad: int) -> None:
    """Add one batch's CE sum, correct predictions and DAG values to `stats`, laid out as
    [ce_sum, tokens, hits, dag_A, dag_Ap, dag_G, dag_count, ...] (tokens: the caller's)."""
    stats[0] += lo.ce.double() * n_targets
    stats[2] += ((logits.argmax(-1) == y) & (y != pad)).sum()
    if lo.dag:
        for j, (key, _) in enumerate(DAG_KEYS):
            stats[3 + j] += lo.dag[key].double()
        stats[6] += 1


@contextmanager
def _stop_on_signals(flag: threading.Event) -> Iterator[None]:
    """While training, SIGINT (Ctrl-C) and SIGTERM ask the loop to stop after the current step
    and save a checkpoint; a second Ctrl-C interrupts at once. Only the main thread can set
    signal handlers; elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def handler(signum: int, frame: Any) -> None:
        if flag.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        flag.set()

    for s in previous:
        signal.signal(s, handler)
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


class Trainer:
    """One training run. `Trainer(cfg).run()` is what `train(cfg)` does.

    The constructor validates every input and loads tokenizer and data before anything is
    written; `run()` creates the output folder, builds the model and trains."""

    def __init__(self, cfg: TrainConfig, on_step: Callable[[int, dict], None] | None = None):
        cfg.check()
        self.cfg = cfg
        self.on_step = on_step
        self.out = Path(cfg.out)
        self.world_size = ptd.env_world_size()
        if cfg.batch_size % self.world_size:
            raise ConfigError(f"--batch-size {cfg.batch_size} (the global batch) must be "
                              f"divisible by the number of processes, {self.world_size}")
        base_config = PLDRConfig.resolve(cfg.model, "--model")
        if base_config.variant != "v510" and any(cfg.dag_coeffs):
            raise ConfigError("--dag-coeffs regularise A_LM, A_P and G_LM of a v510 model; a "
                              f"{base_config.variant} model has a fixed G_LM: drop --dag-coeffs")
        self.context_length = cfg.context_length or base_config.max_seq_len
        if self.context_length > base_config.max_seq_len:
            raise ConfigError(f"--context-length {self.context_length} is longer than the "
                              f"model's max_seq_len {base_config.max_seq_len}; lower it")
        self.resume_dir = find_resume_checkpoint(cfg.resume, self.out)
        self.resume_state = read_trainer_state(self.resume_dir) if self.resume_dir else None
        if self.resume_dir is None and _is_run_dir(self.out):
            raise CheckpointError(f"--out {str(self.out)!r} already holds a training run; pass "
                                  "--resume auto to continue it, or choose another --out")
        if cfg.tokenizer is not None and not Path(cfg.tokenizer).exists():
            raise DataError(f"--tokenizer {cfg.tokenizer!r} does not exist")
        from ..data.sources import parse_source
        from ..data.splits import default_splits, parse_split

        parse_source(cfg.data)  # a missing file or folder fails here
        self.train_split, self.val_split = default_splits(cfg.split, cfg.val_split)
        for s in (self.train_split, self.val_split):
            if s is not None:
                parse_split(s)

        self.dist = ptd.init_distributed(cfg.device)
        self.device = self.dist.device
        self._train_docs: list[str] | None = None  # set when a tokenizer is trained here
        self.tokenizer = self._tokenizer(base_config)
        tok = self.tokenizer
        if tok.pad_id != 0:
            raise DataError(f"the tokenizer's pad id is {tok.pad_id}, but the loss ignores id 0; "
                            "use a tokenizer with [PAD] = 0 (as `Tokenizer.train` makes)")
        self.config = base_config.replace(vocab_size=tok.vocab_size, pad_id=tok.pad_id,
                                          eos_id=tok.eos_id if tok.eos_id >= 0 else
                                          base_config.eos_id)
        if self.resume_dir is not None:
            saved = PLDRConfig.from_json(self.resume_dir / CONFIG_FILE)
            if saved != self.config:
                raise CheckpointError(f"the model of checkpoint {str(self.resume_dir)!r} does not "
                                      "match --model / --tokenizer; resume with the settings of "
                                      "the run (or omit them to reuse its own)")
        self.train_loader, self.val_loader = self._loaders()
        self.steps_per_epoch = len(self.train_loader) // cfg.grad_accum
        if self.steps_per_epoch == 0:
            raise DataError(f"one epoch has {len(self.train_loader)} batches, fewer than "
                            f"--grad-accum {cfg.grad_accum}; use more data or a smaller batch")
        by_epochs = (cfg.epochs or 1) * self.steps_per_epoch
        if cfg.max_steps is None:
            self.total_steps = by_epochs
        else:
            self.total_steps = cfg.max_steps if cfg.epochs is None else min(cfg.max_steps,
                                                                            by_epochs)
        self.lr_total_steps = cfg.lr_total_steps or self.total_steps
        self.amp_dtype = parse_dtype(cfg.dtype) if cfg.dtype != "float32" else None
        self.step = 0
        self.metrics = TrainMetrics()
        self.stop_flag = threading.Event()
        self.records: list[dict[str, Any]] = []
        self.last_checkpoint: Path | None = self.resume_dir
        self.last_saved_step = -1
        self.last_eval_step = -1
        self.updating = False  # True while the optimizer changes the weights
        self.log: MetricsLog | None = None

    # ----- setup ---------------------------------------------------------------------------

    def _tokenizer(self, base_config: PLDRConfig):
        """--tokenizer, else the resumed run's, else one trained on the data (on rank 0, sent
        to the other ranks so all use the same bytes)."""
        from ..data.store import is_store
        from ..data.tokenizer import Tokenizer

        cfg = self.cfg
        if cfg.tokenizer is not None or is_store(cfg.data):  # a prepared store carries its own
            return Tokenizer.load(cfg.tokenizer or cfg.data)
        if self.resume_dir is not None:
            for candidate in (self.resume_dir / TOKENIZER_FILE, self.out / TOKENIZER_FILE):
                if candidate.is_file():
                    return Tokenizer.load(candidate)
        proto = None
        if self.dist.is_main:
            vocab = cfg.vocab_size or base_config.vocab_size
            tokenizer, self._train_docs = _train_tokenizer(cfg, self.train_split, vocab)
            proto = tokenizer.model_proto
        return Tokenizer(ptd.broadcast_object(proto, self.dist))

    def _loaders(self):
        """The training loader (this rank's rows of each global batch) and the validation
        loader, whose batch shrinks to fit a small validation split."""
        from ..data.chunks import Chunks
        from ..data.loader import TokenBatches, build_loaders
        from ..data.tokens import load_tokens

        cfg = self.cfg
        common = dict(text_column=cfg.text_column, cache_dir=cfg.cache_dir,
                      progress=self._progress_enabled())
        train, _ = build_loaders(cfg.data, self.tokenizer, self.context_length, cfg.batch_size,
                                 split=self.train_split, val_split="none", mode=cfg.chunk_mode,
                                 batch_agg_count=cfg.batch_agg_count, seed=cfg.seed,
                                 rank=self.dist.rank, world_size=self.dist.world_size,
                                 train_docs=self._train_docs, **common)
        self._train_docs = None  # tokenised now (and cached); free the texts
        if self.val_split is None:
            return train, None
        docs = load_tokens(cfg.data, self.tokenizer, self.val_split, cfg.text_column,
                           cache_dir=cfg.cache_dir, progress=False)
        chunks = Chunks.from_tokens(docs, self.context_length + 1, cfg.chunk_mode,
                                    cfg.batch_size * cfg.batch_agg_count)
        W = self.dist.world_size
        batch = min(cfg.batch_size, len(chunks) // W * W)
        if batch == 0:
            self._say(f"note: the validation split {self.val_split} has fewer than {W} chunks "
                      f"of {self.context_length + 1} tokens; no validation")
            return train, None
        return train, TokenBatches(chunks, batch, shuffle=False, rank=self.dist.rank,
                                   world_size=W)

    def _progress_enabled(self) -> bool:
        if not self.dist.is_main:
            return False
        return self.cfg.progress if self.cfg.progress is not None else sys.stderr.isatty()

    def _say(self, text: str) -> None:
        if self.dist.is_main:
            print(text, flush=True)

    def _prepare_out(self) -> None:
        """Create the output folder (only now that every input passed) and write the tokenizer
        and settings; remove temporary folders of saves that were cut short."""
        if self.dist.is_main:
            (self.out / CHECKPOINTS).mkdir(parents=True, exist_ok=True)
            for p in (self.out / CHECKPOINTS).iterdir():
                if p.name.startswith((".tmp-", ".old-")) or is_temp_name(p.name):
                    shutil.rmtree(p, ignore_errors=True)
            if self.resume_dir is None or not (self.out / TOKENIZER_FILE).is_file():
                self.tokenizer.save(self.out / TOKENIZER_FILE)
            _write_json(self.out / "train_config.json",
                        {**self.cfg.to_dict(), "model_config": self.config.to_dict(),
                         "world_size": self.dist.world_size, "total_steps": self.total_steps,
                         "lr_total_steps": self.lr_total_steps})
        ptd.barrier(self.dist)

    def _build(self) -> None:
        seed_everything(self.cfg.seed)
        model = build_model(self.config, self.device, self.cfg.seed)
        if self.dist.enabled:
            ptd.shard_model(model, self.amp_dtype)
        self.model = model.train()
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=self.cfg.lr,
                                           betas=ADAMW_BETAS, eps=ADAMW_EPS,
                                           weight_decay=self.cfg.weight_decay)

    # ----- the loop ------------------------------------------------------------------------

    def run(self) -> TrainResult:
        self._prepare_out()
        self._build()
        if self.resume_dir is not None:
            self._load_checkpoint(self.resume_dir)
            self._say(f"resumed from {self.resume_dir} at step {self.step}")
        self.log = MetricsLog(self.out, self.dist.is_main, self.cfg.tensorboard,
                              self.step if self.resume_dir is not None else None)
        from tqdm.auto import tqdm

        start = self.step
        bar = tqdm(total=self.total_steps, initial=self.step, unit="step",
                   disable=not self._progress_enabled(), dynamic_ncols=True)
        try:
            with _stop_on_signals(self.stop_flag):
                interrupted = self._loop(bar)
            if interrupted:
                return self._result(interrupted=True)
            if self.step > start or self.resume_dir is None:  # not a finished run resumed
                if self.val_loader is not None and self.last_eval_step != self.step:
                    self._evaluate()
                if self.step != self.last_saved_step:
                    self._save_checkpoint()
            final = self.out / FINAL
            self._save_final(final)
            return self._result(final_dir=final)
        finally:
            bar.close()
            self.log.close()

    def _loop(self, bar) -> bool:
        """Train until total_steps; True when stopped early by a signal (checkpoint saved)."""
        batches = self._batches()
        timer = time.perf_counter()
        tokens_at_report = self.metrics.tokens
        while self.step < self.total_steps:
            # where a checkpoint resumes if a KeyboardInterrupt cuts this step short
            position: dict[str, Any] | None = self._position()
            try:
                micro = [next(batches) for _ in range(self.cfg.grad_accum)]
                values, stop = self._train_step(micro)
                position = None  # the step is complete: the live state is consistent
                self.updating = False  # only now, so no interrupt pairs new weights with `position`
                bar.update(1)
                if self._report_due(self.step):
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
                    if bar.disable and self.dist.is_main:
                        print(_format_record(record, self.total_steps), flush=True)
                    timer, tokens_at_report = time.perf_counter(), self.metrics.tokens
                if self.cfg.eval_every and self.step % self.cfg.eval_every == 0 \
                        and self.val_loader is not None:
                    self._evaluate()
                if self.cfg.save_every and self.step % self.cfg.save_every == 0:
                    self._save_checkpoint()
                if self.on_step is not None:
                    self.on_step(self.step, values)
            except KeyboardInterrupt:
                # a second Ctrl-C (the first only sets stop_flag): save unless the weights are
                # half-updated or other ranks wait in a collective
                if self.dist.enabled or self.updating:
                    raise
                self.model.train()
                self._save_checkpoint(position)
                self._say(f"interrupted at step {self.step}; " + self._resume_hint())
                return True
            if stop or (not self.dist.enabled and self.stop_flag.is_set()):
                if self.step != self.last_saved_step:
                    self._save_checkpoint()
                self._say(f"stopped by a signal at step {self.step}; " + self._resume_hint())
                return True
        return False

    def _report_due(self, step: int) -> bool:
        """Whether step `step` ends with a train record."""
        return step % self.cfg.log_every == 0 or step == self.total_steps

    def _resume_hint(self) -> str:
        if self.last_checkpoint is None:
            return "no checkpoint yet: start again to train"
        return f"checkpoint {self.last_checkpoint}; continue with --resume auto"

    def _batches(self) -> Iterator[Tensor]:
        """Training batches across epoch boundaries, from the loader's current position."""
        while True:
            yield from self.train_loader

    def _train_step(self, micro: list[Tensor]) -> tuple[dict[str, Any], bool]:
        """One optimizer step over `micro` batches [b, T+1] (this rank's rows).

        Each rank's loss is scaled so that the gradients FSDP averages over ranks (and that
        accumulate over micro-batches) equal the gradient of the loss of the whole global
        batch: the masked CE averages over all non-pad targets of all ranks and micro-batches
        (weight n_local / n_global * world_size), the DAG terms average over micro-batches and
        ranks (each is already a batch mean). Returns the step's global figures."""
        cfg, W, M = self.cfg, self.dist.world_size, len(micro)
        pad = self.config.pad_id
        counts = [int((ids[:, 1:] != pad).sum()) for ids in micro]
        n_global = ptd.all_reduce_sum(
            torch.tensor([float(sum(counts))], dtype=torch.float64, device=self.device),
            self.dist).item()
        # ce_sum, tokens, hits, dag_A, dag_Ap, dag_G, dag_count, stop
        stats = torch.zeros(8, dtype=torch.float64, device=self.device)
        # DAG values cost a float64 matrix exponential per head and layer: without DAG terms
        # in the loss they are computed on the steps that get reported only
        dag = any(cfg.dag_coeffs) or self._report_due(self.step + 1)
        for i, ids in enumerate(micro):
            ids = ids.to(self.device, non_blocking=True)
            x, y = ids[:, :-1], ids[:, 1:]                                 # [b, T] each
            ptd.set_gradient_sync(self.model, i == M - 1)
            with self._autocast():
                out = self.model(x, return_deductive=dag)                  # logits [b, T, V]
            lo = loss_with_dag(out.logits, y, out.deductive, cfg.dag_coeffs, pad)
            weight = counts[i] * W / n_global if n_global else 0.0
            (lo.ce * weight + (lo.loss - lo.ce) / M).backward()
            _add_batch_stats(stats, lo, out.logits, y, counts[i], pad)
        stats[1] = float(sum(counts))
        stats[7] = float(self.stop_flag.is_set())
        ptd.all_reduce_sum(stats, self.dist)
        s = stats.tolist()
        values = self._figures(s)
        if not math.isfinite(values["loss"]):
            self.optimizer.zero_grad(set_to_none=True)
            where = f"; the last good checkpoint is {self.last_checkpoint}" \
                if self.last_checkpoint else "; no checkpoint was written yet"
            raise TrainingError(f"the loss became {values['loss']} at step {self.step + 1}"
                                f"{where}. Lower --lr, raise --warmup-steps, or use float32")
        torch.nn.utils.clip_grad_value_(self.model.parameters(), CLIP_VALUE)
        lr = lr_at(self.step + 1, cfg.lr, cfg.warmup_steps, self.lr_total_steps, cfg.lr_alpha)
        values["lr"] = lr
        tokens = cfg.batch_size * self.context_length * M
        self.updating = True
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.metrics.add({k: values[k] for k in ("loss", "ce", "accuracy",
                                                  *(n for _, n in DAG_KEYS))},
                         self.train_loader.epoch, tokens)
        return values, s[7] > 0  # `updating` stays True until the loop drops its position

    def _figures(self, s: list[float]) -> dict[str, Any]:
        """Loss, CE, accuracy and DAG values from the summed stats of a step or evaluation."""
        n = max(s[1], 1.0)
        ce, acc = s[0] / n, s[2] / n
        dag = {name: s[3 + j] / s[6] for j, (_, name) in enumerate(DAG_KEYS)} if s[6] else \
            {name: None for _, name in DAG_KEYS}
        loss = ce + sum(c * dag[name] for c, (_, name) in zip(self.cfg.dag_coeffs, DAG_KEYS)
                        if c and dag[name] is not None)
        return {"loss": loss, "ce": ce, "accuracy": acc, **dag}

    def _autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    @torch.no_grad()
    def _evaluate(self) -> dict[str, Any]:
        """Validation loss/accuracy (token-weighted over the whole split) and DAG values."""
        self.model.eval()
        pad = self.config.pad_id
        stats = torch.zeros(7, dtype=torch.float64, device=self.device)
        for i, ids in enumerate(self.val_loader.iter_epoch(0)):
            if self.cfg.eval_batches and i >= self.cfg.eval_batches:
                break
            n = int((ids[:, 1:] != pad).sum())  # counted before the copy: no device sync
            ids = ids.to(self.device)
            x, y = ids[:, :-1], ids[:, 1:]
            with self._autocast():
                out = self.model(x, return_deductive=True)
            lo = loss_with_dag(out.logits, y, out.deductive, (0.0, 0.0, 0.0), pad)
            stats[1] += n
            _add_batch_stats(stats, lo, out.logits, y, n, pad)
        ptd.all_reduce_sum(stats, self.dist)
        self.model.train()
        record = {"step": self.step, "split": "val", "epoch": self.metrics.epoch_index,
                  **self._figures(stats.tolist()), "tokens": int(stats[1].item())}
        self._record(record)
        self.last_eval_step = self.step
        if self.dist.is_main and not self._progress_enabled():
            print(_format_record(record, self.total_steps), flush=True)
        return record

    def _record(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        if self.log is not None:
            self.log.write(record)

    # ----- checkpoints ---------------------------------------------------------------------

    def _position(self) -> dict[str, Any]:
        """What besides model and optimizer a checkpoint must hold to continue exactly here.

        Taken before every step (for a Ctrl-C mid-step), so the RNG states are captured as
        they are and converted only when a checkpoint is written."""
        return {"loader": self.train_loader.state_dict(), "rng": _capture_rng(),
                "metrics": self.metrics.state_dict(), "step": self.step}

    def _save_checkpoint(self, position: dict[str, Any] | None = None) -> Path | None:
        """Write OUT/checkpoints/step-N atomically: everything goes into `.tmp-step-N` and
        the folder is renamed once complete (trainer_state.json last), so a crash at any
        moment leaves either the old set of checkpoints or the new one. Keeps the last K.

        Nothing is written before the first step: a fresh start is the same run (and reading
        an optimizer's empty state would initialise it, changing its step count)."""
        position = position or self._position()
        step = position["step"]
        if step == 0:
            return None
        root = self.out / CHECKPOINTS
        final = root / checkpoint_name(step)
        tmp = root / f".tmp-{checkpoint_name(step)}"
        if self.dist.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        ptd.barrier(self.dist)
        if self.dist.enabled:
            ptd.save_sharded(self.model, self.optimizer, tmp)
            kind = "dcp"
        else:
            self._save_optimizer(tmp)
            kind = "single"
        torch.save(_saveable_rng(position["rng"]), tmp / f"rng-rank{self.dist.rank}.pt")
        ptd.barrier(self.dist)
        if self.dist.is_main:
            # config.json, tokenizer.model and (one process) model.safetensors, as a
            # save_pretrained folder holds them; a sharded run's weights are in its DCP shards
            write_model_files(self.model, tmp, self.tokenizer, weights=kind == "single")
            _write_json(tmp / TRAINER_STATE, {
                "format": STATE_FORMAT, "version": STATE_VERSION, "kind": kind,
                "step": step, "world_size": self.dist.world_size,
                "loader": position["loader"], "metrics": position["metrics"],
                "total_steps": self.total_steps, "lr_total_steps": self.lr_total_steps,
                "train_config": self.cfg.to_dict()})
            replace_dir(tmp, final)
            self._prune_checkpoints()
        ptd.barrier(self.dist)
        self.last_checkpoint, self.last_saved_step = final, step
        return final

    def _save_optimizer(self, directory: Path) -> None:
        """optimizer.pt of a 1-process run: the state keyed by parameter name, which a
        sharded run can load too."""
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        torch.save(get_optimizer_state_dict(self.model, self.optimizer),
                   directory / OPTIMIZER_FILE)

    def _prune_checkpoints(self) -> None:
        k = self.cfg.keep_checkpoints
        if k:
            for old in list_checkpoints(self.out)[:-k]:
                shutil.rmtree(old, ignore_errors=True)

    def _load_checkpoint(self, ckpt: Path) -> None:
        """Restore model, optimizer, step, data position, metrics and RNG from `ckpt` (a
        1-process or a sharded checkpoint, into a run of any number of processes)."""
        state = self.resume_state
        if state["kind"] == "dcp":
            ptd.load_sharded(self.model, self.optimizer, ckpt)
        else:
            from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

            weights = read_safetensors(ckpt / WEIGHTS_FILE)
            optim = torch.load(ckpt / OPTIMIZER_FILE, weights_only=True, map_location="cpu")
            if self.dist.enabled:
                ptd.load_full_state(self.model, self.optimizer, weights, optim)
            else:
                self.model.load_state_dict(weights)
                set_optimizer_state_dict(self.model, self.optimizer, optim)
        self.step = int(state["step"])
        self.train_loader.load_state_dict(state["loader"])
        self.metrics.load_state_dict(state["metrics"])
        rng_file = ckpt / f"rng-rank{self.dist.rank}.pt"
        if rng_file.is_file():
            set_rng_state(torch.load(rng_file, weights_only=True))
        self.last_saved_step = self.step

    def _save_final(self, final: Path) -> None:
        """The trained model as a save_pretrained folder (with the tokenizer)."""
        state = ptd.full_model_state(self.model, self.dist)
        if self.dist.is_main:
            with torch.device("meta"):
                plain = PLDRModel(self.config)
            plain.load_state_dict(state, assign=True)
            save_pretrained(plain, final, tokenizer=self.tokenizer)
        ptd.barrier(self.dist)

    def _result(self, final_dir: Path | None = None, interrupted: bool = False) -> TrainResult:
        return TrainResult(out_dir=self.out, step=self.step, total_steps=self.total_steps,
                           final_dir=final_dir, checkpoint=self.last_checkpoint,
                           interrupted=interrupted, records=self.records)


def _write_json(path: Path, obj: Any) -> None:
    """`obj` as indented JSON, written atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def _format_record(r: dict[str, Any], total: int) -> str:
    """One console line for a metrics record."""
    parts = [f"{r['split']:5s} step {r['step']}/{total}", f"loss {r['loss']:.4f}",
             f"acc {r['accuracy']:.3f}"]
    if r["split"] == "train":
        parts += [f"lr {r['lr']:.2e}", f"tok/s {r['tokens_per_s']:.0f}"]
    if r.get("dag_G") is not None:
        parts.append(f"dag A/Ap/G {r['dag_A']:.3g}/{r['dag_Ap']:.3g}/{r['dag_G']:.3g}")
    return "  ".join(parts)


def parse_dag_coeffs(text: str) -> tuple[float, float, float]:
    """'0.005,0.005,0.005' -> (0.005, 0.005, 0.005): cA, cAp, cG."""
    try:
        values = tuple(float(x) for x in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3:
        raise ConfigError(f"--dag-coeffs expects three comma-separated numbers cA,cAp,cG, got "
                          f"{text!r}")
    return values  # type: ignore[return-value]


def config_from_flags(flags: dict[str, Any]) -> TrainConfig:
    """The TrainConfig of the flags given on the command line. With --resume, the resumed
    run's saved settings are the base and the given flags override them, so
    `pldr train --resume auto --out RUN` continues a run without restating it."""
    flags = dict(flags)
    if isinstance(flags.get("dag_coeffs"), str):
        flags["dag_coeffs"] = parse_dag_coeffs(flags["dag_coeffs"])
    base = TrainConfig()
    if flags.get("resume"):
        ckpt = find_resume_checkpoint(flags["resume"], Path(flags.get("out", base.out)))
        saved = dict(read_trainer_state(ckpt).get("train_config", {}))
        names = {f.name for f in dataclasses.fields(TrainConfig)}
        base = TrainConfig.from_dict({k: v for k, v in saved.items() if k in names})
        # the checkpoint's own model config, which exists even if the original file does not
        base = base.replace(model=str(ckpt / CONFIG_FILE))
    return base.replace(**flags)


def train(cfg: TrainConfig, *, on_step: Callable[[int, dict], None] | None = None) -> TrainResult:
    """Run training as `cfg` says; see `TrainConfig` and the module docstring.

    `on_step(step, values)` is called after every optimizer step with the step's global loss,
    accuracy, DAG values and learning rate. Under torchrun the process group is started here
    and ended when training ends."""
    started = ptd.env_world_size() > 1 and not torch.distributed.is_initialized()
    finished = False
    try:
        result = Trainer(cfg, on_step=on_step).run()
        finished = True
        return result
    finally:
        if started:
            gc.collect()  # drop the sharded model (its DTensors hold the group) first
            ptd.destroy_distributed(synchronize=finished)
