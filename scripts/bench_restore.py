"""Restoring held-out digits: D-Flow beside DPS, EnKG, Inpaint and RePaint, with PSNR and model calls.

    python scripts/bench_restore.py [--num 16] [--out benchmarks]

The two inverse problems of ``diffsolve restore`` (inpainting the bottom half; Gaussian blur of std
1.5 px plus noise 0.05) on the first ``--num`` held-out digits, digits-vp, 2 CPU threads, the same
seeds for every method (``ds.guidance.restore``). Each row: PSNR against the clean digits (mean and
its standard error over the digits), the model calls of the whole run (each on the whole batch; for
EnKG on its 16 particles per digit, for D-Flow every forward run and every adjoint call of the
optimisation) and the wall time. D-Flow runs with Adam and with L-BFGS (one per digit, strong-Wolfe
line search) at several step counts, iteration budgets and weights of its noise-norm regulariser
(``noise_reg``: the negative log chi density of |x_T|), whose effect on PSNR and on |x_T| (against
sqrt(d - 1), where Gaussian noise lives) is the second table. Writes restore.{json,md,png} into
``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

import diffsolve as ds
from diffsolve.cli.render import panel_image
from diffsolve.data import digits16
from diffsolve.guidance.tasks import inverse_problem, restore

#: (label, method, steps, options)
SETTINGS = [
    ("unguided (ddim)", "none", 50, {}),
    ("DPS (ddim, zeta 4)", "dps", 50, {}),
    ("DPS (ddim, zeta 4), 500 steps", "dps", 500, {}),
    ("EnKG (ddim, 16 particles)", "enkg", 50, {}),
    ("Inpaint (ddpm)", "inpaint", 50, {}),
    ("RePaint (ddpm, U = 10)", "repaint", 50, {}),
    *[
        (f"D-Flow (rev-heun {n}, Adam {it} it.)", "dflow", n, {"optimizer": "adam", "iterations": it, "noise_reg": 1.0})
        for n in (5, 10)
        for it in (30, 60)
    ],
    *[
        (
            f"D-Flow (rev-heun {n}, L-BFGS {it} it.)",
            "dflow",
            n,
            {"optimizer": "lbfgs", "iterations": it, "noise_reg": 1.0},
        )
        for n, it in ((5, 1), (5, 2), (5, 3), (10, 1), (10, 2))
    ],
]
#: the regulariser's study at D-Flow's default 5 steps: (optimizer, iterations, weight), beside the
#: rows of SETTINGS (weight 1, restore's default)
REGS = (
    ("adam", 60, 0.0),
    ("adam", 60, 0.01),
    ("adam", 60, 0.1),
    ("adam", 200, 0.0),
    ("adam", 200, 1.0),
    ("lbfgs", 2, 0.0),
    ("lbfgs", 2, 0.1),
    ("lbfgs", 3, 0.0),
    ("lbfgs", 3, 0.1),
)
#: the D-Flow settings the regulariser's table lists: (optimizer, iterations)
REG_RUNS = {(o, it) for o, it, _ in REGS}
#: the settings pictured beside the degraded and clean digits: label -> name in the picture
PICTURED = {
    "DPS (ddim, zeta 4)": "DPS",
    "RePaint (ddpm, U = 10)": "RePaint",
    "D-Flow (rev-heun 5, Adam 60 it.)": "D-Flow Adam",
    "D-Flow (rev-heun 5, L-BFGS 2 it.)": "D-Flow",
}


def psnr_stats(x: torch.Tensor, clean: torch.Tensor) -> tuple[float, float]:
    p = ds.metrics.psnr(x.clamp(-1, 1), clean).double()
    return float(p.mean()), float(p.std() / math.sqrt(len(p)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num", type=int, default=16, help="held-out digits (default 16)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks"))
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    model = ds.pretrained.load("digits-vp")
    clean = digits16("heldout")[0][: args.num]
    d = clean[0].numel()
    rows, pictures = [], {}
    for task in ("inpaint", "deblur"):
        prob = inverse_problem(task, clean, seed=0)
        pictures[task] = [("degraded", prob.display)]
        settings = [s for s in SETTINGS if task == "inpaint" or s[1] not in ("inpaint", "repaint")]
        names = {"adam": "Adam", "lbfgs": "L-BFGS"}
        settings += [
            (
                f"D-Flow (rev-heun 5, {names[o]} {it} it.), noise_reg {r}",
                "dflow",
                5,
                {"optimizer": o, "iterations": it, "noise_reg": r},
            )
            for o, it, r in REGS
        ]
        for label, method, steps, opts in settings:
            start = time.perf_counter()
            x, res = restore(model, prob, method, steps=steps, seed=0, progress=False, **opts)
            wall = time.perf_counter() - start
            mean, se = psnr_stats(x, clean)
            row = {
                "task": task,
                "setting": label,
                "method": method,
                "steps": steps,
                "options": opts,
                "psnr_db": round(mean, 2),
                "psnr_se": round(se, 2),
                "nfe": res.nfe,
                "wall_s": round(wall, 1),
                "main": (label, method, steps, opts) in SETTINGS,
            }
            if method == "dflow":
                norms = torch.tensor(res.stats["x_T_norm"], dtype=torch.float64)
                row["x_T_norm_dev"] = round(float((norms - math.sqrt(d - 1)).abs().mean()), 3)
                row["final_loss"] = round(res.stats["dflow_loss"][-1], 3)
            rows.append(row)
            print(row, flush=True)
            if label in PICTURED:
                pictures[task].append((PICTURED[label], x.clamp(-1, 1)))
        pictures[task].append(("clean", clean))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "restore.json").write_text(json.dumps({"num_digits": len(clean), "rows": rows}, indent=1) + "\n")
    write_md(args.out / "restore.md", rows, len(clean), d)
    for task, panel in pictures.items():
        image, _ = panel_image([(name, x[:8]) for name, x in panel])
        image.save(args.out / f"restore_{task}.png")
    return 0


def write_md(path: Path, rows, n: int, d: int) -> None:
    lines = [
        "# Restoring held-out digits: D-Flow, DPS, EnKG, Inpaint, RePaint",
        "",
        (
            f"Written by `scripts/bench_restore.py`: digits-vp, the first {n} held-out digits, 2 CPU threads, "
            "the same seeds for every method; D-Flow with noise_reg 1 (restore's default) except in the "
            "regulariser's table. PSNR in dB (mean +- its standard error over the digits); "
            "NFE: model calls of the whole run, each on the whole batch (EnKG: 16 particles per digit in "
            "one batch; D-Flow: every forward run and every call of the reversible adjoint's backward "
            "passes). Pictures: restore_inpaint.png, restore_deblur.png (first 8 digits)."
        ),
        "",
    ]
    for task, title in (("inpaint", "Inpainting the bottom half"), ("deblur", "Deblurring (std 1.5 px, noise 0.05)")):
        lines += [f"## {title}", "", "| setting | PSNR (dB) | NFE | wall (s) |", "|---|---|---|---|"]
        for r in rows:
            if r["task"] == task and r["main"]:
                lines.append(f"| {r['setting']} | {r['psnr_db']} +- {r['psnr_se']} | {r['nfe']} | {r['wall_s']} |")
        lines.append("")
    lines += [
        "## D-Flow's noise regulariser",
        "",
        (
            "noise_reg lambda adds lambda (|z|^2 / 2 - (d - 1) log |z|) per sample (the negative log density "
            f"of a {d}-dimensional standard normal's norm; smallest at |z| = sqrt(d - 1) = {math.sqrt(d - 1):.2f}). "
            "Rev-heun 5 steps; restore's default is L-BFGS, 2 iterations, noise_reg 1. |x_T| deviation: mean | |x_T| - sqrt(d - 1) | over the digits; "
            "loss: the final mean data term |A(x) - y|^2."
        ),
        "",
        "| task | optimizer | iterations | noise_reg | PSNR (dB) | |x_T| deviation | loss | NFE |",
        "|---|---|---|---|---|---|---|---|",
    ]
    studied = [
        r
        for r in rows
        if r["method"] == "dflow"
        and r["steps"] == 5
        and (r["options"]["optimizer"], r["options"]["iterations"]) in REG_RUNS
    ]
    tasks = ("inpaint", "deblur")
    for r in sorted(
        studied,
        key=lambda r: (tasks.index(r["task"]), *(r["options"][k] for k in ("optimizer", "iterations", "noise_reg"))),
    ):
        o = r["options"]
        lines.append(
            f"| {r['task']} | {o['optimizer']} | {o['iterations']} | {o['noise_reg']} | "
            f"{r['psnr_db']} +- {r['psnr_se']} | {r['x_T_norm_dev']} | {r['final_loss']} | {r['nfe']} |"
        )
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
