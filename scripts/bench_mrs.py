"""MR Sampler benchmark: restore the 300 held-out digits with the shipped digits-mr model.

    python scripts/bench_mrs.py [--seed 0]

PSNR and SSIM (mean over digits, against the clean digits) for NFE 5, 10, 20, 50, 100 with mrs-sde
(order 2, data), mrs-ode (order 2, data), irsde-posterior and irsde; writes benchmarks/mrs.json,
benchmarks/mrs.md and, when matplotlib is installed, benchmarks/mrs.png.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import diffsolve as ds
from diffsolve.data import degrade, digits16

ROOT = Path(__file__).resolve().parents[1]
NFES = (5, 10, 20, 50, 100)
SOLVERS = {
    "mrs-sde-2": ("mrs-sde", {"order": 2}),
    "mrs-ode-2": ("mrs-ode", {"order": 2}),
    "mrs-sde-1": ("mrs-sde", {"order": 1}),
    "irsde-posterior": ("irsde-posterior", {}),
    "irsde": ("irsde", {}),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    torch.set_num_threads(2)
    card = ds.pretrained.card("digits-mr")
    model = ds.pretrained.load("digits-mr")
    clean = digits16("heldout")[0]
    mu = degrade(clean, card["degradation"], torch.Generator().manual_seed(a.seed))
    rows = [
        {
            "solver": "degraded input",
            "nfe": 0,
            "psnr": float(ds.metrics.psnr(mu, clean).mean()),
            "ssim": float(ds.metrics.ssim(mu, clean).mean()),
        }
    ]
    print(rows[0])
    for label, (solver, opts) in SOLVERS.items():
        for nfe in NFES:
            t0 = time.time()
            res = ds.sample(model, solver, nfe, shape=clean.shape, seed=a.seed, mu=mu, **opts)
            assert res.nfe == nfe
            rows.append(
                {
                    "solver": label,
                    "nfe": nfe,
                    "psnr": float(ds.metrics.psnr(res.samples, clean).mean()),
                    "ssim": float(ds.metrics.ssim(res.samples, clean).mean()),
                    "seconds": round(time.time() - t0, 2),
                }
            )
            print(rows[-1], flush=True)
    out = ROOT / "benchmarks"
    out.mkdir(exist_ok=True)
    (out / "mrs.json").write_text(
        json.dumps({"model": "digits-mr", "degradation": card["degradation"], "seed": a.seed, "rows": rows}, indent=2)
        + "\n"
    )
    head = "| solver | " + " | ".join(f"NFE {n}" for n in NFES) + " |"
    lines = [head, "|---|" + "---|" * len(NFES)]
    for label in SOLVERS:
        cells = [next(r for r in rows if r["solver"] == label and r["nfe"] == n) for n in NFES]
        lines.append(f"| {label} | " + " | ".join(f"{c['psnr']:.2f} / {c['ssim']:.3f}" for c in cells) + " |")
    md = (
        "# MR Sampler on digits-mr\n\nRestoring the 300 held-out digits (degradation: "
        f"{card['degradation']}), seed {a.seed}. Cells: PSNR dB / SSIM against the clean digits "
        f"(degraded input: {rows[0]['psnr']:.2f} / {rows[0]['ssim']:.3f}). Grid: uniform in log-SNR.\n\n"
        + "\n".join(lines)
        + "\n"
    )
    (out / "mrs.md").write_text(md)
    print(md)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install '.[bench]')")
        return
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.5))
    for label in SOLVERS:
        rs = [r for r in rows if r["solver"] == label]
        ax[0].plot([r["nfe"] for r in rs], [r["psnr"] for r in rs], "o-", label=label)
        ax[1].plot([r["nfe"] for r in rs], [r["ssim"] for r in rs], "o-", label=label)
    for k, name in enumerate(("PSNR (dB)", "SSIM")):
        ax[k].set_xscale("log")
        ax[k].set_xlabel("NFE")
        ax[k].set_ylabel(name)
        ax[k].axhline(rows[0]["psnr" if k == 0 else "ssim"], color="gray", ls=":", label="degraded")
    ax[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "mrs.png", dpi=120)


if __name__ == "__main__":
    main()
