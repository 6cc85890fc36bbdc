"""What every command module shares: the parser class whose errors are one line."""

from __future__ import annotations

import argparse
import sys


class Parser(argparse.ArgumentParser):
    """argparse that exits with status 2 and one `error:` line (no usage dump)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"error: {message} (see `{self.prog} --help`)\n")
        raise SystemExit(2)


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
