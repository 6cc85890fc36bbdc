"""The `pldr` command line: argument parsing, input validation and one-line errors.

Each subcommand is a pair of plain functions: `_add_<name>(subparsers)` declares its flags and
`cmd_<name>(args)` runs it. Library errors (`PLDRError`, and ValueError/TypeError/OSError
raised on bad input) become `error: ...` on stderr with exit status 2; `--debug` shows the
traceback instead.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from typing import Callable, Sequence

from .errors import PLDRError


class _Parser(argparse.ArgumentParser):
    """argparse that exits with status 2 and one `error:` line (no usage dump)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"error: {message} (see `{self.prog} --help`)\n")
        raise SystemExit(2)


# ----- subcommands ------------------------------------------------------------------------
# Each `_add_*` returns nothing and sets `func` on its parser.


def _add_version(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("version", help="print the installed version")
    p.set_defaults(func=cmd_version)


def cmd_version(args: argparse.Namespace) -> int:
    from importlib.metadata import version

    print(version("pldr-llm"))
    return 0


# Registration order is the order in `pldr --help`.
SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_version,
]


def build_parser() -> argparse.ArgumentParser:
    """The full `pldr` parser with every registered subcommand."""
    parser = _Parser(prog="pldr", description="PLDR-LLMs: train, generate, evaluate, inspect.")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for add in SUBCOMMANDS:
        add(sub)
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
