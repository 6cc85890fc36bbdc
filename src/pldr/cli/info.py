"""`pldr info`: what a checkpoint holds."""

from __future__ import annotations

import argparse

from .common import model_rule


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="show a checkpoint's config, variant and parameter count")
    model_rule(p, presets=False, flag="CKPT")
    p.add_argument("model", metavar="CKPT",
                   help="a model directory, or an original checkpoint (then give --config)")
    p.add_argument("--config", metavar="JSON",
                   help="hpdict or config.json (overrides the directory's)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json

    from ..checkpoint.load import inspect_checkpoint

    info = inspect_checkpoint(args.model, args.config)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    task = "" if info["task"] == "causal" else f"{info['task']}, "  # a task head
    print(f"{info['path']}: {task}{info['variant']}, {info['num_parameters']:,} parameters, "
          f"{info['num_tensors']} tensors, dtype {'/'.join(info['dtypes'])}")
    for key, value in info["config"].items():
        print(f"  {key}: {value}")
    return 0
