"""``diffsolve solvers``: the registered solvers as a table (or Markdown)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import diffsolve as ds


def run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """`diffsolve solvers`: returns the exit code."""
    table = ds.list_solvers(args.family)
    print(table.markdown() if args.markdown else table)
    return 0
