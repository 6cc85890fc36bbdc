"""`pldr demo`."""

from __future__ import annotations

import argparse

from ..devices import SUPPORTED_DTYPES
from ..errors import PLDRError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="train the tiny model on the built-in corpus, then generate",
                       description="The main job in a few minutes on 2 CPU cores: train the tiny "
                       "preset (and a 2048-piece tokenizer) on the built-in corpus, generate with "
                       "the KV + G cache, and show the loss curve and how much G_LM varies "
                       "between prompts.")
    p.add_argument("--out", default="runs/demo", metavar="DIR",
                   help="run folder: new, empty, or a previous demo's: an interrupted one "
                   "(Ctrl-C saves a checkpoint) is continued from its checkpoint when the "
                   "settings are the same, a finished one is replaced; a folder the demo did "
                   "not make is refused (default runs/demo)")
    p.add_argument("--fresh", action="store_true",
                   help="start over even where an interrupted demo could be continued")
    p.add_argument("--steps", type=int, default=600,
                   help="training steps (default 600, about 2-3 minutes on 2 CPU cores)")
    p.add_argument("--device", help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", choices=SUPPORTED_DTYPES, default="float32")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="tqdm progress bar (default: when stderr is a terminal)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .demo_job import run_demo

    if args.steps < 1:
        raise PLDRError(f"--steps must be >= 1, got {args.steps}")
    run_demo(args.out, steps=args.steps, device=args.device, dtype=args.dtype,
             progress=args.progress, fresh=args.fresh)
    return 0
