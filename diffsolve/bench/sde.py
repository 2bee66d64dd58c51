"""SDE-family benchmark: sample quality against NFE for euler-maruyama, pc, adaptive-sde (both
modes) and dmcmc + heun, on the 2-D GaussianMixture oracle and on the shipped digits-vp model.

    diffsolve bench --only sde [--quick]        (or python scripts/bench_sde.py [--quick])

GaussianMixture (VPLinear, exact scores): MMD^2 and sliced Wasserstein distance of 2000 samples to 2000
exact samples of the law at t_min (one shared reference, so the rows compare paired). digits-vp: digits-FD
of 500 samples (diffsolve.quality.evaluate, against the 300 held-out digits). euler-maruyama and pc
run on Score-SDE's uniform time grid (as in Gotta Go Fast's comparison), heun on the schedule's
default grid. NFE is model rows per
sample: for adaptive-sde per_sample mode finished samples leave the batch, so rows per sample is below
the number of model calls; for dmcmc both the paper's count (n_skip + integrator + Tweedie, burn-in
excluded) and the count with each chain's burn-in spread over its outputs are given; the plot uses
the latter. mrs-sde-adaptive (per sample) joins adaptive-sde. Writes sde.{json,md,png}. ``quick``:
1000 mixture samples and 200 digits, fewer settings.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

import diffsolve as ds
from diffsolve.metrics import mmd2, sliced_wasserstein
from diffsolve.samplers import (
    ClassifierNoiseLevel,
    ExactNoiseLevel,
    NoiseLevelEstimator,
)

from . import pyplot, save_figure, write_text

STEMS = ("sde",)
#: (method, solver, options, steps); steps None for the solvers that choose their own
Config = tuple[str, str, dict[str, Any], int | None]


def configs(part: str, estimator: NoiseLevelEstimator, quick: bool = False) -> list[Config]:
    """(method, solver, options, steps) rows of one part."""
    em: tuple[int, ...]
    pc: tuple[int, ...]
    heun: tuple[int, ...]
    eps: dict[str, tuple[float, ...]]
    mc: list[dict[str, Any]]
    if quick:
        em, pc, heun = (20, 100), (10, 50), (5, 10)
        eps = {"per_sample": (0.1,), "batch": (0.2,)}
        mc = [dict(integrator_steps=3, n_skip=3, langevin_step=0.1 if part == "gmm" else 0.03, rounds=1)]
    elif part == "gmm":
        em, pc, heun = (10, 20, 50, 100, 200, 500, 1000), (5, 10, 25, 50, 100), (3, 5, 10, 20)
        eps = {"per_sample": (0.01, 0.02, 0.05, 0.1, 0.2), "batch": (0.01, 0.02, 0.05, 0.1, 0.2)}
        mc = [dict(integrator_steps=s, n_skip=3, eta=0.1, rounds=10) for s in (1, 2, 3, 5)]
    else:
        em, pc, heun = (20, 50, 100), (10, 25, 50), (5, 10, 20)
        eps = {"per_sample": (0.1, 0.2), "batch": (0.2,)}
        mc = [dict(integrator_steps=s, n_skip=3, eta=0.03, rounds=r) for s, r in ((2, 1), (3, 1), (3, 5))]
    rows: list[Config] = [("euler-maruyama", "euler-maruyama", {"grid": "uniform"}, n) for n in em]
    rows += [("pc (reverse-diffusion + langevin)", "pc", {"grid": "uniform"}, n) for n in pc]
    rows += [
        (f"adaptive-sde {mode}", "adaptive-sde", {"eps_rel": e, "mode": mode}, None) for mode in eps for e in eps[mode]
    ]
    rows += [
        ("mrs-sde-adaptive per_sample", "mrs-sde-adaptive", {"rtol": r}, None)
        for r in ((0.1,) if quick else (0.02, 0.05, 0.1, 0.2))
    ]
    rows += [("heun (ODE, from noise)", "heun", {}, n) for n in heun]
    rows += [
        (f"dmcmc + heun ({o['rounds']} per chain)", "dmcmc", {"integrator": "heun", "estimator": estimator, **o}, None)
        for o in mc
    ]
    if (
        part == "gmm" and not quick
    ):  # the stochastic integrator of the test: 10 ancestral steps against dmcmc + 6 of them
        rows += [("ddpm (from noise)", "ddpm", {}, n) for n in (5, 10, 20)]
        rows += [
            (
                "dmcmc + ddpm (10 per chain)",
                "dmcmc",
                {
                    "integrator": "ddpm",
                    "estimator": estimator,
                    "integrator_steps": s,
                    "n_skip": 3,
                    "eta": 0.1,
                    "rounds": 10,
                },
                None,
            )
            for s in (3, 6, 16)
        ]
    return rows


def run_part(part: str, seed: int, quick: bool = False) -> list[dict[str, Any]]:
    estimator: NoiseLevelEstimator
    shape: tuple[int, ...]
    if part == "gmm":
        gmm = ds.models.GaussianMixture.gmm_2d()
        sched = ds.schedules.VPLinear()
        n = 1000 if quick else 2000
        model, shape = gmm.model(sched), (n, 2)
        ref = gmm.marginal(sched.t_min, sched).sample(n, torch.Generator().manual_seed(1000 + seed))
        estimator, dtype = ExactNoiseLevel(gmm), torch.float64

        def score(x):
            return {"mmd2": mmd2(x, ref), "sliced_w": sliced_wasserstein(x, ref)}
    else:
        from diffsolve.quality import evaluate

        model, shape, dtype = ds.pretrained.load("digits-vp"), (200 if quick else 500, 1, 16, 16), torch.float32
        estimator = ClassifierNoiseLevel.shipped()

        def score(x):
            return {"digits_fd": evaluate(x)["digits_fd"]}

    rows: list[dict[str, Any]] = []
    for method, solver, opts, steps in configs(part, estimator, quick):
        t0 = time.time()
        res = ds.sample(model, solver, steps, shape=shape, seed=seed, dtype=dtype, **opts)
        row = {
            "problem": part,
            "method": method,
            "steps": steps,
            "options": {k: v for k, v in opts.items() if k != "estimator"},
            "nfe": float(res.nfe_per_sample.double().mean()),
            "calls": res.nfe,
            **score(res.samples),
            "seconds": round(time.time() - t0, 2),
        }
        if solver in ("adaptive-sde", "mrs-sde-adaptive"):
            accepted, rejected = res.accepted, res.rejected
            if accepted is None or rejected is None:
                raise RuntimeError(f"{solver} returned no step counts")
            row["rejected_fraction"] = float(rejected.sum() / (accepted + rejected).sum())
        if solver == "dmcmc":
            row["nfe_paper"] = float(res.stats["nfe_per_output"].double().mean())
            row["estimator"] = type(opts["estimator"]).__name__
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def write(rows: list[dict], seed: int, out: Path, quick: bool) -> None:
    write_text(out / "sde.json", json.dumps({"seed": seed, "quick": quick, "rows": rows}, indent=2) + "\n")
    n_gmm, n_dig = (1000, 200) if quick else (2000, 500)
    lines = [
        "# SDE-family samplers: quality against NFE",
        "",
        (
            f"Written by `diffsolve bench{' --quick' if quick else ''}` (2 CPU threads). NFE = model rows per sample; dmcmc's "
            '"paper NFE" leaves out the burn-in (amortised over each chain\'s outputs in the NFE column).'
        ),
        "",
    ]
    for part, metric, title in (
        ("gmm", "mmd2", f"2-D GaussianMixture, VPLinear, exact scores, {n_gmm} samples"),
        ("digits", "digits_fd", f"digits-vp, {n_dig} samples, digits-FD (lower is better)"),
    ):
        sel = [r for r in rows if r["problem"] == part]
        if not sel:
            continue
        extra = " sliced W |" if part == "gmm" else ""
        lines += [
            f"## {title}",
            "",
            f"| method | setting | NFE | paper NFE | {metric} |{extra} calls | s |",
            "|---|---|---|---|---|" + ("---|" if extra else "") + "---|---|",
        ]
        for r in sel:
            setting = f"{r['steps']} steps" if r["steps"] else ", ".join(f"{k}={v}" for k, v in r["options"].items())
            if "rejected_fraction" in r:
                setting += f" (rejected {100 * r['rejected_fraction']:.0f}%)"
            paper = f"{r['nfe_paper']:.1f}" if "nfe_paper" in r else ""
            sw = f" {r['sliced_w']:.4f} |" if extra else ""
            lines.append(
                f"| {r['method']} | {setting} | {r['nfe']:.1f} | {paper} | {r[metric]:.4g} |{sw} "
                f"{r['calls']} | {r['seconds']} |"
            )
        lines.append("")
    write_text(out / "sde.md", "\n".join(lines))
    plt = pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, (part, metric) in zip(axes, (("gmm", "mmd2"), ("digits", "digits_fd"))):
        sel = [r for r in rows if r["problem"] == part]
        for method in dict.fromkeys(r["method"] for r in sel):
            pts = sorted((r["nfe"], r[metric]) for r in sel if r["method"] == method)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=method)
        ax.set_xscale("log")
        ax.set_xlabel("NFE per sample")
        ax.set_ylabel(metric)
        ax.set_title(part)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, out / "sde.png")


def run(out: Path, quick: bool = False, seed: int = 0) -> None:
    torch.set_num_threads(2)
    rows = []
    for part in ("gmm", "digits"):
        rows += run_part(part, seed, quick)
    write(rows, seed, out, quick)
