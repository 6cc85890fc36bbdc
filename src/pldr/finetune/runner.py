"""`finetune(FinetuneConfig(...))`: the training loop of `pldr train` (training/trainer.py,
with its checkpoints, exact resume, torchrun/FSDP2 and metrics) run over task examples.

`prepare_finetune` checks and loads everything before anything is written (the model, its
head, the tokenizer, every data row); `FinetuneTrainer` replaces the loop's hooks: the model
it builds (a head on the decoder, LoRA), a step's loss (the task's), the evaluation (the
task's metrics, the best checkpoint kept as OUT/best, early stopping) and the export
(OUT/final: a model directory, or an adapter directory with LoRA unless --merge).

    OUT/metrics.jsonl, OUT/tb/, OUT/checkpoints/step-N/   as `pldr train`
    OUT/best/    the model at the best evaluation by --metric (with evaluation data)
    OUT/final/   the model at the end
"""

from __future__ import annotations

import gc
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from ..checkpoint.adapters import add_lora, attach_head, merge_lora, save_adapter
from ..errors import CheckpointError, ConfigError, DataError
from ..model.model import PLDRModel
from ..model.pretrained import save_pretrained
from ..training import distributed as ptd
from ..training.checkpointing import find_resume_checkpoint, verify_checkpoint
from ..training.prepare import PreparedRun, _check_leftovers, _tensorboard, is_run_dir
from ..training.schedule import lr_at
from ..training.stats import StepStats
from ..training.step import ADAMW_BETAS, ADAMW_EPS
from ..training.trainer import Trainer, TrainResult
from . import data as D
from .config import FinetuneConfig
from .evaluate import batch_loss, evaluate
from .metrics import higher_is_better
from .tasks import collate, columns_of, loss_items

log = logging.getLogger("pldr")
BEST = "best"
HEAD_MODULES = {"sequence-classification": "score", "token-classification": "score",
                "question-answering": "qa_outputs"}
METRICS_OF = {"sequence-classification": ("loss", "accuracy", "macro_f1", "mse"),
              "token-classification": ("loss", "precision", "recall", "f1", "accuracy"),
              "question-answering": ("loss", "exact_match", "f1"),
              "causal": ("loss", "perplexity")}


def head_class(task: str) -> type | None:
    """The head model class of a task (None for causal)."""
    from ..model.heads import HEADS

    return HEADS.get(task)


@dataclass
class FinetuneRun(PreparedRun):
    """A checked fine-tuning run: `PreparedRun` plus the model it starts from and the data."""

    fcfg: FinetuneConfig | None = None
    base: Any = None               # the loaded model (on CPU), before a head or LoRA
    new_head: bool = False         # a head is put on a causal model's decoder
    labels: D.Labels | None = None
    eval_data: Any = None          # TaskData or None


def load_start_model(fcfg: FinetuneConfig) -> tuple[Any, bool]:
    """The model `fcfg.model` names (on CPU) and whether the task needs a new head on it; a
    model with another task's head (or a head where causal needs the LM) is an error."""
    from ..checkpoint.load import load_model

    model = load_model(fcfg.model, device="cpu", dtype="float32")
    cls = head_class(fcfg.task)
    if isinstance(model, PLDRModel):
        return model, cls is not None
    have = type(model).__name__
    if cls is None or not isinstance(model, cls):
        need = f"a causal model or a {cls.__name__}" if cls else "a causal model (PLDRModel)"
        raise CheckpointError(f"`model` {fcfg.model!r} is a {have}; `task={fcfg.task!r}` starts "
                              f"from {need}: pick the matching `task`, or the base model")
    return model, False


def _tokenizer(fcfg: FinetuneConfig, vocab_size: int) -> Any:
    from ..data.tokenizer import Tokenizer

    found = Tokenizer.find(fcfg.tokenizer or fcfg.model)
    if found is None:
        raise DataError(f"fine-tuning needs the model's tokenizer: {fcfg.model!r} has no "
                        "tokenizer.model; pass `tokenizer=FILE`")
    tok = Tokenizer.load(found)
    if tok.vocab_size > vocab_size:
        raise DataError(f"the tokenizer has {tok.vocab_size} pieces but the model only "
                        f"{vocab_size}; use the model's own tokenizer")
    return tok


def eval_source(fcfg: FinetuneConfig) -> tuple[str, str] | None:
    """(source, split) of the evaluation rows, or None without evaluation."""
    if fcfg.eval_split == "none" or (fcfg.eval_data is None and fcfg.eval_split is None):
        return None
    data = fcfg.eval_data or fcfg.data
    split = fcfg.eval_split or ("validation" if data.startswith("hf:") else "train")
    return data, split


def prepare_finetune(fcfg: FinetuneConfig) -> FinetuneRun:
    """Check `fcfg` against the model, the data and the processes; load every row. Raises
    a PLDRError naming what to change before anything is written."""
    fcfg.check()
    cfg = fcfg.train_config()
    out = Path(fcfg.out)
    world = ptd.env_world_size()
    if cfg.batch_size % world:
        raise ConfigError(f"`batch_size` {cfg.batch_size} must be divisible by the number of "
                          f"processes, {world}")
    micro = cfg.micro_batch_size or cfg.batch_size // world
    if (cfg.batch_size // world) % micro:
        raise ConfigError(f"`micro_batch_size` {micro} must divide batch_size / processes = "
                          f"{cfg.batch_size // world}")
    if fcfg.best_metric not in METRICS_OF[fcfg.task]:
        raise ConfigError(f"`metric` {fcfg.best_metric!r} is not a figure of {fcfg.task}; "
                          f"choose one of {', '.join(METRICS_OF[fcfg.task])}")
    resume_dir = find_resume_checkpoint(cfg.resume, out)
    if resume_dir is not None:
        verify_checkpoint(resume_dir)
    elif is_run_dir(out):
        raise CheckpointError(f"`out` {str(out)!r} already holds a run; pass `resume='auto'` "
                              "to continue it, or choose another `out`")
    else:
        _check_leftovers(out, cfg.tokenizer)
    base, new_head = load_start_model(fcfg)
    if fcfg.lora_r:
        from ..checkpoint.adapters import lora_modules

        lora_modules(base, fcfg.targets)  # a target that names no layer fails here
    tok = _tokenizer(fcfg, base.config.vocab_size)
    max_len = fcfg.max_length or base.config.max_seq_len
    if max_len > base.config.max_seq_len:
        raise ConfigError(f"`max_length` {max_len} is longer than the model's max_seq_len "
                          f"{base.config.max_seq_len}")
    cols = columns_of(fcfg.task, {k.removesuffix("_column"): getattr(fcfg, k)
                                  for k in fcfg.to_dict() if k.endswith("_column")})
    table = D.read_split(fcfg.data, fcfg.split)
    given = None if new_head else _model_labels(base)
    labels = D.find_labels(fcfg.task, table, cols, fcfg.num_labels, given)
    what = f"{fcfg.data} {fcfg.split}"
    train = D.encode_split(fcfg.task, table, cols, tok, max_len, labels, fcfg.doc_stride, what)
    eval_data = None
    if (source := eval_source(fcfg)) is not None:
        rows = D.read_split(*source, param="eval_data" if fcfg.eval_data else "data")
        eval_data = D.encode_split(fcfg.task, rows, cols, tok, max_len, labels,
                                   fcfg.doc_stride, f"{source[0]} {source[1]}")
    config = _head_config(base.config, labels, fcfg.task, new_head)
    dist = ptd.init_distributed(cfg.device, timeout_s=cfg.dist_timeout)
    loader = D.ExampleBatches(train.examples, cfg.batch_size, seed=cfg.seed, rank=dist.rank,
                              world_size=dist.world_size)
    per_epoch = len(loader) // cfg.grad_accum
    if per_epoch == 0:
        raise DataError(f"{what} has {len(train.examples)} examples, fewer than one step of "
                        f"`batch_size` {cfg.batch_size} x `grad_accum` {cfg.grad_accum}")
    total = (cfg.epochs or 1) * per_epoch
    if cfg.max_steps is not None:
        total = cfg.max_steps if cfg.epochs is None else min(cfg.max_steps, total)
    import sys

    progress = dist.is_main and (cfg.progress if cfg.progress is not None
                                 else sys.stderr.isatty())
    return FinetuneRun(
        cfg=cfg, dist=dist, out=out, config=config, tokenizer=tok, context_length=max_len,
        train_loader=loader, val_loader=eval_data, total_steps=total, lr_total_steps=total,
        micro_batch_size=micro, amp_dtype=torch.bfloat16 if cfg.precision == "bf16-mixed" else None,
        tensorboard=_tensorboard(cfg.tensorboard), progress=progress, resume_dir=resume_dir,
        fcfg=fcfg, base=base, new_head=new_head, labels=labels, eval_data=eval_data)


def _model_labels(model: Any) -> list[str] | None:
    """A head model's label names in class order, from its config's id2label."""
    id2label = getattr(model.config, "id2label", None)
    if not id2label:
        return None
    return [id2label[k] for k in sorted(id2label, key=int)]


def _head_config(config: Any, labels: D.Labels | None, task: str, new_head: bool) -> Any:
    """The config of the model being trained: a new head's labels set in the base config."""
    if not new_head or labels is None:
        return config
    names = list(labels.names)
    return config.replace(num_labels=len(names), id2label=dict(enumerate(names)),
                          problem_type="regression" if len(names) == 1 else None)


class FinetuneTrainer(Trainer):
    """`Trainer` with the fine-tuning hooks (see the module docstring)."""

    prepared: FinetuneRun

    def __init__(self, run: FinetuneRun, on_step: Callable[[int, dict], None] | None = None):
        super().__init__(run, on_step)
        self.fcfg = run.fcfg
        self.task = run.fcfg.task
        self.best: dict[str, Any] | None = None  # {"value", "step"} of the best evaluation
        self.bad_evals = 0

    # ----- the model ---------------------------------------------------------------------

    def _assemble(self, base: Any, seed: int) -> torch.nn.Module:
        """`base` with the run's head (new heads initialised under `seed`) and LoRA."""
        run, f = self.prepared, self.fcfg
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = attach_head(base, head_class(f.task), run.config) if run.new_head else base
            if f.lora_r:
                train = (HEAD_MODULES[f.task],) if run.new_head else ()
                add_lora(model, f.lora_r, f.lora_alpha, f.lora_dropout, f.targets, train)
        return model

    def _build(self) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        run = self.prepared
        model = self._assemble(run.base, run.cfg.seed).to(self.device)
        run.base = None  # the trained model holds the weights now
        model.set_activation_checkpointing(run.cfg.activation_checkpointing)
        model.train()
        if self.dist.enabled:
            ptd.shard_model(model, run.amp_dtype)
        params = [p for p in model.parameters() if p.requires_grad]
        fused = all(p.device.type in ("cpu", "cuda") for p in params) or None
        optimizer = torch.optim.AdamW(params, lr=run.cfg.lr, betas=ADAMW_BETAS, eps=ADAMW_EPS,
                                      weight_decay=run.cfg.weight_decay, fused=fused)
        return model, optimizer

    # ----- a step ------------------------------------------------------------------------

    def _train_step(self, micro: list[list[Any]]) -> None:
        """One optimizer step over `micro` batches of examples (this rank's rows): each
        forward's mean loss weighted by its share of the global batch's items (as the
        pretraining step weighs tokens), gradient norm clipped, AdamW. Unlike pretraining's
        step it reads its figures at once (fine-tuning steps are few and short), so `_settle`
        has nothing pending and returns them."""
        cfg, W, run = self.cfg, self.dist.world_size, self.prepared
        examples = [e for m in micro for e in m]
        size = run.micro_batch_size
        pieces = [collate(self.task, examples[i:i + size], self.prepared.config.pad_id)
                  for i in range(0, len(examples), size)]
        counts = [loss_items(self.task, b) for b in pieces]
        real = sum(int(b["attention_mask"].sum()) for b in pieces)
        totals = ptd.all_reduce_sum(torch.tensor([float(sum(counts)), float(real)],
                                                 dtype=torch.float64, device=self.device),
                                    self.dist).tolist()
        n_global = totals[0]
        stats = StepStats()
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            # dropout draws from (seed, step, rank): a resumed run draws the same masks
            torch.manual_seed((cfg.seed * 1_000_003 + self.step) * W + self.dist.rank)
            for i, batch in enumerate(pieces):
                batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
                ptd.set_gradient_sync(self.model, i == len(pieces) - 1)
                loss, hits, _ = batch_loss(self.task, self.model, batch, run.amp_dtype)
                (loss * (counts[i] * W / n_global if n_global else 0.0)).backward()
                stats.ce_sum = stats.ce_sum + loss.detach().double() * counts[i]
                stats.tokens = stats.tokens + counts[i]
                stats.hits = stats.hits + hits.double()
        stats.stop = float(self.stop_flag.is_set())
        total = stats.all_reduce(self.dist)
        values = total.figures((0.0, 0.0, 0.0))
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not math.isfinite(values["loss"]):
            self.optimizer.zero_grad(set_to_none=True)
            self._fail(f"the loss became {values['loss']} at step {self.step + 1}")
        if not self._all_finite(p.grad for p in params):
            self.optimizer.zero_grad(set_to_none=True)
            self._fail(f"the gradients of step {self.step + 1} hold NaN or inf")
        self.probe = pieces[0]
        lr = lr_at(self.step + 1, cfg.lr, cfg.warmup_steps, run.lr_total_steps, cfg.lr_alpha)
        values["lr"] = lr
        self.updating = True
        if self.fcfg.clip_norm:
            values["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params,
                                                                       self.fcfg.clip_norm))
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        if not self._all_finite(params):
            self._fail(f"the update of step {self.step} made weights NaN or inf")
        self.metrics.add({k: values[k] for k in ("loss", "ce", "accuracy")},
                         self.train_loader.epoch, int(totals[1]))
        self._last_values = values
        self._stop_agreed = self._stop_agreed or total.stop > 0

    @torch.no_grad()
    def _check_output(self) -> None:
        """Before a checkpoint: the live weights give a finite loss on a batch of the last
        step (so every checkpoint written can be resumed)."""
        if self.probe is None:
            return
        batch = {k: v.to(self.device) for k, v in self.probe.items()}
        self.model.eval()
        loss, _, _ = batch_loss(self.task, self.model, batch, self.prepared.amp_dtype)
        self.model.train()
        if not self._all_finite([loss.detach().reshape(1)]):
            self._fail(f"the weights after step {self.step} give a NaN or inf loss; their "
                       "checkpoint was not written")

    # ----- evaluation, the best checkpoint, early stopping ------------------------------------

    @torch.no_grad()
    def _evaluate(self) -> dict[str, Any]:
        run = self.prepared
        figures = evaluate(self.task, self.model, run.eval_data,
                           batch_size=max(1, run.micro_batch_size), pad_id=run.config.pad_id,
                           device=self.device, amp_dtype=run.amp_dtype, dist=self.dist,
                           max_answer_length=self.fcfg.max_answer_length,
                           id2label=list(run.labels.names) if run.labels else None)
        self.model.train()
        record = {"step": self.step, "split": "val", "epoch": self.metrics.epoch_index,
                  **figures}
        self._record(record)
        self.last_eval_step = self.step
        self._track_best(figures)
        return record

    def _track_best(self, figures: dict[str, float]) -> None:
        """Keep OUT/best when `metric` improved; count evaluations without improvement for
        --early-stopping."""
        name = self.fcfg.best_metric
        value = figures.get(name)
        if value is None or not math.isfinite(value):
            return
        better = self.best is None or (value > self.best["value"] if higher_is_better(name)
                                       else value < self.best["value"])
        if better:
            self.best, self.bad_evals = {"value": value, "step": self.step}, 0
            self._export(self.prepared.out / BEST)
            if self.dist.is_main:
                log.info(f"best {name} {value:.4f} at step {self.step}: {self.prepared.out / BEST}")
        else:
            self.bad_evals += 1
            if self.fcfg.early_stopping and self.bad_evals >= self.fcfg.early_stopping:
                self.stop_early = True
                if self.dist.is_main:
                    log.info(f"early stopping at step {self.step}: {self.bad_evals} evaluations "
                             f"without a better {name} (best {self.best['value']:.4f} at step "
                             f"{self.best['step']})")

    def _extra_state(self) -> dict[str, Any]:
        return {"best": self.best, "bad_evals": self.bad_evals, "finetune": self.fcfg.to_dict()}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self.best, self.bad_evals = state.get("best"), int(state.get("bad_evals", 0))

    def _record(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        if self.log is not None:
            self.log.write(record)
        if not self.prepared.progress:
            keys = [k for k in record if k not in ("step", "split", "epoch")
                    and isinstance(record[k], float)][:6]
            self._say(f"{record['split']:5s} step {record['step']}/{self.total_steps}  "
                      + "  ".join(f"{k} {record[k]:.4g}" for k in keys))

    # ----- export ------------------------------------------------------------------------

    def _export_final(self) -> Path:
        return self._export(self.prepared.out / "final")

    def _export(self, dest: Path) -> Path:
        """The trained model as a model directory (LoRA merged with `merge`), or an adapter
        directory naming the base model; every rank gathers, rank 0 writes."""
        run, f = self.prepared, self.fcfg
        state = ptd.full_model_state(self.model, self.dist)
        if self.dist.is_main:
            model = self._skeleton()
            model.load_state_dict(state)
            if f.lora_r and not f.merge:
                save_adapter(model, dest, f.model, tokenizer=run.tokenizer)
            else:
                if f.lora_r:
                    merge_lora(model)
                save_pretrained(model, dest, tokenizer=run.tokenizer)
        ptd.barrier(self.dist)
        return dest

    def _skeleton(self) -> torch.nn.Module:
        """An unsharded CPU model of the trained model's structure (weights to be loaded)."""
        run = self.prepared
        cls = head_class(self.task)
        if run.new_head or cls is None:
            base = PLDRModel(run.config)
        else:
            base = cls(run.config)
        return self._assemble(base, 0)


def finetune(fcfg: FinetuneConfig, *,
             on_step: Callable[[int, dict], None] | None = None) -> TrainResult:
    """Run a fine-tuning as `fcfg` says (see the module docstring)."""
    started = ptd.env_world_size() > 1 and not torch.distributed.is_initialized()
    finished = False
    try:
        result = FinetuneTrainer(prepare_finetune(fcfg), on_step=on_step).run()
        finished = True
        return result
    finally:
        if started:
            gc.collect()
            ptd.destroy_distributed(synchronize=finished)


__all__ = ["FinetuneRun", "FinetuneTrainer", "prepare_finetune", "finetune", "head_class",
           "load_start_model", "eval_source", "score", "METRICS_OF"]


def score(task: str, model_path: str, data: str, split: str = "train", *,
          columns: dict[str, str | None] | None = None, tokenizer: str | None = None,
          max_length: int | None = None, doc_stride: int | None = None, max_answer_length: int = 30,
          batch_size: int = 16, device: Any = None) -> dict[str, Any]:
    """`pldr eval --task`: the loss and the task's metrics of a fine-tuned model (a model
    or adapter directory) on a labelled split, with its own labels; nothing is written."""
    from ..checkpoint.load import load_model
    from ..devices import resolve_device

    fcfg = FinetuneConfig(task=task, model=model_path, data=data, tokenizer=tokenizer)
    model = load_model(model_path, device=resolve_device(device))
    cls = head_class(task)
    if (cls is None and not isinstance(model, PLDRModel)) or (cls is not None
                                                             and not isinstance(model, cls)):
        raise CheckpointError(f"`model_path` {model_path!r} is a {type(model).__name__}, not a "
                              f"model for `task={task!r}`: score a model fine-tuned for it")
    tok = _tokenizer(fcfg, model.config.vocab_size)
    max_len = max_length or model.config.max_seq_len
    cols = columns_of(task, columns or {})
    table = D.read_split(data, split)
    labels = D.find_labels(task, table, cols, None, _model_labels(model)) \
        if cls is not None and task != "question-answering" else None
    encoded = D.encode_split(task, table, cols, tok, max_len, labels, doc_stride,
                             f"{data} {split}")
    figures = evaluate(task, model, encoded, batch_size=batch_size, pad_id=model.config.pad_id,
                       max_answer_length=max_answer_length,
                       id2label=list(labels.names) if labels else None)
    return {"task": task, "model": str(model_path), "data": data, "split": split,
            "rows": encoded.rows, **figures}
