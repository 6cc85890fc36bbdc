"""`pldr convert`: a model from any layout pldr reads to any layout it writes, and DCP
training checkpoints to a model directory."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..devices import SUPPORTED_DTYPES
from ..errors import PLDRError
from .common import model_rule

_LAYOUTS = ("pldr", "original", "hf-port")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="convert a model between layouts (ours, the original's, "
                       "the transformers port's); task heads too, except to the original's",
                       description="Read a model (an original .pth with its hpdict, a pldr "
                       "directory, or a directory of the transformers port) and write it in "
                       "the layout --to names: pldr (config.json + model.safetensors), original "
                       "(checkpoint.pth + hpdict.json [+ G_LM.pkl]) or hf-port (the port's "
                       "config.json + model.safetensors). The weights are kept bit for bit.")
    model_rule(p, presets=False, dest="src", flag="SRC")
    p.add_argument("src", nargs="?", metavar="SRC",
                   help="the model: an original checkpoint (.pth/.pt, with --config), a pldr "
                   "directory or a transformers-port directory")
    p.add_argument("--config", metavar="HP",
                   help="the model's hpdict or a config.json (needed for an original .pth)")
    p.add_argument("--dcp", metavar="DIR",
                   help="instead of SRC: the Distributed Checkpoint of a "
                   "`pldr train` run (OUT/checkpoints/step-N, on any number of processes), written as a pldr directory")
    p.add_argument("--G-LM", dest="G_LM", metavar="FILE",
                   help="G_LM file for a v510G checkpoint (predefined pickle, .pt or .safetensors)")
    p.add_argument("--out", required=True, metavar="DEST", help="directory to write")
    p.add_argument("--to", choices=_LAYOUTS, default="pldr",
                   help="layout to write (default: pldr)")
    p.add_argument("--tokenizer", metavar="FILE",
                   help="SentencePiece .model to write along (default: the source's own "
                   "tokenizer.model, when it has one)")
    p.add_argument("--dtype", choices=SUPPORTED_DTYPES,
                   help="cast the weights (default: as stored)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..checkpoint.convert import convert_model
    from ..checkpoint.load import load_model

    if args.dcp is not None:
        return _convert_dcp(args)
    if args.src is None:
        raise PLDRError("give SRC (an original .pth with --config, or a model directory), or "
                        "--dcp DIR (a training checkpoint of a `pldr train` run)")
    model = load_model(args.src, args.config, G_LM=args.G_LM, dtype=args.dtype)
    tokenizer = args.tokenizer or source_tokenizer(args.src)
    out = convert_model(model, args.out, args.to, tokenizer=tokenizer)
    note = (" (rotate-half RoPE written as its exact interleaved twin: dk axis permuted)"
            if args.to == "original" and model.config.rope_style == "half" else "")
    task = f"{model.task}, " if hasattr(model, "task") else ""  # a task head (model/heads.py)
    print(f"wrote {out} ({args.to} layout, {task}{model.config.variant}, "
          f"{model.num_parameters():,} parameters, "
          f"{str(model.dtype).removeprefix('torch.')}"
          f"{', with its tokenizer' if tokenizer else ', no tokenizer'}){note}")
    return 0


def source_tokenizer(src: str) -> Path | None:
    """The tokenizer a conversion carries along: the source folder's tokenizer.model (ours
    or the port's layout); None when there is none or the source is a checkpoint file."""
    from ..data.tokenizer import Tokenizer

    return Tokenizer.find(src) if Path(src).is_dir() else None


def _convert_dcp(args: argparse.Namespace) -> int:
    """`pldr convert --dcp DIR --out DIR2`: a sharded training checkpoint to a model folder."""
    from ..config import PLDRConfig
    from ..training.checkpointing import dcp_to_pretrained

    if args.src is not None or args.config is not None or args.G_LM is not None:
        raise PLDRError("--dcp takes the config and weights from the checkpoint folder; drop "
                        "SRC, --config and --G-LM")
    if args.to != "pldr":
        raise PLDRError("--dcp writes a pldr directory; convert that with --to afterwards")
    out = dcp_to_pretrained(args.dcp, args.out, tokenizer=args.tokenizer, dtype=args.dtype)
    config = PLDRConfig.from_json(out)  # the summary comes from the config: no read-back
    print(f"wrote {out} ({config.variant}, {config.num_parameters():,} parameters, "
          f"{args.dtype or 'float32'})")
    return 0
