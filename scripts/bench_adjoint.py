"""Memory of gradients through sampling: the reversible adjoint against autograd through the loop.

    python scripts/bench_adjoint.py

Every reversible solver with an MLP eps-network (D = 1024, hidden 1024, batch 256, float32): the loss
|x_0|^2 is back-propagated to x_T by ds.sample(..., grad=True) (the reversible adjoint) and by
autograd through ds.sample's unrolled loop, at 10, 50 and 200 steps. Each run is a fresh process;
the peak RSS growth over the set-up is reported, with the wall time of forward + backward as a ratio
to the unrolled run at the same step count. Writes benchmarks/adjoint.{json,md}.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOLVERS = ("rev-heun", "bdia", "o-belm", "edict", "rex")

CHILD = r"""
import resource, sys, time, torch, diffsolve as ds
torch.set_num_threads(2)
solver, mode, n, D = sys.argv[1], sys.argv[2], int(sys.argv[3]), 1024
torch.manual_seed(0)
class Net(torch.nn.Module):
    def __init__(s):
        super().__init__()
        s.m = torch.nn.Sequential(torch.nn.Linear(D + 1, 1024), torch.nn.Tanh(), torch.nn.Linear(1024, D))
    def forward(s, x, t):
        return s.m(torch.cat([x, t[:, None].to(x.dtype)], 1))
model = ds.DiffusionModel(Net(), ds.schedules.VPLinear(), "eps", time_input="t")
x_T = torch.randn(256, D, requires_grad=True)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
out = ds.sample(model, solver, n, x_T=x_T, grad=mode == "reversible").samples
(out ** 2).sum().backward()
wall = time.perf_counter() - t0
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024, wall)
"""


def main() -> None:
    rows = []
    for solver in SOLVERS:
        for steps in (10, 50, 200):
            walls = {}
            for mode in ("unrolled", "reversible"):
                out = subprocess.run(
                    [sys.executable, "-c", CHILD, solver, mode, str(steps)], capture_output=True, text=True, check=True
                ).stdout.split()
                walls[mode] = float(out[1])
                rows.append(
                    {"solver": solver, "steps": steps, "mode": mode, "peak_rss_growth_mib": round(float(out[0]), 1)}
                )
            rows[-1]["time_ratio_to_unrolled"] = round(walls["reversible"] / walls["unrolled"], 2)
            print(rows[-2], rows[-1], flush=True)
    out = ROOT / "benchmarks"
    out.mkdir(exist_ok=True)
    (out / "adjoint.json").write_text(json.dumps({"rows": rows}, indent=2) + "\n")
    lines = [
        "# Gradients through reversible solvers: reversible adjoint vs autograd through the loop",
        "",
        (
            "Written by `scripts/bench_adjoint.py` (2 CPU threads; MLP eps-network, D = 1024, batch 256, "
            "float32; one fresh process per row)."
        ),
        "",
        (
            "| solver | steps | unrolled: peak RSS growth (MiB) | reversible: peak RSS growth (MiB) | "
            "reversible time / unrolled time |"
        ),
        "|---|---|---|---|---|",
    ]
    for u, r in zip(rows[::2], rows[1::2]):
        lines.append(
            f"| {u['solver']} | {u['steps']} | {u['peak_rss_growth_mib']} | {r['peak_rss_growth_mib']} | "
            f"{r['time_ratio_to_unrolled']} |"
        )
    (out / "adjoint.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
