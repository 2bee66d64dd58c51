"""Inversion benchmark: round trip, latent accuracy, NFE and sampling accuracy of every inversion method.

    diffsolve bench --only inversion [--quick]  (or python scripts/bench_inversion.py [--quick])

A 16-D, 3-component GaussianMixture (exact denoiser) under the Stable-Diffusion scaled-linear schedule,
64 points, float64, at 10, 20, 50 and 100 steps:
- round trip: RMS of sample(invert(x0)) - x0 (exact methods: round-off; DDIM inversion: O(h));
- latent error: RMS distance of the latent to the exact ODE latent;
- sampling error: RMS distance of each solver's samples from x_T to the exact ODE solution;
- NFE of the inversion.
Writes inversion.{json,md} and (with matplotlib) inversion.png. The exact references are dpmpp-3s on
2000 log-SNR steps. ``quick``: 16 points, 10 and 20 steps, 400 reference steps.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

import diffsolve as ds

from . import pyplot, save_figure, write_text

STEMS = ("inversion",)
STEPS = (10, 20, 50, 100)
METHODS = {  # label -> (solver, options, invert options)
    "ddim inversion": ("ddim", {}, {}),
    "ddim + renoise": ("ddim", {}, {"renoise": True}),
    "heun (grid backwards)": ("heun", {}, {}),
    "dpmpp-2m (grid backwards)": ("dpmpp-2m", {}, {}),
    "rev-heun": ("rev-heun", {}, {}),
    "bdia (gamma 1)": ("bdia", {}, {}),
    "o-belm": ("o-belm", {}, {}),
    "edict (p 0.93)": ("edict", {}, {}),
    "rex euler": ("rex", {"base": "euler"}, {}),
    "rex midpoint": ("rex", {"base": "midpoint"}, {}),
}


def rms(a, b):
    return float((a - b).pow(2).mean().sqrt())


def run(out: Path, quick: bool = False) -> None:
    torch.set_num_threads(2)
    steps, n = ((10, 20), 16) if quick else (STEPS, 64)
    sched = ds.schedules.VPDiscrete.from_diffusers_config(
        {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000})
    gmm = ds.models.GaussianMixture(0.8 * torch.randn(3, 16, generator=torch.Generator().manual_seed(0),
                                                      dtype=torch.float64), 0.15)
    model = gmm.model(sched)
    x0 = gmm.sample(n, torch.Generator().manual_seed(1))
    x_T = torch.randn(n, 16, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    # the exact ODE maps: dpmpp-3s on a fine log-SNR grid (dopri5 integrates in t, across the discrete
    # schedule's kinks, and takes many minutes to get near 1e-8 there)
    ref_steps = 400 if quick else 2000
    exact_latent = ds.invert(model, "dpmpp-3s", x0, ref_steps, grid="log-snr").x
    exact_sample = ds.sample(model, "dpmpp-3s", ref_steps, x_T=x_T, grid="log-snr").samples
    check = ds.invert(model, "dpmpp-3s", x0, ref_steps // 2, grid="log-snr").x
    ref_agreement = rms(check, exact_latent)
    rows = []
    for label, (solver, opts, inv) in METHODS.items():
        for k in steps:
            lat = ds.invert(model, solver, x0, k, **opts, **inv)
            back = ds.sample(model, solver, latent=lat, **opts).samples
            fwd = ds.sample(model, solver, k, x_T=x_T, **opts).samples
            rows.append({"method": label, "steps": k, "round_trip": rms(back, x0),
                         "latent_error": rms(lat.x, exact_latent), "sampling_error": rms(fwd, exact_sample),
                         "inversion_nfe": lat.nfe})
            print(json.dumps(rows[-1]), flush=True)
    write_text(out / "inversion.json", json.dumps({"rows": rows, "quick": quick}, indent=2) + "\n")
    lines = ["# Inversion: round trip, latent and sampling error", "",
             f"Written by `diffsolve bench{' --quick' if quick else ''}` (diffsolve/bench/inversion.py): 16-D "
             f"3-component GaussianMixture, SD scaled-linear schedule, {n} points, float64; errors are RMS; the "
             f"exact references are dpmpp-3s on {ref_steps} log-SNR steps (the latent agrees with half as many steps "
             f"to {ref_agreement:.1e}).", ""]
    for key, title in (("round_trip", "Round trip sample(invert(x0)) - x0"),
                       ("latent_error", "Latent error against the exact ODE latent"),
                       ("sampling_error", "Sampling error against the exact ODE solution"),
                       ("inversion_nfe", "NFE of the inversion")):
        lines += [f"## {title}", "", "| method | " + " | ".join(f"{k} steps" for k in steps) + " |",
                  "|---|" + "---|" * len(steps)]
        for label in METHODS:
            vals = [next(r[key] for r in rows if r["method"] == label and r["steps"] == k) for k in steps]
            lines.append(f"| {label} | " + " | ".join(str(v) if key == "inversion_nfe" else f"{v:.2e}" for v in vals) + " |")
        lines.append("")
    write_text(out / "inversion.md", "\n".join(lines))
    plt = pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for ax, key in zip(axes, ("round_trip", "latent_error", "sampling_error")):
        for label in METHODS:
            pts = [(r["steps"], max(r[key], 1e-17)) for r in rows if r["method"] == label]
            ax.loglog([p[0] for p in pts], [p[1] for p in pts], "o-", label=label)
        ax.set_xlabel("steps")
        ax.set_title(key.replace("_", " "))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, out / "inversion.png")

