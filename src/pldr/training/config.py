"""`TrainConfig`: every setting of a training run, checked before anything is written,
and saved with the run as `train_config.json`.

Each field carries its flag's help text in its metadata, so `pldr train`'s flags, their
defaults and their help come from here (cli/train.py derives them) and a config file
(`pldr train --config FILE`, JSON or YAML) uses the same names.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import PLDRConfig
from ..data.chunks import MODES as CHUNK_MODES
from ..errors import ConfigError, import_extra

PRECISIONS = ("fp32", "bf16-mixed", "bf16-true")
# the `dtype` setting that `precision` replaced, as train_config.json files of older runs
# hold it: float32 is fp32, bfloat16 (autocast with float32 weights) is bf16-mixed
LEGACY_DTYPE = {"float32": "fp32", "bfloat16": "bf16-mixed"}


def setting(default: Any, help: str, **flag: Any) -> Any:
    """A TrainConfig field whose metadata holds its flag's help (and metavar/choices).

    A help text that ends without "(default ...)" gets the default appended by the CLI;
    fields whose default is None say in their help what None means."""
    return field(default=default, metadata={"help": help, **flag})


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run needs; `pldr train` flags map onto these fields one to one.

    `batch_size` is the global batch (rows per micro-batch over all processes; each of N
    processes takes batch_size / N rows). One optimizer step uses `grad_accum` micro-batches.
    The run lasts `max_steps` optimizer steps, or `epochs` passes over the training data,
    whichever ends first (one epoch when neither is given). The learning rate warms up
    linearly over `warmup_steps` and decays by cosine to `lr_alpha * lr` at `lr_total_steps`
    (default: the run's total steps)."""

    model: str | PLDRConfig = setting(
        "tiny", "preset (tiny, pldr-110m, pldr-110m-G) or a config.json / original hpdict; "
        "vocab_size comes from the tokenizer", metavar="PRESET|JSON")
    data: str = setting("builtin", "builtin, a .txt/.jsonl/.parquet/.csv file, a folder, or "
                        "hf:NAME[:CONFIG]", metavar="SOURCE")
    out: str = setting("runs/train", "run folder", metavar="DIR")
    tokenizer: str | None = setting(None, "SentencePiece .model (default: train one on the "
                                    "data and save it)", metavar="FILE")
    vocab_size: int | None = setting(None, "vocabulary of a trained tokenizer (default: the "
                                     "model's vocab_size)")
    split: str | None = setting(None, "training slice, e.g. train[:90%] (default train[:90%])")
    val_split: str | None = setting(None, "validation slice (default train[90%:] with the "
                                    "default --split); none turns validation off")
    text_column: str | None = setting(None, "text column of structured data (default "
                                      "content, then text)")
    chunk_mode: str = setting("pack", "how documents become chunks, as the original does (docs/data.md, Chunks and batches)",
                              choices=CHUNK_MODES)
    batch_agg_count: int = setting(1, "pad/nopad modes: documents are grouped batch_size * "
                                   "this many at a time")
    max_steps: int | None = setting(None, "optimizer steps (default: --epochs)")
    epochs: int | None = setting(None, "passes over the data (default 1; with --max-steps, "
                                 "whichever ends first)")
    batch_size: int = setting(16, "global batch: rows per micro-batch over all processes")
    grad_accum: int = setting(1, "micro-batches per optimizer step")
    micro_batch_size: int | None = setting(
        None, "rows per forward on each process; it must divide batch_size / processes, and "
        "the gradient sums over the forwards (default: all of the process's rows). The same "
        "value gives the same arithmetic on 1 process or N")
    context_length: int | None = setting(None, "tokens per row (default: the model's "
                                         "max_seq_len)")
    lr: float = setting(1e-3, "peak learning rate")
    warmup_steps: int = setting(100, "linear warm-up steps; a new run shorter than the "
                                "warm-up has it capped at a tenth of the run (at least 1, "
                                "logged and recorded) so the peak --lr is reached")
    lr_alpha: float = setting(0.1, "final learning rate as a fraction of --lr")
    lr_total_steps: int | None = setting(None, "step where the cosine decay ends (default: "
                                         "the run's total steps)")
    weight_decay: float = setting(0.1, "AdamW weight decay")
    seed: int = setting(0, "seed of the initial weights and the data order")
    save_every: int = setting(1000, "checkpoint every N optimizer steps, besides the one at "
                              "the end and on Ctrl-C, so an interrupted run resumes from the "
                              "last (--keep-checkpoints are kept); 0: only at the end and on "
                              "Ctrl-C (default 1000)")
    eval_every: int = setting(0, "validate every N steps (default 0: at the end only)")
    eval_batches: int | None = setting(None, "validation batches per evaluation (default: all)")
    log_every: int = setting(10, "report every N steps")
    resume: str | None = setting(None, "continue from a checkpoint folder, or auto: the "
                                 "latest in --out (default: a new run)", metavar="CKPT|auto")
    truncate_later_steps: bool = setting(
        False, "with --resume of an earlier checkpoint of a run that went on: delete that "
        "run's later checkpoints and final model and train on from the checkpoint (default: "
        "refuse; or give a new --out to branch)")
    fork_to: str | None = setting(
        None, "with --resume: branch into this new run folder instead of continuing in the "
        "checkpoint's run, which stays untouched; the new run starts with that run's history up "
        "to the checkpoint (metrics.jsonl, TensorBoard events) (default: no fork)",
        metavar="NEW_DIR")
    precision: str = setting(
        "fp32", "fp32: float32 throughout; bf16-mixed: bfloat16 autocast for the forward "
        "(under torchrun FSDP2 gathers bfloat16 parameters and reduces gradients in float32) "
        "with float32 weights and AdamW state, as the paper trained; bf16-true: bfloat16 "
        "weights, gradients and AdamW state (half the memory, coarser updates)",
        choices=PRECISIONS)
    compile: bool = setting(
        False, "run the model's forward and backward under torch.compile (the first steps "
        "compile; later ones run the fused kernels)")
    activation_checkpointing: bool = setting(
        False, "recompute each decoder layer's activations in backward instead of keeping "
        "them: less memory for about one more forward of compute per step")
    dag_coeffs: tuple[float, float, float] = setting(
        (0.0, 0.0, 0.0), "DAG regularisation coefficients of A_LM, A_P and G_LM (DAG values "
        "are logged anyway)", metavar="cA,cAp,cG")
    device: str | None = setting(None, "cpu, cuda, cuda:1 (default: cuda if available)")
    dist_timeout: int = setting(
        1800, "under torchrun: seconds a process waits for the others in a collective before "
        "the run fails (a process that dies ends the job at once: torchrun stops the others)")
    keep_checkpoints: int = setting(3, "keep the last N checkpoints, 0 keeps all")
    progress: bool | None = setting(None, "tqdm progress bar (default: when stderr is a "
                                    "terminal)")
    tensorboard: bool | None = setting(None, "write TensorBoard events to OUT/tb (default: "
                                       "when the tensorboard package is installed)")
    cache_dir: str | None = setting(None, "tokenised-data cache (default $PLDR_CACHE_DIR or "
                                    "~/.cache/pldr)", metavar="DIR")

    def __post_init__(self) -> None:
        if isinstance(self.dag_coeffs, list):
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
        return cls(**check_settings(d, "training settings"))

    def check(self) -> None:
        """Reject settings that cannot work, with a message naming the flag to change.

        The checks of single values live here only; those that need the model, the data or
        the number of processes are made once when the run is prepared (prepare.py)."""
        def integer(name: str, low: int, optional: bool = False) -> None:
            v = getattr(self, name)
            if v is None and optional:
                return
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ConfigError(f"`{name}` must be an integer >= {low}, got {v!r}")
        for name in ("batch_size", "grad_accum", "batch_agg_count", "log_every",
                     "dist_timeout"):
            integer(name, 1)
        for name in ("save_every", "eval_every", "warmup_steps", "keep_checkpoints", "seed"):
            integer(name, 0)
        for name in ("max_steps", "epochs", "context_length", "lr_total_steps", "eval_batches",
                     "vocab_size", "micro_batch_size"):
            integer(name, 1, optional=True)
        for name, low in (("lr", 0.0), ("weight_decay", 0.0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                    or v < low or (name == "lr" and v == 0):
                raise ConfigError(f"`{name}` must be a finite number "
                                  f"{'> 0' if name == 'lr' else '>= 0'}, got {v!r}")
        if isinstance(self.lr_alpha, bool) or not isinstance(self.lr_alpha, (int, float)) \
                or not 0 <= self.lr_alpha <= 1:
            raise ConfigError(f"`lr_alpha` must lie in [0, 1], got {self.lr_alpha!r}")
        for name, choices in (("precision", PRECISIONS), ("chunk_mode", CHUNK_MODES)):
            if getattr(self, name) not in choices:
                raise ConfigError(f"`{name}` must be one of {', '.join(choices)}, "
                                  f"got {getattr(self, name)!r}")
        if not isinstance(self.dag_coeffs, tuple) or len(self.dag_coeffs) != 3 or any(
                isinstance(c, bool) or not isinstance(c, (int, float)) or not math.isfinite(c)
                or c < 0 for c in self.dag_coeffs):
            raise ConfigError(f"`dag_coeffs` must be three numbers >= 0 (cA,cAp,cG), got "
                              f"{self.dag_coeffs!r}")
        for name in ("activation_checkpointing", "compile"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"`{name}` must be true or false, got "
                                  f"{getattr(self, name)!r}")
        if not isinstance(self.model, (str, PLDRConfig)):
            raise ConfigError(f"`model` must be a preset name, a config path or a PLDRConfig, got "
                              f"{type(self.model).__name__}")


def flag_name(name: str) -> str:
    """The command-line spelling of a TrainConfig field: batch_size -> batch-size."""
    return name.replace("_", "-")


def check_settings(d: dict[str, Any], where: str) -> dict[str, Any]:
    """`d` as TrainConfig keyword arguments: unknown keys are an error naming them; a model
    given as a dict becomes a PLDRConfig; numbers written as strings in a float field (YAML
    reads `1e-3` as a string) become floats."""
    if not isinstance(d, dict):
        raise ConfigError(f"{where} must be a mapping of TrainConfig fields, got "
                          f"{type(d).__name__}")
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    d = _legacy(d)
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise ConfigError(f"unknown training setting(s) {', '.join(unknown)} in {where}; the "
                          "keys are TrainConfig's fields (the flags of `pldr train --help` with "
                          "_ for -)")
    d = dict(d)
    if isinstance(d.get("model"), dict):
        d["model"] = PLDRConfig.from_dict(d["model"])
    if isinstance(d.get("dag_coeffs"), list):
        d["dag_coeffs"] = tuple(d["dag_coeffs"])
    for name in ("lr", "lr_alpha", "weight_decay"):
        if isinstance(d.get(name), str):
            try:
                d[name] = float(d[name])
            except ValueError:
                pass  # check() names the bad value
    for name, value in d.items():  # text and switches; check() takes the numbers
        kind = _TEXT_OR_SWITCH.get(name)
        if kind is not None and value is not None and not isinstance(value, kind):
            raise ConfigError(f"{name} in {where} must be "
                              f"{'true or false' if kind is bool else 'a string'}, got "
                              f"{value!r}")
    return d


def _legacy(d: dict[str, Any]) -> dict[str, Any]:
    """Settings saved before `precision` replaced `dtype` (a checkpoint's train_config) read
    as the same run: dtype float32 -> precision fp32, bfloat16 -> bf16-mixed."""
    if "dtype" not in d or "precision" in d or d["dtype"] not in LEGACY_DTYPE:
        return d
    d = dict(d)
    d["precision"] = LEGACY_DTYPE[d.pop("dtype")]
    return d


# fields whose values are text or on/off switches (besides `model`, which may be a config)
_TEXT_OR_SWITCH = {f.name: (bool if f.type in ("bool | None", "bool") else str)
                   for f in dataclasses.fields(TrainConfig)
                   if f.type in ("str", "str | None", "bool", "bool | None")}


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """The settings of a JSON or YAML file (by suffix: .yaml/.yml is YAML, anything else
    JSON), checked by `check_settings`; e.g. `{"max_steps": 1000, "lr": 0.002}`."""
    return check_settings(read_settings_file(path), f"the settings file `config={str(path)!r}`")


def read_settings_file(path: str | os.PathLike) -> dict[str, Any]:
    """The mapping of a JSON or YAML settings file, unchecked (empty file: {})."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"the settings file `config={str(path)!r}` does not exist (or is not a "
                          "file)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"the settings file `config={str(path)!r}` is not a text file") from None
    if path.suffix.lower() in (".yaml", ".yml"):
        yaml = import_extra("yaml", "yaml", "a YAML settings file (or write it as JSON)",
                            "PyYAML")
        try:
            settings = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"the settings file `config={str(path)!r}` is not valid YAML: "
                              f"{' '.join(str(e).split())}") from None
    else:
        try:
            settings = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"the settings file `config={str(path)!r}` is not valid JSON ({e}); "
                              "YAML files "
                              "need a .yaml suffix") from None
    return settings or {}


__all__ = ["TrainConfig", "CHUNK_MODES", "PRECISIONS", "setting", "flag_name", "check_settings",
           "read_config_file", "read_settings_file", "LEGACY_DTYPE"]
