"""`pldr version`."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("version", help="print the installed version")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from importlib.metadata import version

    print(version("pldr-llm"))
    return 0
