"""``diffsolve bench``: run the benchmarks (:mod:`diffsolve.bench`) one after another and print the
tables and plots they wrote."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from ..errors import CLIError, warn
from ..output import check_out
from ..parser import BENCH_NAMES


def run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """`diffsolve bench`: returns the exit code."""
    from diffsolve import bench

    names = list(BENCH_NAMES) if args.only is None else [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in BENCH_NAMES]
    if unknown or not names:
        raise CLIError(f"--only: unknown benchmark(s) {unknown}; choose from {', '.join(BENCH_NAMES)}")
    out = Path(args.out) if args.out else bench.default_out(args.quick)
    check_out(out, [p.name for n in names for p in bench.outputs(n, out)], args.force)
    if bench.pyplot() is None:
        warn(
            "matplotlib is not installed: the plots (.png) are left out, the tables are written "
            "(pip install matplotlib, then rerun with --force for the plots)"
        )
    written: list[Path] = []
    for i, n in enumerate(names):
        try:
            written += bench.run([n], out, quick=args.quick, force=True)
        except KeyboardInterrupt:
            rest = ",".join(names[i:])
            again = " ".join(
                [
                    "diffsolve bench",
                    *(["--quick"] if args.quick else []),
                    "--only",
                    rest,
                    *(["--out", str(out)] if args.out else []),
                    *(["--force"] if args.force else []),
                ]
            )
            finished = f"{', '.join(names[:i])} finished (in {out}); " if i else ""
            raise KeyboardInterrupt(
                f"{finished}a rerun does not resume the benchmarks; run the rest with `{again}`"
            ) from None
    for path in written:
        print(path)
    return 0
