"""`python -m nn_blocksparse`: the `nn-blocksparse` command (nn_blocksparse/cli.py)."""

from .cli import main

raise SystemExit(main())
