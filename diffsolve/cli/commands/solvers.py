"""``diffsolve solvers``: the registered solvers as a table (or Markdown), or one solver's options."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import diffsolve as ds

from ..errors import user_input


def run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """`diffsolve solvers`: returns the exit code."""
    if args.options is not None:
        with user_input():
            info = ds.samplers.solver_info(args.options)
        fixed = ", ".join(f"{k}={v!r}" for k, v in info.fixed.items())
        print(f"{info.name}: {info.description}" + (f" (fixes {fixed})" if fixed else ""))
        print(f"  {info.reference}")
        lines = info.option_help()
        print("options (pass as -o key=value):" if lines else "no options")
        for line in lines:
            print(f"  {line}")
        return 0
    with user_input():
        table = ds.list_solvers(args.family)
    print(table.markdown() if args.markdown else table)
    return 0
