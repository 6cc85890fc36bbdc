"""The `pldr` command line: the parser and the one error boundary.

Each command is a module of this package with two plain functions: `register(subparsers)`
declares its flags and `run(args)` runs it. The boundary: a `PLDRError` (bad input, named
with its fix) and an OSError (a file that cannot be read or written, named with its path)
become one `error: ...` line on stderr and exit status 2; any other exception is a bug, so
its traceback is shown with a request to report it (exit status 1). `--debug`, anywhere on
the line, shows the traceback of input errors too. The library logs to the "pldr" logger;
here its records go to stdout.
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from contextlib import contextmanager
from typing import Iterator, Sequence

from ..errors import PLDRError
from . import (bench, convert, data, demo, evaluate, extract_g, generate, info, inspect, serve,
               tokenizer, train, version)
from .common import Parser, check_model_arg

# Registration order is the order in `pldr --help`.
COMMANDS = (version, demo, train, generate, serve, bench, convert, info, inspect, extract_g,
            evaluate, tokenizer, data)
REPORT = "this is a bug in pldr; please report it with the traceback above"


def build_parser() -> argparse.ArgumentParser:
    """The full `pldr` parser with every registered subcommand."""
    parser = Parser(prog="pldr", description="PLDR-LLMs: train, generate, convert, info, benchmark.")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback on errors (accepted anywhere on the line)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for command in COMMANDS:
        command.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `pldr` console script and `python -m pldr`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        with _console_logging():
            check_model_arg(args)
            return int(args.func(args) or 0)
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return 130
    except (PLDRError, OSError) as e:
        if debug:
            traceback.print_exc()
        sys.stderr.write(f"error: {_one_line(e)}\n")
        return 2
    except Exception:  # noqa: BLE001  the boundary: anything else is a bug
        traceback.print_exc()
        sys.stderr.write(f"error: {REPORT}\n")
        return 1


@contextmanager
def _console_logging() -> Iterator[None]:
    """While a command runs, INFO records of the "pldr" logger go to stdout as plain lines
    (the stream is looked up per record, so redirected or captured stdout works)."""
    logger = logging.getLogger("pldr")
    handler = _StdoutHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    previous = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous)


class _StdoutHandler(logging.StreamHandler):
    """A StreamHandler writing to whatever sys.stdout is at the time of each record."""

    def __init__(self) -> None:
        super().__init__(sys.stdout)

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stdout
        super().emit(record)


def _one_line(e: BaseException) -> str:
    """The exception's message on one line (no traceback); a file error names its path."""
    text = str(e) or type(e).__name__
    if isinstance(e, OSError) and e.filename is not None and str(e.filename) not in text:
        text = f"{text}: {e.filename}"
    return " ".join(text.split())


if __name__ == "__main__":
    raise SystemExit(main())
