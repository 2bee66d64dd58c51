"""Gradients through sampling: memory, time and accuracy of the three ways to take them.

    python scripts/bench_adjoint.py

- autograd through ``ds.sample``'s unrolled loop (any solver; stores every step),
- the reversible adjoint, ``grad=True`` (reversible solvers; rebuilds each state with the exact
  inverse step),
- the continuous adjoint, ``grad="continuous"`` (AdjointDPM; any deterministic solver; integrates
  the adjoint ODE backwards by RK4 in exponential-integrator variables).

Memory and time: an MLP eps-network (D = 1024, hidden 1024, batch 256, float32), the loss |x_0|^2
back-propagated to x_T and the network's weights, at 10, 50 and 200 steps; and digits-vp's UNet
(batch 8, one D-Flow iteration: a data term back-propagated to x_T) at 10, 50 and 100 steps. Each
run is a fresh process; the peak RSS over the RSS after set-up is reported (measured with glibc's mmap
threshold fixed, so that it follows the live tensors), and the wall time of
forward + backward as a ratio to the unrolled run at the same steps (all rows run one after another
on 2 threads).

Accuracy: the closed-form Gaussian of tests/test_continuous_adjoint.py (float64, VP): the relative
error of the gradients to x_T, the conditioning and the parameters against the exact flow's, per
method and step count. Writes benchmarks/adjoint.{json,md}.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MLP_SOLVERS = ("rev-heun", "bdia", "o-belm", "edict", "rex", "dpmpp-2m", "exp-rk4")
REVERSIBLE = {"rev-heun", "bdia", "o-belm", "edict", "rex"}

CHILD = r"""
import resource, sys, time, torch, diffsolve as ds
torch.set_num_threads(2)
net_kind, solver, mode, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
grad = {"unrolled": False, "reversible": True, "continuous": "continuous"}[mode]
torch.manual_seed(0)
if net_kind == "mlp":
    D = 1024
    class Net(torch.nn.Module):
        def __init__(s):
            super().__init__()
            s.m = torch.nn.Sequential(torch.nn.Linear(D + 1, 1024), torch.nn.Tanh(), torch.nn.Linear(1024, D))
        def forward(s, x, t):
            return s.m(torch.cat([x, t[:, None].to(x.dtype)], 1))
    model = ds.DiffusionModel(Net(), ds.schedules.VPLinear(), "eps", time_input="t")
    x_T = torch.randn(256, D, requires_grad=True)
    loss = lambda x: (x ** 2).sum()
else:
    model = ds.pretrained.load("digits-vp")
    for p in model.net.parameters():
        p.requires_grad_(False)
    x_T = torch.randn(8, 1, 16, 16, requires_grad=True)
    y = torch.zeros(8, 1, 16, 16)
    loss = lambda x: (x[..., :8, :] - y[..., :8, :]).pow(2).sum()
import os
base = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1024  # current RSS, KiB
t0 = time.perf_counter()
out = ds.sample(model, solver, n, x_T=x_T, grad=grad, progress=False).samples
loss(out).backward()
wall = time.perf_counter() - t0
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024, wall, model.nfe)
"""


def run_child(*argv: str, exact_memory: bool = False) -> tuple[float, float, int]:
    """(peak RSS growth in MiB, wall time in s, model calls) of one fresh process. With
    ``exact_memory`` glibc's mmap threshold is fixed at 128 KiB, so every tensor of that size or more
    is mapped and unmapped on its own and RSS follows the live tensors (with the default dynamic
    threshold, freed blocks stay in the heap and the peak depends on fragmentation); that costs time,
    so times come from a run with the default."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"} if exact_memory else None
    out = subprocess.run(
        [sys.executable, "-c", CHILD, *argv], capture_output=True, text=True, check=True, env=env
    ).stdout.split()
    return float(out[0]), float(out[1]), int(out[2])


def memory_rows() -> list[dict]:
    rows = []
    cases = [("mlp", s, (10, 50, 200)) for s in MLP_SOLVERS] + [
        ("digits-vp", s, (10, 50, 100)) for s in ("rev-heun", "dpmpp-2m")
    ]
    for net, solver, steps_list in cases:
        modes = ("unrolled", "reversible", "continuous") if solver in REVERSIBLE else ("unrolled", "continuous")
        for steps in steps_list:
            row: dict = {"net": net, "solver": solver, "steps": steps}
            for mode in modes:
                mem = run_child(net, solver, mode, str(steps), exact_memory=True)[0]
                _, wall, nfe = run_child(net, solver, mode, str(steps))
                row[mode] = {"peak_rss_growth_mib": round(mem, 1), "wall_s": round(wall, 3), "nfe": nfe}
            for mode in modes[1:]:
                row[mode]["time_ratio_to_unrolled"] = round(row[mode]["wall_s"] / row["unrolled"]["wall_s"], 2)
            rows.append(row)
            print(row, flush=True)
    return rows


def accuracy_rows() -> list[dict]:
    import torch

    sys.path.insert(0, str(ROOT / "tests"))
    from test_continuous_adjoint import exact, grads, rel, setup

    import diffsolve as ds

    torch.set_num_threads(2)
    sched = ds.schedules.VPLinear()
    rows = []
    for solver in ("rev-heun", "dpmpp-2m", "unipc", "exp-rk4"):
        for steps in (10, 25, 50, 100, 200):
            net, model, x_T, shift, w = setup(sched)
            modes = {"unrolled": False, "continuous": "continuous"}
            if solver in REVERSIBLE:
                modes["reversible"] = True
            row: dict = {"solver": solver, "steps": steps}
            for mode, grad in modes.items():
                g, res = grads(net, model, x_T, shift, w, solver, steps, grad=grad)
                ex, _ = exact(net, x_T, shift, w, sched, float(res.grid[0]), float(res.grid[-1]))
                row[mode] = rel(g, ex)
                if mode == "continuous":
                    row["continuous_vs_unrolled"] = rel(g, grads(net, model, x_T, shift, w, solver, steps)[0])
            rows.append(row)
            print(row, flush=True)
    return rows


def fmt(v: float) -> str:
    return f"{v:.1e}"


def main() -> None:
    acc = accuracy_rows()
    mem = memory_rows()
    out = ROOT / "benchmarks"
    out.mkdir(exist_ok=True)
    (out / "adjoint.json").write_text(json.dumps({"memory": mem, "accuracy": acc}, indent=1) + "\n")
    lines = [
        "# Gradients through sampling: autograd, the reversible adjoint, the continuous adjoint",
        "",
        (
            "Written by `scripts/bench_adjoint.py` (2 CPU threads). Peak RSS in MiB over the RSS "
            "after set-up (one fresh process per cell, MALLOC_MMAP_THRESHOLD_=131072 so that RSS follows the "
            "live tensors rather than the heap's fragmentation), time as a ratio to the unrolled run at the same steps, "
            "NFE: model calls of forward + backward (a VJP counts as one call)."
        ),
        "",
        "## Memory and time",
        "",
        (
            "MLP eps-network (D = 1024, batch 256, float32, loss |x_0|^2 to x_T and the weights); "
            "digits-vp UNet (batch 8, one D-Flow iteration: a data term to x_T)."
        ),
        "",
        "| net | solver | steps | unrolled MiB | reversible MiB (time ratio, NFE) | continuous MiB (time ratio, NFE) |",
        "|---|---|---|---|---|---|",
    ]

    def cell(r: dict, mode: str) -> str:
        if mode not in r:
            return "-"
        c = r[mode]
        return f"{c['peak_rss_growth_mib']} ({c['time_ratio_to_unrolled']}x, {c['nfe']})"

    for r in mem:
        lines.append(
            f"| {r['net']} | {r['solver']} | {r['steps']} | {r['unrolled']['peak_rss_growth_mib']} "
            f"(NFE {r['unrolled']['nfe']}) | {cell(r, 'reversible')} | {cell(r, 'continuous')} |"
        )
    lines += [
        "",
        "## Accuracy on the closed-form Gaussian",
        "",
        (
            "Relative error of the gradients (to x_T, a conditioning tensor and the network's two "
            "parameter vectors) against the exact flow's, float64, VP (tests/test_continuous_adjoint.py). "
            "Autograd and the reversible adjoint give the gradient of the solver's discrete map (their "
            "error is the solver's); the continuous adjoint gives the exact flow's gradient along the "
            "run, accurate to the forward solver's error and its own O(h^4). Last column: continuous "
            "adjoint against autograd."
        ),
        "",
        "| solver | steps | autograd | reversible | continuous | continuous vs autograd |",
        "|---|---|---|---|---|---|",
    ]
    for r in acc:
        lines.append(
            f"| {r['solver']} | {r['steps']} | {fmt(r['unrolled'])} | "
            f"{fmt(r['reversible']) if 'reversible' in r else '-'} | {fmt(r['continuous'])} | "
            f"{fmt(r['continuous_vs_unrolled'])} |"
        )
    (out / "adjoint.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
