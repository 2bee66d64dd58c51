"""Accuracy against NFE of fixed-step ODE solvers: ours against diffusers' schedulers (and
k-diffusion's samplers when importable), on one oracle model and one initial noise.

    diffsolve bench --only ode [--quick]        (or python scripts/bench_ode.py [--quick])

Model: a 16-D GaussianMixture (8 components, exact denoiser) under Stable Diffusion's discrete
schedule (scaled-linear betas 0.00085 .. 0.012, 1000 steps), 128 samples, float64. Every method
starts from the same x_T at timestep 999 (sigma/alpha = 14.6) and ends at sigma = 0, so all
integrate one probability-flow ODE: dx/dsigma = (x - D(x, sigma)) / sigma in the variables
x/alpha, sigma/alpha, which does not depend on how a scheduler interpolates its time. Reference:
dpmpp-3s on 4000 log-SNR steps down to sigma/alpha = 3e-7, then to sigma = 0 (checked against
2000 steps). Error: RMS over samples and dimensions of x(sigma = 0) against the reference.

Ours: euler, heun, ddim, dpmpp-2m, dpmpp-3m, mrs-ode (order 3), dpmpp-3s, each on the log-SNR grid
and on the Karras grid (rho 7) down to timestep 0, and on the log-SNR grid down to timestep 9
(sigma/alpha = 0.1), all ending with a step to sigma = 0 (so the model is only queried at
timesteps 0 ... 999, as a trained network allows); ode-dopri5 by its tolerance.
diffusers: DDIM, Euler, Heun, DPMSolverMultistep 2M / 3M, UniPC (bh2), DEIS, each with
``timestep_spacing="trailing"`` (first step at timestep 999) and their default spacing, ending at
sigma = 0 (``set_alpha_to_one`` / ``final_sigmas_type="zero"``); Euler and DPM++ also with Karras
sigmas. NFE: 5, 8, 10, 15, 20, 50 (a solver with 2 or 3 calls per step gets the most steps that fit).
Writes ode.{json,md,png}. ``quick``: 32 samples, a 1000-step reference.
"""

from __future__ import annotations

import inspect
import json
import math
import time
import warnings
from pathlib import Path
from typing import Any

import torch

import diffsolve as ds
from diffsolve.core.protocol import per_row

from . import pyplot, save_figure, write_text

STEMS = ("ode",)
NFES = (5, 8, 10, 15, 20, 50)
SD = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000}
OURS: dict[str, tuple[str, dict[str, Any], int]] = {  # name -> (solver, options, calls per step)
    "euler": ("euler", {}, 1),
    "heun": ("heun", {}, 2),
    "ddim": ("ddim", {}, 1),
    "dpmpp-2m": ("dpmpp-2m", {}, 1),
    "dpmpp-3m": ("dpmpp-3m", {}, 1),
    "mrs-ode (order 3)": ("mrs-ode", {"order": 3}, 1),
    "dpmpp-3s": ("dpmpp-3s", {}, 3),
}


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


# ---------------------------------------------------------------------------------------- diffusers
def diffusers_methods():
    # from the defining modules: mypy reads diffusers' top-level names as its dummy placeholder classes
    from diffusers.schedulers.scheduling_ddim import DDIMScheduler
    from diffusers.schedulers.scheduling_deis_multistep import DEISMultistepScheduler
    from diffusers.schedulers.scheduling_dpmsolver_multistep import DPMSolverMultistepScheduler
    from diffusers.schedulers.scheduling_euler_discrete import EulerDiscreteScheduler
    from diffusers.schedulers.scheduling_heun_discrete import HeunDiscreteScheduler
    from diffusers.schedulers.scheduling_unipc_multistep import UniPCMultistepScheduler
    from diffusers.schedulers.scheduling_utils import SchedulerMixin

    m: dict[str, tuple[type[SchedulerMixin], dict[str, Any]]] = {
        "DDIM": (DDIMScheduler, {"set_alpha_to_one": True}),
        "Euler": (EulerDiscreteScheduler, {}),
        "Euler (Karras)": (EulerDiscreteScheduler, {"use_karras_sigmas": True}),
        "Heun": (HeunDiscreteScheduler, {}),
        "DPM++ 2M": (DPMSolverMultistepScheduler, {"solver_order": 2}),
        "DPM++ 2M (Karras)": (DPMSolverMultistepScheduler, {"solver_order": 2, "use_karras_sigmas": True}),
        "DPM++ 3M": (DPMSolverMultistepScheduler, {"solver_order": 3}),
        "UniPC": (UniPCMultistepScheduler, {}),
        "DEIS": (DEISMultistepScheduler, {}),
    }
    out = {}
    for name, (cls, kw) in m.items():
        for spacing in ("trailing", "default"):
            opts = dict(kw)
            if spacing == "trailing":
                opts["timestep_spacing"] = "trailing"
            if "final_sigmas_type" in inspect.signature(cls.__init__).parameters:
                opts["final_sigmas_type"] = "zero"
            out[f"{name}, {spacing}"] = (cls, opts)
    return out


def run_diffusers(cls, opts, sd, model, x_T, nfe: int):
    """The Stable Diffusion loop (scale_model_input, model, step) with the oracle as eps-network.
    Returns (x at the end, model calls), or None if the scheduler cannot spend ``nfe`` calls."""
    sched = cls.from_config({**SD, "prediction_type": "epsilon", "clip_sample": False, **opts})
    calls_per_step = 2 if cls.__name__.startswith("Heun") else 1
    steps = (nfe + 1) // 2 if calls_per_step == 2 else nfe
    sched.set_timesteps(steps)
    acp = sched.alphas_cumprod.double()
    x = x_T * float(sched.init_noise_sigma)
    k_style = hasattr(sched, "sigmas") and float(sched.init_noise_sigma) > 1.0
    calls = 0
    for ts in sched.timesteps:
        inp = sched.scale_model_input(x, ts)
        if k_style:  # input x/sqrt(sigma^2 + 1) is the VP state; the scheduler's own sigma
            s = float(sched.sigmas[sched.step_index])
        else:
            s = float(((1 - acp[int(ts)]) / acp[int(ts)]).sqrt())
        t = sd.t_of_log_snr(torch.tensor(-math.log(s), dtype=torch.float64))
        eps = model(inp.double(), t).eps
        calls += 1
        x = sched.step(eps, ts, x).prev_sample
    return x, calls


# ------------------------------------------------------------------------------------- k-diffusion
def kdiffusion_methods():
    try:
        import k_diffusion.sampling as K
    except Exception as exc:  # optional peer: skip cleanly
        print(f"k-diffusion not importable ({type(exc).__name__}); skipping its samplers", flush=True)
        return {}
    return {
        "k euler": (K.sample_euler, 1),
        "k heun": (K.sample_heun, 2),
        "k dpm_2": (K.sample_dpm_2, 2),
        "k lms": (K.sample_lms, 1),
        "k dpmpp_2m": (K.sample_dpmpp_2m, 1),
        "k dpmpp_2s_ancestral(eta 0)": (
            lambda m, x, s, disable=None: K.sample_dpmpp_2s_ancestral(m, x, s, eta=0.0, disable=disable),
            2,
        ),
    }


def run_kdiffusion(fn, calls_per_step, sd, model, x_T, nfe: int):
    import k_diffusion.sampling as K

    def denoiser(xk, sk):
        t = sd.t_of_log_snr(-torch.log(sk.double()))
        return model(xk * per_row(sd.alpha(t), xk), t).x0

    s_max = float(sd.sigma(sd.t_max) / sd.alpha(sd.t_max))
    s_min = float(sd.sigma(sd.t_min) / sd.alpha(sd.t_min))
    steps = max(1, (nfe + 1) // 2) if calls_per_step == 2 else nfe
    sigmas = K.get_sigmas_karras(steps, s_min, s_max, rho=7.0, device="cpu").double()
    return fn(denoiser, x_T * math.sqrt(1 + s_max**2), sigmas, disable=True)  # x/alpha at t_max


# --------------------------------------------------------------------------------------------- main
def run(out: Path, quick: bool = False) -> None:
    torch.set_num_threads(2)
    sd, model, x_T = problem(32 if quick else 128)
    t0 = time.time()
    ref = reference(sd, model, x_T, 1000 if quick else 4000)
    check = reference(sd, model, x_T, 500 if quick else 2000)
    ref_agreement = rms(ref, check)
    print(f"reference agreement {ref_agreement:.1e} ({time.time() - t0:.0f}s)", flush=True)
    results: dict[str, dict] = {}

    def put(group, name, nfe, calls, err):
        results.setdefault(name, {"group": group, "points": {}})["points"][str(nfe)] = {"nfe": calls, "rms_error": err}

    for name, (solver, opts, cps) in OURS.items():
        for gname, (kind, t_min) in GRIDS.items():
            for nfe in NFES:
                steps = nfe // cps
                res = ds.sample(model, solver, x_T=x_T, grid=our_grid(sd, steps, kind, t_min), **opts)
                put("diffsolve", f"{name}, {gname}", nfe, res.nfe, rms(res.samples, ref))
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
    for name, (cls, opts) in diffusers_methods().items():
        for nfe in NFES:
            with warnings.catch_warnings():  # numpy 2 deprecations inside diffusers' schedulers
                warnings.simplefilter("ignore", DeprecationWarning)
                x, calls = run_diffusers(cls, opts, sd, model, x_T, nfe)
            put("diffusers", name, nfe, calls, rms(x, ref))
    for name, (fn, cps) in kdiffusion_methods().items():
        for nfe in NFES:
            x_k = run_kdiffusion(fn, cps, sd, model, x_T, nfe)
            steps = max(1, (nfe + 1) // 2) if cps == 2 else nfe
            put("k-diffusion", name, nfe, cps * steps - (1 if cps == 2 else 0), rms(x_k, ref))
    print(f"done in {time.time() - t0:.0f}s", flush=True)
    write(results, ref_agreement, quick, out, 32 if quick else 128)


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
    )


def best(results, group, nfe):
    """(name, error) of the group's most accurate method at this NFE budget (calls <= budget)."""
    cands = [
        (p["rms_error"], n)
        for n, r in results.items()
        if r["group"] == group
        for k, p in r["points"].items()
        if k == str(nfe) and p["nfe"] <= nfe
    ]
    e, n = min(cands)
    return n, e


def write(results, ref_agreement, quick, out, n, torch_version=None):
    torch_version = torch_version or torch.__version__
    stem = "ode"
    headline = []
    for nfe in NFES:
        on, oe = best(results, "diffsolve", nfe)
        dn, de = best(results, "diffusers", nfe)
        row = {"nfe": nfe, "ours": on, "ours_error": oe, "diffusers": dn, "diffusers_error": de, "ratio": oe / de}
        if any(r["group"] == "k-diffusion" for r in results.values()):
            kn, ke = best(results, "k-diffusion", nfe)
            row.update({"k-diffusion": kn, "k-diffusion_error": ke})
        headline.append(row)
    write_text(
        out / f"{stem}.json",
        json.dumps(
            {
                "headline": headline,
                "results": results,
                "reference_agreement_rms": ref_agreement,
                "torch": torch_version,
                "samples": n,
                "quick": quick,
            },
            indent=2,
        )
        + "\n",
    )
    lines = [
        "# Fixed-step ODE solvers: accuracy against NFE",
        "",
        f"Written by `diffsolve bench{' --quick' if quick else ''}` (diffsolve/bench/ode.py). 16-D "
        f"GaussianMixture oracle (exact denoiser) under Stable Diffusion's scaled-linear schedule, float64, "
        f"{n} samples, the same x_T for every method, from timestep 999 to sigma = 0. RMS error against a "
        f"{1000 if quick else 4000}-step dpmpp-3s reference (it agrees with half as many steps to "
        f"{ref_agreement:.1e}). torch {torch_version}."
        + (
            ""
            if any(r["group"] == "k-diffusion" for r in results.values())
            else " k-diffusion was not importable in this run: its samplers are not in the tables."
        ),
        "",
        "## Best of each library at each NFE budget",
        "",
        "| NFE | diffsolve best | error | diffusers best | error | ours / diffusers |"
        + (" k-diffusion best | error |" if "k-diffusion" in headline[0] else ""),
        "|---|---|---|---|---|---|" + ("---|---|" if "k-diffusion" in headline[0] else ""),
    ]
    for r in headline:
        k = f" {r['k-diffusion']} | {r['k-diffusion_error']:.2e} |" if "k-diffusion" in r else ""
        lines.append(
            f"| {r['nfe']} | {r['ours']} | {r['ours_error']:.2e} | {r['diffusers']} | "
            f"{r['diffusers_error']:.2e} | {r['ratio']:.2f} |{k}"
        )
    lines += [
        "",
        "## Every method",
        "",
        "| method | library | " + " | ".join(f"NFE {n}" for n in NFES) + " |",
        "|---|---|" + "---|" * len(NFES),
    ]
    for name, r in results.items():
        if r["group"] == "diffsolve (adaptive)":
            continue
        cells = " | ".join(f"{r['points'][str(n)]['rms_error']:.2e}" if str(n) in r["points"] else "-" for n in NFES)
        lines.append(f"| {name} | {r['group']} | {cells} |")
    dop = results.get("ode-dopri5")
    if dop:
        lines += [
            "",
            "ode-dopri5 (adaptive; NFE per sample, error): "
            + ", ".join(f"{k}: ({p['nfe']:.0f}, {p['rms_error']:.1e})" for k, p in dop["points"].items()),
        ]
    write_text(out / f"{stem}.md", "\n".join(lines) + "\n")
    plt = pyplot()
    if plt is None:
        return
    fig, (ax, ax_all) = plt.subplots(1, 2, figsize=(13, 5))
    groups = [("diffsolve", "C0", "-"), ("diffusers", "C3", "--"), ("k-diffusion", "C2", ":")]
    for group, color, style in groups:  # headline: the best method of each library at each budget
        key = "ours" if group == "diffsolve" else group
        if key not in headline[0]:
            continue
        err_key = "ours_error" if key == "ours" else f"{key}_error"
        ax.loglog(
            [r["nfe"] for r in headline],
            [r[err_key] for r in headline],
            style,
            color=color,
            marker="o",
            label=f"{group} (best at each NFE)",
        )
    ax.set_xlabel("NFE")
    ax.set_ylabel("RMS error at sigma = 0")
    ax.set_title("Best fixed-step ODE solver of each library")
    ax.legend()
    ax.grid(alpha=0.3, which="both")
    for group, color, style in groups:
        for n in [n for n, r in results.items() if r["group"] == group]:
            pts = sorted((p["nfe"], p["rms_error"]) for p in results[n]["points"].values())
            ax_all.loglog(*zip(*pts), style, color=color, alpha=0.35, lw=1)
    ax_all.set_xlabel("NFE")
    ax_all.set_title("Every method (blue: diffsolve, red: diffusers, green: k-diffusion)")
    ax_all.grid(alpha=0.3, which="both")
    fig.suptitle("16-D mixture oracle under the Stable Diffusion schedule, float64")
    fig.tight_layout()
    save_figure(fig, out / f"{stem}.png")
