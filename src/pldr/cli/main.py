"""The `pldr` command line: the parser and the one error boundary.

Each command is a module of this package with two plain functions: `register(subparsers)`
declares its flags and `run(args)` runs it. Library errors (`PLDRError`, and ValueError/
TypeError/OSError raised on bad input) become `error: ...` on stderr with exit status 2;
`--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from typing import Sequence

from ..errors import PLDRError
from . import bench, convert, demo, generate, info, serve, tokenizer, train, version
from .common import Parser

# Registration order is the order in `pldr --help`.
COMMANDS = (version, demo, train, generate, serve, bench, convert, info, tokenizer)


def build_parser() -> argparse.ArgumentParser:
    """The full `pldr` parser with every registered subcommand."""
    parser = Parser(prog="pldr", description="PLDR-LLMs: train, generate, convert, info, benchmark.")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for command in COMMANDS:
        command.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `pldr` console script and `python -m pldr`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = args.debug or "--debug" in argv
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return 130
    except (PLDRError, ValueError, TypeError, OSError) as e:
        if debug:
            traceback.print_exc()
        sys.stderr.write(f"error: {_one_line(e)}\n")
        return 2


def _one_line(e: BaseException) -> str:
    """The exception's message on one line (no traceback)."""
    text = str(e) or type(e).__name__
    if isinstance(e, OSError) and e.filename and str(e.filename) not in text:
        text = f"{text}: {e.filename}"
    return " ".join(text.split())


if __name__ == "__main__":
    raise SystemExit(main())
