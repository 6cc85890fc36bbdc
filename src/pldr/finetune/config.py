"""`FinetuneConfig`: every setting of a fine-tuning run; `pldr finetune`'s flags come from its
fields (help in the metadata, as `TrainConfig`'s), and `--config FILE` uses the same names.

The defaults are the recipe of the published PLDR-LLM-v52-81M-FT-SC-1 / FT-TC-1 models:
learning rate 7e-5, 20 warm-up steps, gradient clipping at norm 1.0, 2 epochs, right
padding, EOS appended to each text.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError
from ..training.config import TrainConfig, setting
from .metrics import BEST_METRIC
from .tasks import TASKS

DEFAULT_LORA_TARGETS = ("wq", "wk", "wv", "dense", "gluw1", "gluw2", "gluw3")  # lora.py


@dataclass(frozen=True)
class FinetuneConfig:
    """A fine-tuning run: the task, the model it starts from, the data, and the training
    settings (as `TrainConfig`'s, with the fine-tuning recipe's defaults)."""

    task: str = setting("sequence-classification", "what to fine-tune for", choices=TASKS)
    model: str = setting("", "the model to start from: any directory or checkpoint "
                         "`pldr.load_model` reads (a causal model gets a new head; a model "
                         "with this task's head keeps it)", metavar="PATH")
    data: str = setting("", "training rows: a .jsonl/.json/.csv/.parquet file or folder, or "
                        "hf:NAME[:CONFIG]", metavar="SOURCE")
    eval_data: str | None = setting(None, "evaluation rows (default: --data with "
                                    "--eval-split, if that is given)", metavar="SOURCE")
    out: str = setting("runs/finetune", "run folder: checkpoints, metrics.jsonl, best/, final/",
                       metavar="DIR")
    split: str = setting("train", "training split, e.g. train or train[:90%]")
    eval_split: str | None = setting(None, "evaluation split (default: validation for hf: "
                                     "data, train for local files, when --eval-data is given; "
                                     "none: no evaluation)")
    tokenizer: str | None = setting(None, "SentencePiece .model (default: the model "
                                    "directory's)", metavar="FILE")
    text_column: str | None = setting(None, "sequence-classification text (default text)")
    label_column: str | None = setting(None, "sequence-classification label (default label)")
    tokens_column: str | None = setting(None, "token-classification words (default tokens)")
    tags_column: str | None = setting(None, "token-classification tags (default ner_tags)")
    question_column: str | None = setting(None, "question-answering question (default "
                                          "question)")
    context_column: str | None = setting(None, "question-answering context (default context)")
    answers_column: str | None = setting(None, "question-answering answers, SQuAD's "
                                         "{text, answer_start} (default answers)")
    prompt_column: str | None = setting(None, "causal prompt (default prompt)")
    completion_column: str | None = setting(None, "causal completion (default completion)")
    num_labels: int | None = setting(None, "labels of a new head (default: the label "
                                     "column's names, or the largest label + 1)")
    max_length: int | None = setting(None, "pieces per example, EOS included (default: the "
                                     "model's max_seq_len)")
    doc_stride: int | None = setting(None, "question-answering: pieces shared by consecutive "
                                     "windows of a long context (default: a third of the "
                                     "window)")
    max_answer_length: int = setting(30, "question-answering: longest answer in pieces")
    epochs: int | None = setting(2, "passes over the training rows (with --max-steps, "
                                 "whichever ends first)")
    max_steps: int | None = setting(None, "optimizer steps (default: --epochs)")
    batch_size: int = setting(16, "global batch: examples per step over all processes")
    grad_accum: int = setting(1, "micro-batches per optimizer step")
    micro_batch_size: int | None = setting(None, "examples per forward on each process "
                                           "(default: all of the process's examples)")
    lr: float = setting(7e-5, "peak learning rate")
    warmup_steps: int = setting(20, "linear warm-up steps")
    lr_alpha: float = setting(0.0, "final learning rate (cosine decay) as a fraction of --lr")
    weight_decay: float = setting(0.0, "AdamW weight decay")
    clip_norm: float = setting(1.0, "clip the gradients' global norm to this (0: off)")
    seed: int = setting(0, "seed of a new head, LoRA weights, dropout and the data order")
    eval_every: int = setting(0, "evaluate every N steps (default 0: at the end only)")
    save_every: int = setting(0, "checkpoint every N steps (default 0: at the end and on "
                              "Ctrl-C only)")
    log_every: int = setting(10, "report every N steps")
    metric: str | None = setting(None, "evaluation figure that picks the best checkpoint, "
                                 "kept as OUT/best (default: accuracy, entity f1, QA f1 or "
                                 "perplexity by task; loss always works)")
    early_stopping: int = setting(0, "stop after this many evaluations without a better "
                                  "--metric (default 0: never)")
    lora_r: int = setting(0, "LoRA rank; 0 fine-tunes every weight (default 0)")
    lora_alpha: float = setting(16.0, "LoRA scale numerator: updates are scaled alpha / r")
    lora_dropout: float = setting(0.0, "dropout on the LoRA branch's input")
    lora_targets: str = setting(",".join(DEFAULT_LORA_TARGETS),
                                "comma-separated module names that get LoRA adapters: the "
                                "decoder's linear layers (attention wq, wk, wv, dense; "
                                "feed-forward gluw1-3)")
    merge: bool = setting(False, "with LoRA: write OUT/final (and best) as plain model "
                          "directories with the adapters merged (default: adapter directories "
                          "that name their base model)")
    resume: str | None = setting(None, "continue from a checkpoint folder, or auto: the "
                                 "latest in --out", metavar="CKPT|auto")
    keep_checkpoints: int = setting(3, "keep the last N checkpoints, 0 keeps all")
    precision: str = setting("fp32", "bf16-mixed: bfloat16 autocast for the forward with "
                             "float32 weights and AdamW state, as pretraining's --precision",
                             choices=("fp32", "bf16-mixed"))
    device: str | None = setting(None, "cpu, cuda, cuda:1 (default: cuda if available)")
    dist_timeout: int = setting(1800, "under torchrun: seconds to wait for the other "
                                "processes in a collective")
    activation_checkpointing: bool = setting(False, "recompute each decoder layer's "
                                             "activations in backward (less memory)")
    progress: bool | None = setting(None, "tqdm progress bar (default: when stderr is a "
                                    "terminal)")
    tensorboard: bool | None = setting(None, "TensorBoard events in OUT/tb (default: when "
                                       "installed)")

    def replace(self, **changes: Any) -> "FinetuneConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def targets(self) -> list[str]:
        return [t.strip() for t in self.lora_targets.split(",") if t.strip()]

    @property
    def best_metric(self) -> str:
        return self.metric or BEST_METRIC[self.task]

    def check(self) -> None:
        """Single values that cannot work, named by their field (the rest: `TrainConfig`)."""
        if self.task not in TASKS:
            raise ConfigError(f"`task` must be one of {', '.join(TASKS)}, got {self.task!r}")
        if not self.model:
            raise ConfigError("`model` is required: a model directory or checkpoint")
        if not self.data:
            raise ConfigError("`data` is required: a .jsonl/.csv/.parquet file or hf:NAME")
        for name, low in (("doc_stride", 0), ("max_answer_length", 1), ("early_stopping", 0),
                          ("lora_r", 0), ("max_length", 2), ("num_labels", 1)):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < low):
                raise ConfigError(f"`{name}` must be an integer >= {low}, got {v!r}")
        for name in ("lora_alpha", "lora_dropout", "clip_norm"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                    or v < 0 or (name == "lora_dropout" and v >= 1):
                raise ConfigError(f"`{name}` must be a finite number >= 0"
                                  f"{' and < 1' if name == 'lora_dropout' else ''}, got {v!r}")
        if self.lora_r and not self.targets:
            raise ConfigError("`lora_targets` names no module; e.g. `lora_targets='wq,wv'`")
        if self.merge and not self.lora_r:
            raise ConfigError("`merge` merges LoRA adapters: give `lora_r=N` as well")
        self.train_config().check()

    def train_config(self) -> TrainConfig:
        """The `TrainConfig` the training loop runs under (its model/data fields name the
        fine-tuning inputs; what only pretraining reads keeps its default)."""
        return TrainConfig(
            model=self.model, data=self.data, out=self.out, tokenizer=self.tokenizer,
            max_steps=self.max_steps, epochs=self.epochs, batch_size=self.batch_size,
            grad_accum=self.grad_accum, micro_batch_size=self.micro_batch_size,
            context_length=self.max_length, lr=self.lr, warmup_steps=self.warmup_steps,
            lr_alpha=self.lr_alpha, weight_decay=self.weight_decay, seed=self.seed,
            save_every=self.save_every, eval_every=self.eval_every, log_every=self.log_every,
            resume=self.resume, precision=self.precision, device=self.device,
            dist_timeout=self.dist_timeout, keep_checkpoints=self.keep_checkpoints,
            activation_checkpointing=self.activation_checkpointing, progress=self.progress,
            tensorboard=self.tensorboard)

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "fine-tuning settings") -> "FinetuneConfig":
        """Settings of a --config file or a checkpoint; unknown keys are one error naming them."""
        if not isinstance(d, dict):
            raise ConfigError(f"{where} must be a mapping of settings, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown fine-tuning setting(s) {', '.join(unknown)} in {where}; "
                              "the keys are the flags of `pldr finetune --help` with _ for -")
        d = dict(d)
        for name in ("lr", "lr_alpha", "weight_decay", "lora_alpha", "lora_dropout",
                     "clip_norm"):
            if isinstance(d.get(name), str):
                try:
                    d[name] = float(d[name])
                except ValueError:
                    pass  # check() names it
        return cls(**d)


__all__ = ["FinetuneConfig", "DEFAULT_LORA_TARGETS"]
