"""`python -m pldr` runs the `pldr` command line."""

from .cli import main

if __name__ == "__main__":  # not when the engine process of `pldr serve` starts
    raise SystemExit(main())
