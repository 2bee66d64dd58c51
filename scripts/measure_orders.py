"""Measure every deterministic fixed-grid entry's convergence order and write the README solver table.

    python scripts/measure_orders.py [--out benchmarks/orders.json] [--table benchmarks/solver_table.md]

Orders are measured as :mod:`diffsolve.bench.orders` describes (log-SNR grid, 20 to 320 steps; the
order is the last doubling's), on two oracles: a 4-D Gaussian mixture (two components, reference by
dopri8 at tolerance 1e-12) and a 4-D Gaussian (closed-form flow map). The Markdown table is the
registry's (``diffsolve solvers --markdown``) with a "measured" column: the mixture's order (the
Gaussian's in brackets where it differs by more than 0.3: exponential integrators of odd order
superconverge on Gaussian data), with the options it was measured at where the defaults do not
converge (``orders.CONVERGENT``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import diffsolve as ds
from diffsolve.bench import orders as O


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/orders.json"))
    ap.add_argument("--table", type=Path, default=Path("benchmarks/solver_table.md"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    result = {oracle: O.measure(oracle=oracle) for oracle in ("mixture", "gaussian")}
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    cells = {}
    for name, m in result["mixture"].items():
        g = result["gaussian"][name]["order"]
        cells[name] = f"{m['order']:.2f}" + (f" ({g:.2f})" if abs(g - m["order"]) > 0.3 else "")
        if name in O.CONVERGENT:  # its defaults give an error floor
            cells[name] += " with " + ", ".join(f"{k}={v}" for k, v in O.CONVERGENT[name].items())
    cells.update(dict.fromkeys(O.NOT_CONVERGENT, "no (floor)"))
    table = ds.list_solvers()
    cols = list(table.COLUMNS)
    at = cols.index("order") + 1
    lines = ["| " + " | ".join([*cols[:at], "measured", *cols[at:]]) + " |", "|" + "---|" * (len(cols) + 1)]
    for row in table.rows():
        lines.append("| " + " | ".join([*row[:at], cells.get(row[0], "-"), *row[at:]]) + " |")
    args.table.write_text("\n".join(lines) + "\n")
    for name, m in result["mixture"].items():
        print(
            f"{name:24s} stated {m['stated']:<4} mixture {[round(o, 2) for o in m['orders']]}  gaussian "
            f"{[round(o, 2) for o in result['gaussian'][name]['orders']]}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
