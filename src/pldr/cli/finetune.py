"""`pldr finetune`: flags derived from `FinetuneConfig`'s fields (as `pldr train`'s from
`TrainConfig`), an optional --config file, and the resumed run's settings."""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path
from typing import Any

from .common import model_rule
from .train import add_flag

COLUMN_FLAGS = ("text", "label", "tokens", "tags", "question", "context", "answers", "prompt",
                "completion")


def register(sub: argparse._SubParsersAction) -> None:
    from ..finetune.config import FinetuneConfig

    p = sub.add_parser(
        "finetune", help="fine-tune a model for a task (a head, or causal), LoRA optional",
        argument_default=argparse.SUPPRESS,
        description="Fine-tune a model on labelled rows: sequence classification (IMDb "
        "columns by default), token classification (CoNLL-2003), extractive question "
        "answering (SQuAD) or causal prompt/completion pairs. Writes checkpoints, "
        "metrics.jsonl, TensorBoard events, OUT/best and OUT/final. Runs under `torchrun "
        "--nproc_per_node=N -m pldr finetune ...` with FSDP2.")
    p.add_argument("--config", dest="config_file", metavar="FILE",
                   help="JSON or YAML file of settings (the flags' names with _ for -); flags "
                   "given as well override it")
    for f in dataclasses.fields(FinetuneConfig):
        add_flag(p, f, FinetuneConfig)
    model_rule(p, presets=False)  # a model to start from: a path, never a fresh preset
    p.set_defaults(func=run)


def config_from_flags(flags: dict[str, Any], config_file: str | None = None):
    """The FinetuneConfig of a command line: defaults, then (with --resume) the resumed
    run's saved settings, then the --config file, then the flags given."""
    from ..finetune.config import FinetuneConfig
    from ..training.checkpointing import find_resume_checkpoint, read_trainer_state
    from ..training.config import read_settings_file

    from_file = read_settings_file(config_file) if config_file is not None else {}
    given = {**from_file, **flags}
    base = FinetuneConfig()
    if given.get("resume"):
        ckpt = find_resume_checkpoint(given["resume"], Path(given.get("out", base.out)))
        saved = read_trainer_state(ckpt).get("extra", {}).get("finetune") or {}
        base = FinetuneConfig.from_dict(saved, f"{ckpt}'s saved settings")
    where = f"--config {config_file!r}" if from_file else "the flags"
    return FinetuneConfig.from_dict({**base.to_dict(), **given}, where)


def run(args: argparse.Namespace) -> int:
    from ..finetune.config import FinetuneConfig
    from ..finetune.runner import finetune

    given = vars(args)
    names = {f.name for f in dataclasses.fields(FinetuneConfig)}
    flags = {k: v for k, v in given.items() if k in names}
    result = finetune(config_from_flags(flags, given.get("config_file")))
    if result.interrupted:
        return 130
    if os.environ.get("RANK", "0") == "0":
        print(f"fine-tuned {result.step} steps; model in {result.final_dir}")
    return 0
