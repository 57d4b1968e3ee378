"""`python -m nn_blocksparse`: the `nn-blocksparse` command (nn_blocksparse/cli.py)."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
