"""`pldr train`: flags derived from `TrainConfig`'s fields (names, defaults and help in one
place, the field metadata), an optional --config file, and the resumed run's settings."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import typing
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..model.pretrained import CONFIG_FILE
from ..training.config import LEGACY_DTYPE, TrainConfig, flag_name, read_config_file
from .common import model_rule

log = logging.getLogger("pldr")


def register(sub: argparse._SubParsersAction) -> None:
    # Flags left out keep the config file's value, else the resumed run's (with --resume),
    # else TrainConfig's default: argparse stores only the flags given.
    p = sub.add_parser("train", help="train a PLDR-LLM (torchrun for several processes)",
                       argument_default=argparse.SUPPRESS,
                       description="Train a model on a data source; writes checkpoints, "
                       "metrics.jsonl, TensorBoard events and OUT/final (a model directory). "
                       "Run under `torchrun --nproc_per_node=N -m pldr train ...` to shard the "
                       "model with FSDP2 over N processes.")
    p.add_argument("--config", metavar="FILE",
                   help="JSON or YAML file of settings (TrainConfig field names, e.g. "
                   "max_steps: 1000); flags given as well override it")
    for f in dataclasses.fields(TrainConfig):
        add_flag(p, f)
    p.add_argument("--dtype", dest="legacy_dtype", choices=tuple(LEGACY_DTYPE),
                   help="the 0.2 name of --precision: float32 is fp32, bfloat16 is bf16-mixed")
    model_rule(p, presets=True)  # the rule every command's --model follows (cli/common.py)
    p.set_defaults(func=run)


def add_flag(p: argparse.ArgumentParser, f: dataclasses.Field, owner: type = TrainConfig) -> None:
    """One flag of a field of a settings dataclass (`owner`: TrainConfig, FinetuneConfig):
    its type from the annotation, its help from the metadata with the default appended."""
    kind = _flag_type(f, owner)
    meta = dict(f.metadata)
    help_text = meta.pop("help")
    if "default" not in help_text:
        help_text += f" (default {_show(f.default)})"
    kwargs: dict[str, Any] = {"help": help_text.replace("%", "%%"), **meta}
    if kind is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    elif kind in (int, float):
        kwargs["type"] = kind
        kwargs.setdefault("metavar", "N" if kind is int else "X")
    p.add_argument(f"--{flag_name(f.name)}", **kwargs)


def _flag_type(f: dataclasses.Field, owner: type = TrainConfig) -> type:
    """int, float or bool for fields of those types (optional or not); str for the rest
    (text, and values parsed from text: the model, the DAG coefficients)."""
    hint = typing.get_type_hints(owner)[f.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    return args[0] if len(args) == 1 and args[0] in (int, float, bool) else str


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, tuple):
        return ",".join(f"{v:g}" for v in value)
    return str(value)


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


def config_from_flags(flags: dict[str, Any], config_file: str | None = None) -> TrainConfig:
    """The TrainConfig of a command line: TrainConfig's defaults, then (with --resume) the
    resumed run's saved settings, then the --config file, then the flags given. So
    `pldr train --resume auto --out RUN` continues a run without restating it."""
    from ..training.checkpointing import find_resume_checkpoint, read_trainer_state
    from ..training.config import check_settings

    flags = dict(flags)
    if isinstance(flags.get("dag_coeffs"), str):
        flags["dag_coeffs"] = parse_dag_coeffs(flags["dag_coeffs"])
    from_file = read_config_file(config_file) if config_file is not None else {}
    given = {**from_file, **flags}
    base = TrainConfig()
    if given.get("resume"):
        ckpt = find_resume_checkpoint(given["resume"], Path(given.get("out", base.out)))
        saved = dict(read_trainer_state(ckpt).get("train_config", {}))
        for once in ("truncate_later_steps", "fork_to"):  # choices of one command line only
            saved.pop(once, None)
        names = {f.name for f in dataclasses.fields(TrainConfig)}
        base = TrainConfig(**check_settings({k: v for k, v in saved.items() if k in names},
                                            f"{ckpt}'s saved settings"))
        # the checkpoint's own model config, which exists even if the original file does not
        base = base.replace(model=str(ckpt / CONFIG_FILE))
    return base.replace(**given)


def run(args: argparse.Namespace) -> int:
    from ..training.trainer import train

    given = vars(args)  # only the flags given (argument_default=SUPPRESS)
    flags = {f.name: given[f.name] for f in dataclasses.fields(TrainConfig) if f.name in given}
    if "legacy_dtype" in given and "precision" not in flags:
        flags["precision"] = LEGACY_DTYPE[given["legacy_dtype"]]
    result = train(config_from_flags(flags, getattr(args, "config", None)),
                   continue_hint="continue with --resume auto")
    if result.interrupted:
        return 130
    if os.environ.get("RANK", "0") == "0":
        print(f"trained {result.step} steps; model in {result.final_dir}")
    return 0
