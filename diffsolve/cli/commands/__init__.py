"""The subcommands of ``diffsolve``, one module each; every one is ``run(args, argv) -> exit code``."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence

from . import bench, evaluate, invert, optimize, restore, sample, solvers

Command = Callable[[argparse.Namespace, Sequence[str]], int]

COMMANDS: dict[str, Command] = {
    "solvers": solvers.run,
    "sample": sample.run,
    "invert": invert.run,
    "restore": restore.run,
    "eval": evaluate.run,
    "bench": bench.run,
    "optimize-grid": optimize.run,
}
