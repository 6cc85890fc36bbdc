"""What every command module shares: the parser class whose errors are one line."""

from __future__ import annotations

import argparse
import sys


class Parser(argparse.ArgumentParser):
    """argparse that exits with status 2 and one `error:` line (no usage dump)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"error: {message} (see `{self.prog} --help`)\n")
        raise SystemExit(2)


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """`--help` that ends each option's line with its default, except where there is nothing
    to show (a flag that is off, an empty list, None: those say their default in words)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        d = action.default
        if d is None or d is False or d == [] or d is argparse.SUPPRESS or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def add_model_args(p: argparse.ArgumentParser, *, G_LM_help: str, dtypes: tuple[str, ...],
                   dtype_help: str | None = None) -> None:
    """The flags every command that loads a model shares: --model, --config, --tokenizer,
    --G-LM (whose meaning the command gives), --device and --dtype (its choices)."""
    p.add_argument("--model", required=True, metavar="PATH",
                   help="a model directory (pldr, or the transformers port's), or an original "
                   ".pth checkpoint with --config")
    p.add_argument("--config", metavar="JSON", help="hpdict or config.json for an original checkpoint")
    p.add_argument("--tokenizer", metavar="FILE",
                   help="SentencePiece .model (default: the model directory's tokenizer.model)")
    p.add_argument("--G-LM", dest="G_LM", metavar="FILE", help=G_LM_help)
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--dtype", choices=dtypes, default="float32", help=dtype_help)


def load_model_args(args: argparse.Namespace):
    """(model, G_LM) from the flags of `add_model_args`, for the inference commands
    (generate, serve): a given --G-LM wins in every variant; --dtype int8 loads float32
    weights on the CPU and quantises them; bfloat16 on a CPU packs its weights for oneDNN, or
    falls back to float32 (with a warning) where the CPU has no native bf16."""
    from ..checkpoint.load import load_for_decoding

    return load_for_decoding(args.model, args.config, G_LM=args.G_LM, device=args.device,
                             dtype=args.dtype)


def load_tokenizer_arg(args: argparse.Namespace, needed_for: str | None):
    """The tokenizer of --tokenizer, else of the --model directory (an original .pth has
    none); None when there is none and nothing needs it. `needed_for` names what needs one
    ("text prompts", "pldr serve"), which makes a missing tokenizer a one-line error."""
    from pathlib import Path

    from ..checkpoint.load import require_existing
    from ..data.tokenizer import Tokenizer
    from ..errors import PLDRError

    require_existing(args.model)  # a missing --model is named as such, not as "no tokenizer"
    source = args.tokenizer or (args.model if Path(args.model).is_dir() else None)
    tok_file = Tokenizer.find(source) if source is not None else None
    if tok_file is None:
        if needed_for is None:
            return None
        raise PLDRError(f"{needed_for} need a tokenizer: pass --tokenizer FILE.model (model "
                        "directories written by pldr carry their own)")
    return Tokenizer.load(tok_file)
