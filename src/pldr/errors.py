"""Errors that name the bad input and say what to do.

Library code raises these; only `pldr.cli` turns them into one `error: ...` line and exit
status 2, and the server into an HTTP 4xx in OpenAI's shape. They subclass
ValueError/TypeError so callers can catch the usual built-ins.

The library speaks Python: a message names a parameter as it is spelt in the signature, in
backticks (`` `max_len` ``, or `` `resume='auto'` `` for a value to pass), and `param` holds the
parameter at fault. Each boundary puts its own names on them with `render`: the command line
its flags (`--max-len`, `--resume auto`), the server its request fields (`max_tokens`).
"""

from __future__ import annotations

import re
from typing import Mapping

# a parameter in a message: `name` or `name=value`
PARAM = re.compile(r"`([A-Za-z_][A-Za-z0-9_]*)(?:=([^`]*))?`")


class PLDRError(ValueError):
    """A bad value: a wrong shape, an unknown name, a file that does not fit. `param` is the
    Python parameter at fault: given, or else the first one the message names."""

    def __init__(self, message: str = "", *, param: str | None = None):
        super().__init__(message)
        if param is None:
            found = PARAM.search(message) if isinstance(message, str) else None
            param = found.group(1) if found else None
        self.param = param


class PLDRTypeError(PLDRError, TypeError):
    """A value of the wrong type (float ids, a string where a tensor was expected, ...)."""


class ConfigError(PLDRError):
    """A model configuration that is incomplete, mistyped or inconsistent."""


class CheckpointError(PLDRError):
    """A checkpoint or G_LM file that is missing, unsafe or does not fit the model."""


class DataError(PLDRError):
    """Training or evaluation data that is missing, empty or unreadable."""


def render(message: str, names: Mapping[str, str], assign: str = " ") -> str:
    """`message` with each parameter it names (`` `name` `` or `` `name=value` ``) spelt as
    the boundary spells it: `names` maps a Python parameter to a flag or field; `assign`
    joins a name to its value (" " for a flag, whose value loses its Python quotes unless
    it holds a space, and which stands alone for True; "=" for a field). Parameters that
    `names` does not know keep their Python spelling, without the backticks."""
    def one(m: re.Match) -> str:
        name, value = m.group(1), m.group(2)
        shown = names.get(name, name)
        if value is None or (assign == " " and name in names and value == "True"):
            return shown  # a switch: the flag alone
        if assign == " " and name in names and " " not in value.strip("'\""):
            value = value.strip("'\"")
        return f"{shown}{assign if name in names else '='}{value}"
    return PARAM.sub(one, message)


def install_extra_command(extra: str) -> str:
    """The shell command that installs pldr's optional `extra` (a pyproject.toml extra such
    as "analysis"). pldr is installed from its clone, not from a package index, so the
    command is an editable install run in the clone, with the pinned versions of
    constraints.txt. Every missing-extra message takes its command from here."""
    return f"pip install -c constraints.txt -e '.[{extra}]'"


def missing_extra(feature: str, extra: str, missing: str | None = None) -> PLDRError:
    """The one-line error for a feature whose extra is not installed: what needs it, which
    package is missing, and the command that installs it (run in the pldr clone)."""
    what = f" ({missing} is missing)" if missing else ""
    return PLDRError(f"{feature} needs the {extra} extra{what}; install it in the pldr clone "
                     f"with: {install_extra_command(extra)}")


def import_extra(module: str, extra: str, feature: str, package: str | None = None):
    """Import `module`, or say in one line which extra of pldr installs it.

    For the parts only some users need (datasets, tensorboard, YAML config files), which
    pyproject.toml lists as extras rather than as dependencies."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise missing_extra(feature, extra, package or module) from None
