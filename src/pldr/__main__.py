"""`python -m pldr` runs the `pldr` command line."""

from .cli import main

raise SystemExit(main())
