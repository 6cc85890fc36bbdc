"""The `pldr` command: `main.py` holds the parser and the error boundary, and each command
is a module of its own with `register(subparsers)` and `run(args)`."""

from .main import build_parser, main

__all__ = ["build_parser", "main"]
