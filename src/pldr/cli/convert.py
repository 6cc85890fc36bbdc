"""`pldr convert`: between checkpoint layouts, and DCP training checkpoints to a model directory."""

from __future__ import annotations

import argparse

from ..devices import SUPPORTED_DTYPES
from ..errors import PLDRError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="convert an original .pth checkpoint to a model directory",
                       description="Load an original PLDR-LLM checkpoint with its hpdict and write "
                       "our directory (config.json + model.safetensors [+ tokenizer.model]).")
    p.add_argument("--checkpoint", metavar="FILE",
                   help="original checkpoint (.pth/.pt: a dict with model_state_dict, or a "
                   "state dict)")
    p.add_argument("--config", metavar="JSON",
                   help="the model's hpdict or a config.json (needed with --checkpoint)")
    p.add_argument("--dcp", metavar="DIR",
                   help="instead of --checkpoint: a training checkpoint (Distributed "
                   "Checkpoint) of a "
                   "`pldr train` run, OUT/checkpoints/step-N")
    p.add_argument("--G-LM", dest="G_LM", metavar="FILE",
                   help="G_LM file for a v510G checkpoint (predefined pickle, .pt or .safetensors)")
    p.add_argument("--out", required=True, metavar="DIR", help="directory to write")
    p.add_argument("--tokenizer", metavar="FILE", help="SentencePiece .model to copy along")
    p.add_argument("--dtype", choices=SUPPORTED_DTYPES,
                   help="cast the weights (default: as stored)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..checkpoint.load import load_model
    from ..model.pretrained import save_pretrained

    if args.dcp is not None:
        return _convert_dcp(args)
    if args.checkpoint is None or args.config is None:
        raise PLDRError("give --checkpoint FILE with --config JSON (an original checkpoint), "
                        "or --dcp DIR (a checkpoint of a `pldr train` run)")
    model = load_model(args.checkpoint, args.config, G_LM=args.G_LM, dtype=args.dtype)
    save_pretrained(model, args.out, tokenizer=args.tokenizer)
    print(f"wrote {args.out} ({model.config.variant}, {model.num_parameters():,} parameters, "
          f"{str(model.dtype).removeprefix('torch.')})")
    return 0


def _convert_dcp(args: argparse.Namespace) -> int:
    """`pldr convert --dcp DIR --out DIR2`: a sharded training checkpoint to a model folder."""
    from ..config import PLDRConfig
    from ..training.checkpointing import dcp_to_pretrained

    if args.checkpoint is not None or args.config is not None or args.G_LM is not None:
        raise PLDRError("--dcp takes the config and weights from the checkpoint folder; drop "
                        "--checkpoint, --config and --G-LM")
    out = dcp_to_pretrained(args.dcp, args.out, tokenizer=args.tokenizer, dtype=args.dtype)
    config = PLDRConfig.from_json(out)  # the summary comes from the config: no read-back
    print(f"wrote {out} ({config.variant}, {config.num_parameters():,} parameters, "
          f"{args.dtype or 'float32'})")
    return 0
