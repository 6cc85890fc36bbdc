"""Errors that name the bad input and say what to do.

Library code raises these; only `pldr.cli` turns them into one `error: ...` line and exit
status 2. They subclass ValueError/TypeError so callers can catch the usual built-ins.
"""


class PLDRError(ValueError):
    """A bad value: a wrong shape, an unknown name, a file that does not fit."""


class PLDRTypeError(PLDRError, TypeError):
    """A value of the wrong type (float ids, a string where a tensor was expected, ...)."""


class ConfigError(PLDRError):
    """A model configuration that is incomplete, mistyped or inconsistent."""


class CheckpointError(PLDRError):
    """A checkpoint or G_LM file that is missing, unsafe or does not fit the model."""


class DataError(PLDRError):
    """Training or evaluation data that is missing, empty or unreadable."""


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
