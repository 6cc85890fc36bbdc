"""`TrainConfig`: every setting of a training run, checked before anything is written,
and saved with the run as `train_config.json`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from ..config import PLDRConfig
from ..devices import SUPPORTED_DTYPES
from ..errors import ConfigError


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run needs; `pldr train` flags map onto these fields one to one.

    `batch_size` is the global batch (rows per micro-batch over all processes; each of N
    processes takes batch_size / N rows). One optimizer step uses `grad_accum` micro-batches.
    The run lasts `max_steps` optimizer steps, or `epochs` passes over the training data,
    whichever ends first (one epoch when neither is given). The learning rate warms up
    linearly over `warmup_steps` and decays by cosine to `lr_alpha * lr` at `lr_total_steps`
    (default: the run's total steps)."""

    model: str | PLDRConfig = "tiny"   # preset name, config.json / hpdict path, or a PLDRConfig
    data: str = "builtin"              # builtin | FILE | DIR | hf:NAME[:CONFIG]
    out: str = "runs/train"
    tokenizer: str | None = None       # SentencePiece .model; None: train one on the data
    vocab_size: int | None = None      # for a trained tokenizer; default: the model's vocab_size
    split: str | None = None           # default train[:90%]
    val_split: str | None = None       # default train[90%:] when split is default; "none": off
    text_column: str | None = None
    chunk_mode: str = "pack"           # pack | pad | nopad (SPEC.md, Data)
    batch_agg_count: int = 1           # pad/nopad: documents are grouped batch_size * this
    max_steps: int | None = None
    epochs: int | None = None
    batch_size: int = 16
    grad_accum: int = 1
    context_length: int | None = None  # default: the model's max_seq_len
    lr: float = 1e-3
    warmup_steps: int = 100
    lr_alpha: float = 0.1
    lr_total_steps: int | None = None
    weight_decay: float = 0.1
    seed: int = 0
    save_every: int = 0                # 0: checkpoint only at the end (and on Ctrl-C)
    eval_every: int = 0                # 0: validate only at the end
    eval_batches: int | None = None    # cap on validation batches per evaluation
    log_every: int = 10
    resume: str | None = None          # checkpoint folder, or "auto" (the latest in out)
    dtype: str = "float32"             # float32 | bfloat16 (bf16 autocast, fp32 weights)
    dag_coeffs: tuple[float, float, float] = (0.0, 0.0, 0.0)  # cA, cAp, cG
    device: str | None = None          # default cuda when present, else cpu
    keep_checkpoints: int = 3          # 0 keeps all
    progress: bool | None = None       # tqdm bar; None: when stderr is a terminal
    tensorboard: bool = True
    cache_dir: str | None = None       # tokenised-data cache (default ~/.cache/pldr)

    def __post_init__(self) -> None:
        if not isinstance(self.dag_coeffs, tuple):
            object.__setattr__(self, "dag_coeffs", tuple(self.dag_coeffs))

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if isinstance(self.model, PLDRConfig):
            d["model"] = self.model.to_dict()
        d["dag_coeffs"] = list(self.dag_coeffs)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        """Read `to_dict` output (e.g. a checkpoint's saved settings); unknown keys are errors."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown training setting(s) {', '.join(unknown)}")
        d = dict(d)
        if isinstance(d.get("model"), dict):
            d["model"] = PLDRConfig.from_dict(d["model"])
        if "dag_coeffs" in d:
            d["dag_coeffs"] = tuple(d["dag_coeffs"])
        return cls(**d)

    def check(self) -> None:
        """Reject settings that cannot work, with a message naming the flag to change."""
        def integer(name: str, low: int, optional: bool = False) -> None:
            v = getattr(self, name)
            if v is None and optional:
                return
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ConfigError(f"--{name.replace('_', '-')} must be an integer >= {low}, "
                                  f"got {v!r}")
        integer("batch_size", 1)
        integer("grad_accum", 1)
        integer("batch_agg_count", 1)
        integer("log_every", 1)
        integer("save_every", 0)
        integer("eval_every", 0)
        integer("warmup_steps", 0)
        integer("keep_checkpoints", 0)
        integer("seed", 0)
        for name in ("max_steps", "epochs", "context_length", "lr_total_steps", "eval_batches",
                     "vocab_size"):
            integer(name, 1, optional=True)
        for name, low in (("lr", 0.0), ("weight_decay", 0.0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                    or v < low or (name == "lr" and v == 0):
                raise ConfigError(f"--{name.replace('_', '-')} must be a finite number "
                                  f"{'> 0' if name == 'lr' else '>= 0'}, got {v!r}")
        if not isinstance(self.lr_alpha, (int, float)) or not 0 <= self.lr_alpha <= 1:
            raise ConfigError(f"--lr-alpha must lie in [0, 1], got {self.lr_alpha!r}")
        if self.dtype not in SUPPORTED_DTYPES:
            raise ConfigError(f"--dtype must be one of {', '.join(SUPPORTED_DTYPES)}, got "
                              f"{self.dtype!r}")
        if self.chunk_mode not in ("pack", "pad", "nopad"):
            raise ConfigError(f"--chunk-mode must be pack, pad or nopad, got {self.chunk_mode!r}")
        if len(self.dag_coeffs) != 3 or any(
                isinstance(c, bool) or not isinstance(c, (int, float)) or not math.isfinite(c)
                or c < 0 for c in self.dag_coeffs):
            raise ConfigError(f"--dag-coeffs must be three numbers >= 0 (cA,cAp,cG), got "
                              f"{self.dag_coeffs!r}")
        if not isinstance(self.model, (str, PLDRConfig)):
            raise ConfigError(f"model must be a preset name, a config path or a PLDRConfig, got "
                              f"{type(self.model).__name__}")
