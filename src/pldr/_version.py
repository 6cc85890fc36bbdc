"""The version of pldr, written only here: pyproject.toml reads it (setuptools' dynamic
version), and `pldr version`, `pldr --version` and `pldr.__version__` print it."""

__version__ = "0.2.0"
