"""The `pldr` command line: the parser and the one error boundary.

Each command is a module of this package with two plain functions: `register(subparsers)`
declares its flags and `run(args)` runs it. The boundary: a `PLDRError` (bad input, named
with its fix) and an OSError (a file that cannot be read or written, named with its path)
become one `error: ...` line on stderr and exit status 2. The library names Python
parameters (`max_len`, `resume='auto'`); the boundary spells each as the running command's
flag (--max-len, --resume auto), looked up in that command's parser (`command_flags`). Any
other exception is a bug, so its traceback is shown with a request to report it (exit
status 1). `--debug`, anywhere on the line, shows the traceback of input errors too. The
library logs to the "pldr" logger; here its records go to stdout, the parameters they name
spelt as flags too.
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from contextlib import contextmanager
from typing import Iterator, Sequence

from .._version import __version__
from ..errors import PLDRError, render
from . import (bench, convert, data, demo, evaluate, extract_g, finetune, generate, info,
               inspect, serve, tokenizer, train, version)
from .common import Parser, check_model_arg

# Registration order is the order in `pldr --help`.
COMMANDS = (version, demo, train, finetune, generate, serve, bench, convert, info, inspect,
            extract_g, evaluate, tokenizer, data)
REPORT = "this is a bug in pldr; please report it with the traceback above"
# Python parameters that a command's flag names otherwise: command -> {parameter: flag's dest}
# (every other parameter is the flag whose dest has its name: max_len -> --max-len)
RENAMED = {"convert": {"dest": "out"},
           "eval": {"model_path": "model"},     # pldr.finetune.score
           "inspect": {"fmt": "format"}}        # pldr.analysis.inspect_model


def build_parser() -> argparse.ArgumentParser:
    """The full `pldr` parser with every registered subcommand."""
    parser = Parser(prog="pldr", description="PLDR-LLMs: train, generate, convert, info, benchmark.")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback on errors (accepted anywhere on the line)")
    parser.add_argument("--version", action="version", version=f"pldr {__version__}",
                        help="print the version and exit")
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
        with _console_logging(command_flags(parser, args.command)):
            check_model_arg(args)
            return int(args.func(args) or 0)
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return 130
    except (PLDRError, OSError) as e:
        if debug:
            traceback.print_exc()
        text = _one_line(e)
        if isinstance(e, PLDRError):
            text = render(text, command_flags(parser, args.command))
        sys.stderr.write(f"error: {text}\n")
        return 2
    except Exception:  # noqa: BLE001  the boundary: anything else is a bug
        traceback.print_exc()
        sys.stderr.write(f"error: {REPORT}\n")
        return 1


@contextmanager
def _console_logging(flags: dict[str, str]) -> Iterator[None]:
    """While a command runs, INFO records of the "pldr" logger go to stdout as plain lines,
    each Python parameter they name spelt as its flag in `flags` (as errors are); the stream
    is looked up per record, so redirected or captured stdout works."""
    logger = logging.getLogger("pldr")
    handler = _StdoutHandler()
    handler.setFormatter(_FlagFormatter(flags))
    previous = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous)


class _FlagFormatter(logging.Formatter):
    """The record's message alone, with the parameters it names rendered as flags."""

    def __init__(self, flags: dict[str, str]) -> None:
        super().__init__("%(message)s")
        self.flags = flags

    def format(self, record: logging.LogRecord) -> str:
        return render(super().format(record), self.flags)


class _StdoutHandler(logging.StreamHandler):
    """A StreamHandler writing to whatever sys.stdout is at the time of each record."""

    def __init__(self) -> None:
        super().__init__(sys.stdout)

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stdout
        super().emit(record)


def command_flags(parser: argparse.ArgumentParser, command: str) -> dict[str, str]:
    """Python parameter -> the flag of `command` that sets it: each option's dest (in the
    command's own subcommands too), then the parameters of `RENAMED`."""
    def options(p: argparse.ArgumentParser, out: dict[str, str]) -> dict[str, str]:
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for child in action.choices.values():
                    options(child, out)
            longs = [o for o in action.option_strings if o.startswith("--")]
            if longs:
                out.setdefault(action.dest, longs[0])
        return out

    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    flags = options(subparsers.choices[command], {})
    for param, dest in RENAMED.get(command, {}).items():
        if dest in flags:
            flags[param] = flags[dest]
    return flags


def _one_line(e: BaseException) -> str:
    """The exception's message on one line (no traceback); a file error names its path."""
    text = str(e) or type(e).__name__
    if isinstance(e, OSError) and e.filename is not None and str(e.filename) not in text:
        text = f"{text}: {e.filename}"
    return " ".join(text.split())


if __name__ == "__main__":
    raise SystemExit(main())
