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


def import_extra(module: str, extra: str, feature: str, package: str | None = None):
    """Import `module`, or say in one line which extra of pldr-llm installs it.

    For the parts only some users need (datasets, tensorboard, YAML config files), which
    pyproject.toml lists as extras rather than as dependencies."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise PLDRError(f"{feature} needs the {package or module} package, which is not "
                        f"installed: pip install 'pldr-llm[{extra}]'") from None
