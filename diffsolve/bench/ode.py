"""Accuracy against NFE of fixed-step ODE solvers: ours against the complete peer set of diffusers'
schedulers and k-diffusion's samplers (:mod:`diffsolve.bench.ode_peers`), on one oracle model and one
initial noise.

    diffsolve bench --only ode [--quick]        (or python scripts/bench_ode.py [--quick])

Model: a 16-D GaussianMixture (8 components, exact denoiser) under Stable Diffusion's discrete
schedule (scaled-linear betas 0.00085 .. 0.012, 1000 steps), 128 samples, float64. Every method
starts from the same x_T at timestep 999 (sigma/alpha = 14.6) and ends at sigma = 0, so all
integrate one probability-flow ODE: dx/dsigma = (x - D(x, sigma)) / sigma in the variables
x/alpha, sigma/alpha, which does not depend on how a scheduler interpolates its time. Reference:
dpmpp-3s on 4000 log-SNR steps down to sigma/alpha = 3e-7, then to sigma = 0 (checked against
2000 steps). Error: RMS over samples and dimensions of x(sigma = 0) against the reference.

NFE budgets 3, 4, 5, 6, 8, 10, 15, 20, 50 with equal-cost accounting: at budget B every method gets
the largest number of steps whose real count of model calls is at most B (counted; a solver with
2 or 3 calls a step, or one that skips a call on its last step, gets what really fits), and the
tables give that count where it is below B. A setting that cannot fit B has no point there.

Ours ("diffsolve"): euler, heun, ddim, dpmpp-2m, dpmpp-3m, mrs-ode (order 3), dpmpp-3s, each on the
log-SNR grid and on the Karras grid (rho 7) down to timestep 0, and on the log-SNR grid down to
timestep 9 (sigma/alpha = 0.1), all ending with a step to sigma = 0 (so the model is only queried
at timesteps 0 ... 999, as a trained network allows); ode-dopri5 by its tolerance.
"diffsolve (published grids)": the same solvers on Align Your Steps' SD 1.x table and on GITS' tables
(every DP coefficient 0.80 .. 1.50), each both as ComfyUI lists them (the table's last level,
sigma_min, replaced by 0) and as A1111 lists Align Your Steps (the table stretched to one point
fewer, then 0 appended), so every grid ends at sigma = 0.
Any group named "diffsolve (...)" counts towards "ours" in the headline, among them "diffsolve
(optimised grid)": dpmpp-3m and unipc on grids from ``ds.optimize_grid`` (fitted per budget on 1024
noises disjoint from the evaluation's, the end of the trajectory searched too: ``stop_early`` and
``final_order`` 1 or 2; their cost in its own table).

Peers: see :mod:`diffsolve.bench.ode_peers` (every diffusers ODE scheduler with each spacing and sigma
option it has; k-diffusion's deterministic samplers with Karras, exponential and polyexponential
sigmas). The headline's best peer at B is the minimum error over that whole set with calls <= B.
Writes ode.{json,md,png}. ``quick``: 32 samples, a 1000-step reference, a subset of the settings
(trailing spacing, plain and Karras sigmas; 3 k-diffusion samplers on Karras sigmas; GITS at its
default coefficient).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch

import diffsolve as ds
from diffsolve.schedules import named_grids as ng

from . import ode_peers, pyplot, save_figure, write_text

STEMS = ("ode",)
NFES = (3, 4, 5, 6, 8, 10, 15, 20, 50)
SD = ode_peers.SD
OURS: dict[str, tuple[str, dict[str, Any], int]] = {  # name -> (solver, options, calls per step)
    "euler": ("euler", {}, 1),
    "heun": ("heun", {}, 2),
    "ddim": ("ddim", {}, 1),
    "dpmpp-2m": ("dpmpp-2m", {}, 1),
    "dpmpp-3m": ("dpmpp-3m", {}, 1),
    "mrs-ode (order 3)": ("mrs-ode", {"order": 3}, 1),
    "dpmpp-3s": ("dpmpp-3s", {}, 3),
}
PEERS = ("diffusers", "k-diffusion")
PUBLISHED = "diffsolve (published grids)"


def problem(n: int = 128):
    sd = ds.schedules.VPDiscrete.from_diffusers_config(SD)
    g = torch.Generator().manual_seed(0)
    gmm = ds.models.GaussianMixture(
        torch.randn(8, 16, generator=g, dtype=torch.float64),
        0.1 + 0.5 * torch.rand(8, generator=g, dtype=torch.float64),
    )
    x_T = torch.randn(n, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    return sd, gmm.model(sd), x_T


GRIDS = {"log-snr": ("log-snr", None), "karras": ("karras", None), "log-snr to timestep 9": ("log-snr", 0.01)}


def our_grid(sd, steps: int, kind: str, t_min: float | None = None) -> list[float]:
    """``steps`` steps from t_max: steps - 1 on the grid ``kind`` down to ``t_min`` (default t = 1/N,
    timestep 0), then to t = 0."""
    if steps == 1:
        return [sd.t_max, 0.0]
    return ds.schedules.make_grid(sd, steps - 1, kind, t_min=t_min).tolist() + [0.0]


def reference(sd, model, x_T, steps: int) -> torch.Tensor:
    t_lo = float(sd.t_of_log_snr(torch.tensor(15.0, dtype=torch.float64)))  # sigma/alpha = 3e-7
    grid = ds.schedules.make_grid(sd, steps, "log-snr", t_min=t_lo).tolist() + [0.0]
    return ds.sample(model, "dpmpp-3s", x_T=x_T, grid=grid).samples


def rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).pow(2).mean().sqrt())


def _levels_then_zero(sd, levels: torch.Tensor) -> list[float]:
    """Times of descending noise levels sigma/alpha (the first at t_max), then t = 0 appended."""
    inner = sd.t_of_log_snr(-torch.log(levels[1:].double())).tolist()
    return [float(sd.t_max), *inner, 0.0]


def published_grids(quick: bool = False) -> dict[str, Any]:
    """name -> grid(sd, steps) of the published tables for Stable Diffusion 1.x's schedule, each ending
    at sigma = 0: ComfyUI's lists (the table's last level replaced by 0) and A1111's (0 appended)."""
    table = ng.AYS_TABLES["ays-sd1"]
    out: dict[str, Any] = {
        "AYS SD1 (ComfyUI)": lambda sd, n: ds.schedules.make_grid(sd, n, "ays-sd1").tolist(),
        "AYS SD1 (A1111, 0 appended)": lambda sd, n: _levels_then_zero(sd, ng.loglinear(table, n - 1)),
    }
    for c in [1.20] if quick else sorted(ng.GITS_TABLES):
        out[f"GITS {c:.2f} (ComfyUI)"] = lambda sd, n, c=c: ds.schedules.make_grid(sd, n, "gits", coeff=c).tolist()
        if not quick:
            out[f"GITS {c:.2f} (0 appended)"] = lambda sd, n, c=c: _levels_then_zero(sd, ng.gits(n - 1, c))
    return out


def our_points(model, x_T, solver, opts, cps, grid_of, budgets, ref, put, fail, name, group) -> None:
    """One of our settings at every budget: the largest step count whose counted calls fit, searched
    upward from budget // calls per step (a step count whose grid cannot be made has no point)."""
    runs: dict[int, tuple[torch.Tensor, int]] = {}

    def run_one(steps: int) -> tuple[torch.Tensor, int]:
        if steps not in runs:
            res = ds.sample(model, solver, x_T=x_T, grid=grid_of(steps), **opts)
            runs[steps] = (res.samples, int(res.nfe))
        return runs[steps]

    ode_peers.peer_points(
        run_one,
        lambda steps: run_one(steps)[1],
        budgets,
        ref,
        put,
        fail,
        name,
        group,
        start=lambda b: max(1, b // cps),
    )


OPTIMISED = "diffsolve (optimised grid)"
#: the solvers whose grids are optimised per budget (one call per step)
OPTIMISED_SOLVERS: dict[str, tuple[str, dict[str, Any]]] = {
    "dpmpp-3m": ("dpmpp-3m", {}),
    "unipc": ("unipc", {}),
}


def optimised_points(sd, model, x_T, ref, budgets, put, fail, quick: bool, costs: dict) -> None:
    """Each solver of OPTIMISED_SOLVERS on a grid from :func:`diffsolve.optimize_grid` for each budget
    (steps = budget, from t_max towards sigma = 0, allowed to stop early, with the last step's
    ``final_order`` searched; teacher dpmpp-3m on 16 steps between candidates), fitted on 1024 noises
    (64 quick) drawn from seeds disjoint from the evaluation's x_T (another generator), then run on
    x_T. 256 noises overfit here: a few samples between two modes decide the grid. Budgets above 20
    calls refine the Karras grid instead of running the DP (its cost grows as steps^2 x candidates^2).
    "unipc, optimised grid + teleport" (budgets up to 10): the same with analytical teleportation
    from the data's Gaussian (mean and covariance of 200000 draws of the mixture), the hand-over
    time searched (not in the quick run). "unipc, optimised grid + tuned calls" (budgets up to 6):
    the grid and the model calls tuned together (``tune_calls=True``, :mod:`diffsolve.models.tuned`),
    fitted with trim 0 (not in the quick run)."""
    fit_n = 64 if quick else 1024
    solvers = {"unipc": OPTIMISED_SOLVERS["unipc"]} if quick else OPTIMISED_SOLVERS
    # (label, solver, options, teleport, largest budget, optimize_grid's extra arguments)
    settings: list[tuple[str, str, dict[str, Any], ds.models.Gaussian | None, int, dict[str, Any]]] = [
        (f"{name}, optimised grid", solver, opts, None, max(budgets), {}) for name, (solver, opts) in solvers.items()
    ]
    if not quick:
        data = model.net.oracle.sample(200_000, generator=torch.Generator().manual_seed(7))
        gauss = ds.models.Gaussian.from_samples(data)
        settings.append(("unipc, optimised grid + teleport", "unipc", {}, gauss, 10, {}))
        # the grid and the calls tuned together, fitted to this benchmark's error over every sample
        # (trim 0): at 3-6 calls that error is mostly samples that end in the wrong mode, which a
        # trimmed fit leaves out
        tuned = {"tune_calls": True, "trim": 0.0}
        settings.append(("unipc, optimised grid + tuned calls", "unipc", {}, None, 6, tuned))
    for label, solver, opts, teleport, largest, extra in settings:
        for b in budgets if not quick else [b for b in budgets if b <= 10]:
            if b > largest:
                continue
            t0 = time.time()
            try:
                art = ds.optimize_grid(
                    model,
                    solver,
                    b,
                    shape=(fit_n, x_T.shape[1]),
                    seed=10_000,
                    t_min=0.0,
                    candidates=20 if quick else 40,
                    teacher_sub=4 if quick else 16,
                    sweeps=4 if quick else 12,
                    init=None if b <= 20 else our_grid(sd, b, "karras"),
                    stop_early=True,
                    search_options={"final_order": [1, 2]},
                    teleport=teleport,
                    **extra,
                    **opts,
                )
            except (ValueError, RuntimeError) as e:
                fail(OPTIMISED, label, b, b, f"{type(e).__name__}: {e}")
                continue
            res = ds.sample(model, solver, x_T=x_T, grid=art, teleport=teleport if art.teleport else None, **opts)
            put(OPTIMISED, label, b, int(res.nfe), rms(res.samples, ref), steps=b)
            costs.setdefault(label, {})[str(b)] = {
                "seconds": time.time() - t0,
                "model_calls": sum(r["model_calls"] for r in art.search["tried"]),
                "fit_samples": fit_n,
                "tiers": art.search["tiers"],
                "heldout_error": art.heldout_error,
                "grid": art.grid,
                "end_sigma": art.sigmas[-1],
                "final_order": art.options.get("final_order"),
                "hands_over_at_sigma": art.sigmas[0] if art.teleport else None,
                "tuned_calls": art.calls,
                "grid_sigmas": art.sigmas,
            }
            print(f"{label}, {b} calls: {time.time() - t0:.0f}s", flush=True)


# --------------------------------------------------------------------------------------------- main
def run(out: Path, quick: bool = False) -> None:
    torch.set_num_threads(1)
    n = 32 if quick else 128
    budgets = NFES
    sd, model, x_T = problem(n)
    t0 = time.time()
    ref = reference(sd, model, x_T, 1000 if quick else 4000)
    check = reference(sd, model, x_T, 500 if quick else 2000)
    ref_agreement = rms(ref, check)
    print(f"reference agreement {ref_agreement:.1e} ({time.time() - t0:.0f}s)", flush=True)
    results: dict[str, dict] = {}

    def entry(group, name):
        return results.setdefault(name, {"group": group, "points": {}})

    def put(group, name, nfe, calls, err, steps=None):
        p = {"nfe": calls, "rms_error": err}
        if steps is not None:
            p["steps"] = steps
        entry(group, name)["points"][str(nfe)] = p

    def fail(group, name, nfe, steps, why):
        entry(group, name).setdefault("failed", {})[str(nfe)] = {"steps": steps, "error": why}

    for name, (solver, opts, cps) in OURS.items():
        for gname, (kind, t_min) in GRIDS.items():

            def grid_of(steps, kind=kind, t_min=t_min):
                return our_grid(sd, steps, kind, t_min)

            our_points(model, x_T, solver, opts, cps, grid_of, budgets, ref, put, fail, f"{name}, {gname}", "diffsolve")
    for name, (solver, opts, cps) in OURS.items():
        for gname, make in published_grids(quick).items():

            def table_grid(steps, make=make):
                return make(sd, steps)

            our_points(
                model, x_T, solver, opts, cps, table_grid, budgets, ref, put, fail, f"{name}, {gname}", PUBLISHED
            )
    print(f"ours done ({time.time() - t0:.0f}s)", flush=True)
    costs: dict[str, dict] = {}
    optimised_points(sd, model, x_T, ref, budgets, put, fail, quick, costs)
    for label, c in costs.items():
        results[label]["cost"] = c
    print(f"optimised grids done ({time.time() - t0:.0f}s)", flush=True)
    for tol in (1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 1e-4):
        # dopri5 to sigma/alpha = 6e-6, then x0_hat there (one more call; O(sigma^2) from x at sigma = 0)
        t_lo = float(sd.t_of_log_snr(torch.tensor(12.0, dtype=torch.float64)))
        res = ds.sample(model, "ode-dopri5", x_T=x_T, rtol=tol, atol=tol, grid=[sd.t_max, t_lo])
        x0 = model(res.samples, t_lo).x0
        put(
            "diffsolve (adaptive)",
            "ode-dopri5",
            f"rtol {tol:g}",
            float(res.nfe_per_sample.double().mean()) + 1,
            rms(x0, ref),
        )
    kd = ode_peers.run_peers(sd, model, x_T, ref, budgets, put, fail, quick=quick)
    wall = time.time() - t0
    print(f"done in {wall:.0f}s", flush=True)
    write(results, ref_agreement, quick, out, n, budgets=budgets, kdiffusion=kd, wall_s=wall)


def rewrite(out: Path) -> None:
    """Rebuild ode.md and ode.png from ode.json (no sampling)."""
    d = json.loads((out / "ode.json").read_text())
    write(
        d["results"],
        d["reference_agreement_rms"],
        d.get("quick", False),
        out,
        d.get("samples", 128),
        torch_version=d.get("torch"),
        budgets=tuple(d.get("budgets", NFES)),
        kdiffusion=d.get("kdiffusion", True),
        wall_s=d.get("wall_s"),
    )


def is_ours(group: str) -> bool:
    """Every diffsolve group but the adaptive one (fixed steps; a later optimised grid included)."""
    return group.startswith("diffsolve") and group != "diffsolve (adaptive)"


def best(results, groups, nfe):
    """(name, group, error, calls) of the most accurate setting of ``groups`` at this NFE budget
    (calls <= budget), or None where none has a point."""
    cands = [
        (p["rms_error"], n, r["group"], p["nfe"])
        for n, r in results.items()
        if r["group"] in groups
        for k, p in r["points"].items()
        if k == str(nfe) and p["nfe"] <= nfe and math.isfinite(p["rms_error"])
    ]
    if not cands:
        return None
    e, n, g, c = min(cands)
    return n, g, e, c


def headline_rows(results, budgets) -> list[dict[str, Any]]:
    """Per budget: the best of ours (every fixed-step diffsolve group), the best peer over the whole
    peer set, the best published grid, the best of each peer library; ``ratio`` = ours / best peer."""
    groups = {r["group"] for r in results.values()}
    ours = sorted(g for g in groups if is_ours(g))
    rows = []
    for nfe in budgets:
        row: dict[str, Any] = {"nfe": nfe}
        for key, gs in [("ours", ours), ("peer", list(PEERS)), ("published", [PUBLISHED])] + [(g, [g]) for g in PEERS]:
            b = best(results, gs, nfe)
            if b is None:
                continue
            row[key], row[f"{key}_group"], row[f"{key}_error"], row[f"{key}_calls"] = b
        row["ratio"] = row["ours_error"] / row["peer_error"]
        if "diffusers_error" in row:
            row["ratio_diffusers"] = row["ours_error"] / row["diffusers_error"]
        rows.append(row)
    return rows


def _cell(p, nfe) -> str:
    """An error, with the real call count in brackets where it is below the budget."""
    if p is None:
        return "-"
    return f"{p['rms_error']:.2e}" + ("" if p["nfe"] == nfe else f" ({p['nfe']:g})")


def _tuned_cell(calls, sigmas) -> str:
    """Each tuned call as 'grid sigma/alpha -> model sigma/alpha (data weight)'; '-' for none."""
    if not calls or not sigmas:
        return "-"
    out = [
        f"{s:.3g} -> {m:.3g} ({w:.2f})"
        for s, m, w in zip(sigmas, calls["sigmas"], calls["data_weights"])
        if (m, w) != (s, 1.0)
    ]
    return "; ".join(out) or "-"


def _best_cell(row, key) -> str:
    if key not in row:
        return "- | -"
    calls = "" if row[f"{key}_calls"] == row["nfe"] else f" ({row[f'{key}_calls']:g} calls)"
    return f"{row[f'{key}_group']}: {row[key]}{calls} | {row[f'{key}_error']:.2e}"


def write(
    results, ref_agreement, quick, out, n, torch_version=None, budgets=NFES, kdiffusion=True, wall_s=None
) -> None:
    torch_version = torch_version or torch.__version__
    stem = "ode"
    headline = headline_rows(results, budgets)
    write_text(
        out / f"{stem}.json",
        json.dumps(
            {
                "headline": headline,
                "results": results,
                "budgets": list(budgets),
                "reference_agreement_rms": ref_agreement,
                "torch": torch_version,
                "samples": n,
                "quick": quick,
                "kdiffusion": kdiffusion,
                "wall_s": wall_s,
            },
            indent=2,
        )
        + "\n",
    )
    count = {g: sum(r["group"] == g for r in results.values()) for g in sorted({r["group"] for r in results.values()})}
    failed = [(name, r) for name, r in results.items() if r.get("failed")]
    lines = [
        "# Fixed-step ODE solvers: accuracy against NFE",
        "",
        f"Written by `diffsolve bench{' --quick' if quick else ''}` (diffsolve/bench/ode.py, the peers in "
        f"diffsolve/bench/ode_peers.py). 16-D GaussianMixture oracle (exact denoiser) under Stable Diffusion's "
        f"scaled-linear schedule, float64, {n} samples, the same x_T for every method, from timestep 999 to "
        f"sigma = 0. RMS error against a {1000 if quick else 4000}-step dpmpp-3s reference (it agrees with "
        f"half as many steps to {ref_agreement:.1e}). torch {torch_version}."
        + (f" Wall time {wall_s:.0f} s." if wall_s else ""),
        "",
        "Equal-cost accounting: at a budget of B model calls each setting runs the largest number of steps "
        "whose counted calls are at most B; where that count is below B it is given in brackets. "
        "Settings: "
        + ", ".join(f"{g} {c}" for g, c in count.items())
        + ". Every setting ends at sigma = 0 except diffusers' `final sigma_min` settings and k-diffusion's "
        "dpm_fast, which stop at the last training noise level (sigma/alpha = 0.0292) as those libraries do."
        + (
            " Quick run: fewer samples and settings (trailing spacing, plain and Karras sigmas; three "
            "k-diffusion samplers on Karras sigmas; GITS at coefficient 1.20 only): a smoke test, not the result."
            if quick
            else ""
        )
        + (
            ""
            if kdiffusion
            else " k-diffusion was not importable in this run (set DIFFSOLVE_KDIFFUSION to an unpacked "
            "k-diffusion): its samplers are not in the tables."
        ),
        "",
        "## Best of each library at each NFE budget",
        "",
        (
            "diffsolve best: over every fixed-step diffsolve group; best peer: over every diffusers and k-diffusion "
            "setting below."
        ),
        "",
        (
            "| NFE | diffsolve best | error | best peer | error | ours / best peer | best published grid (ours) | error "
            "| best diffusers | error | best k-diffusion | error |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in headline:
        lines.append(
            f"| {r['nfe']} | {_best_cell(r, 'ours')} | {_best_cell(r, 'peer')} | {r['ratio']:.2f} | "
            f"{_best_cell(r, 'published')} | {_best_cell(r, 'diffusers')} | {_best_cell(r, 'k-diffusion')} |"
        )
    optimised = [(name, r) for name, r in results.items() if r.get("cost")]
    if optimised:
        lines += [
            "",
            "## Optimised grids: what they cost",
            "",
            (
                "`ds.optimize_grid` per budget (steps = budget), fitted to its own teacher on noise disjoint "
                "from the evaluation's; seconds on this run's 1 thread, model calls of the fit (teacher "
                "excluded; batched over the fitting samples), the tiers run, the held-out error of the fit, the "
                "noise level sigma/alpha the grid stops at (0: it runs to the end), the final_order chosen and, "
                "with a teleport, the noise level sigma/alpha it hands over at (the run starts at 14.6); with "
                "tuned calls, for each call the noise level sigma/alpha the grid steps from -> the one the "
                "model is asked at, and the data weight (diffsolve/models/tuned.py). The held-out error is "
                "the fit's own: RMS less the 2% of samples with the largest errors, over every sample (trim 0) "
                "for the tuned calls; a - there: the tier found no tuning better on the held-out noise (the grid "
                "alone, fitted with trim 0)."
            ),
            "",
            (
                "| setting | budget | error here | seconds | fit calls | tiers | held-out error of the fit | stops at | "
                "final_order | hands over at | tuned calls |"
            ),
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name, r in optimised:
            for b, c in r["cost"].items():
                err = r["points"].get(b, {}).get("rms_error", float("nan"))
                lines.append(
                    f"| {name} | {b} | {err:.2e} | {c['seconds']:.1f} | {c['model_calls']} | "
                    f"{' + '.join(c['tiers'])} | {c['heldout_error']:.2e} | {abs(c.get('end_sigma', 0.0)):.3g} | "
                    f"{c.get('final_order', '')} | "
                    f"{'-' if c.get('hands_over_at_sigma') is None else format(c['hands_over_at_sigma'], '.3g')} | "
                    f"{_tuned_cell(c.get('tuned_calls'), c.get('grid_sigmas'))} |"
                )
    lines += [
        "",
        "## Every setting",
        "",
        (
            "Error at each budget; in brackets the calls really made where fewer than the budget; - where the "
            "setting cannot fit the budget (or failed: see below)."
        ),
        "",
        "| setting | library | " + " | ".join(f"NFE {b}" for b in budgets) + " |",
        "|---|---|" + "---|" * len(budgets),
    ]
    for name, r in results.items():
        if r["group"] == "diffsolve (adaptive)":
            continue
        cells = " | ".join(_cell(r["points"].get(str(b)), b) for b in budgets)
        lines.append(f"| {name} | {r['group']} | {cells} |")
    dop = results.get("ode-dopri5")
    if dop:
        lines += [
            "",
            "ode-dopri5 (adaptive; NFE per sample, error): "
            + ", ".join(f"{k}: ({p['nfe']:.0f}, {p['rms_error']:.1e})" for k, p in dop["points"].items()),
        ]
    lines += ["", "## Failed settings", ""]
    if not failed:
        lines.append("None: every setting ran and returned finite values wherever it fits a budget.")
    else:
        lines += [
            (
                f"{len(failed)} settings raised or returned non-finite values at some budget (budgets, with the steps "
                "run, and what happened); they have no point there:"
            ),
            "",
        ]
        for name, r in failed:
            by_error: dict[str, list[str]] = {}
            for b, f in r["failed"].items():
                by_error.setdefault(f["error"] or "(no message)", []).append(f"{b} ({f['steps']} steps)")
            lines.append(
                f"- {name} ({r['group']}): " + "; ".join(f"NFE {', '.join(bs)}: {e}" for e, bs in by_error.items())
            )
    write_text(out / f"{stem}.md", "\n".join(lines) + "\n")
    plot(results, headline, out / f"{stem}.png")


def plot(results, headline, path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, (ax, ax_all) = plt.subplots(1, 2, figsize=(13, 5))
    curves = [
        ("ours", "diffsolve (best of every group)", "C0", "-"),
        ("published", "diffsolve on published grids", "C1", "-."),
        ("peer", "best peer (whole set)", "k", "--"),
        ("diffusers", "diffusers", "C3", ":"),
        ("k-diffusion", "k-diffusion", "C2", ":"),
    ]
    for key, label, color, style in curves:
        pts = [(r[f"{key}_calls"], r[f"{key}_error"]) for r in headline if key in r]
        if pts:
            ax.loglog(*zip(*pts), style, color=color, marker="o", label=label)
    ax.set_xlabel("model calls")
    ax.set_ylabel("RMS error at sigma = 0")
    ax.set_title("Best fixed-step ODE setting at each NFE budget")
    ax.legend()
    ax.grid(alpha=0.3, which="both")
    colors = {"diffsolve": "C0", PUBLISHED: "C1", "diffusers": "C3", "k-diffusion": "C2"}
    for r in results.values():
        color = colors.get(r["group"], "C4" if is_ours(r["group"]) else "")  # C4: a later diffsolve group
        if not color or not r["points"]:
            continue
        pts = sorted({(p["nfe"], p["rms_error"]) for p in r["points"].values()})
        ax_all.loglog(*zip(*pts), color=color, alpha=0.25, lw=0.8)
    ax_all.set_xlabel("model calls")
    ax_all.set_title(
        "Every setting (blue: diffsolve, orange: published grids, red: diffusers, green: k-diffusion)", fontsize=9
    )
    ax_all.grid(alpha=0.3, which="both")
    fig.suptitle("16-D mixture oracle under the Stable Diffusion schedule, float64")
    fig.tight_layout()
    save_figure(fig, path)
