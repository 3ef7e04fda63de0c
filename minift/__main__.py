"""`python -m minift ...`: the `minift` command (see minift.cli)."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
