"""The benchmarks behind ``diffsolve bench`` (and ``scripts/bench_*.py``).

Each module measures one thing side by side in one run and writes a Markdown table, a JSON file and,
with matplotlib, a plot into an output folder:

==============  =====================================================================================
``ode``         accuracy against NFE of fixed-step ODE solvers: ours, diffusers' schedulers, k-diffusion
``sde``         sample quality against NFE of the SDE solvers (two-sample distance; digits-FD)
``adaptive``    adaptive solvers: error at equal NFE and NFE at equal error, against dopri5 and
                k-diffusion's dpm_adaptive
``overhead``    time per step outside the model, ours against diffusers' ``step()``; share of the time
                spent outside the digits-vp UNet
``inversion``   round trip, latent error and NFE of every inversion method; round trip against steps
                of every invertible solver on digits-vp
``reversible``  reversible solvers on the trained digit models: quality against a non-reversible
                solver of the same order at equal model calls; exact round trip in float32 / float64
==============  =====================================================================================

``quick=True`` runs a reduced version of each (the whole set in minutes on a CPU). k-diffusion is an
optional peer: where it is not importable its rows are left out and the tables say so.
"""

from __future__ import annotations

import argparse
import importlib
import os
import time
from collections.abc import Sequence
from pathlib import Path

NAMES = ("ode", "sde", "adaptive", "overhead", "inversion", "reversible")


def default_out(quick: bool) -> Path:
    return Path("benchmarks") / "quick" if quick else Path("benchmarks")


def write_text(path: Path, text: str) -> None:
    """Write ``text`` atomically (a temporary file, then a rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_figure(fig, path: Path) -> None:
    """Save a matplotlib figure atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, dpi=120, format=path.suffix.lstrip("."))
    os.replace(tmp, path)


def pyplot():
    """matplotlib's pyplot on the Agg backend, or None when matplotlib is not installed (the plots
    are then left out; the tables are written all the same)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def module(name: str):
    if name not in NAMES:
        raise ValueError(f"unknown benchmark {name!r}; allowed: {', '.join(NAMES)}")
    return importlib.import_module(f"{__name__}.{name}")


def outputs(name: str, out: Path) -> list[Path]:
    """The files benchmark ``name`` writes into ``out``."""
    return [out / f"{stem}.{ext}" for stem in module(name).STEMS for ext in ("md", "json", "png")]


def run(names: Sequence[str], out: Path, quick: bool = False, force: bool = False) -> list[Path]:
    """Run the named benchmarks into ``out``; refuses to overwrite earlier results unless ``force``."""
    mods = [module(n) for n in names]
    if not force:
        existing = [p for n in names for p in outputs(n, out) if p.exists()]
        if existing:
            raise FileExistsError(
                f"{len(existing)} result files exist already in {out} (e.g. {existing[0]}); "
                "pass --force to overwrite them"
            )
    written = []
    for n, m in zip(names, mods):
        t0 = time.perf_counter()
        print(f"[bench] {n} ({'quick' if quick else 'full'}) -> {out}", flush=True)
        m.run(out, quick=quick)
        print(f"[bench] {n} done in {time.perf_counter() - t0:.0f} s", flush=True)
        written += [p for p in outputs(n, out) if p.exists()]
    return written


def script_main(name: str, argv: Sequence[str] | None = None) -> None:
    """The command line of ``scripts/bench_<name>.py``: ``--quick``, ``--out``, ``--force``."""
    m = module(name)
    p = argparse.ArgumentParser(description=m.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the reduced version")
    p.add_argument("--out", type=Path, default=None, help="output folder (default benchmarks/, or benchmarks/quick/)")
    p.add_argument("--force", action="store_true", help="overwrite earlier results")
    a = p.parse_args(argv)
    run([name], a.out or default_out(a.quick), quick=a.quick, force=a.force)
