"""Inversion benchmark: round trip, latent accuracy, NFE and sampling accuracy of every inversion method.

    python scripts/bench_inversion.py

A 16-D, 3-component GaussianMixture (exact denoiser) under the Stable-Diffusion scaled-linear schedule,
64 points, float64, at 10, 20, 50 and 100 steps:
- round trip: RMS of sample(invert(x0)) - x0 (exact methods: round-off; DDIM inversion: O(h));
- latent error: RMS distance of the latent to the exact ODE latent (dopri5, rtol 1e-10);
- sampling error: RMS distance of each solver's samples from x_T to the exact ODE solution;
- NFE of the inversion.
Writes benchmarks/inversion.{json,md} and (with matplotlib) benchmarks/inversion.png.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

import diffsolve as ds

ROOT = Path(__file__).resolve().parents[1]
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


def main() -> None:
    torch.set_num_threads(2)
    sched = ds.schedules.VPDiscrete.from_diffusers_config(
        {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000})
    gmm = ds.models.GaussianMixture(0.8 * torch.randn(3, 16, generator=torch.Generator().manual_seed(0),
                                                      dtype=torch.float64), 0.15)
    model = gmm.model(sched)
    x0 = gmm.sample(64, torch.Generator().manual_seed(1))
    x_T = torch.randn(64, 16, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    exact_latent = ds.invert(model, "ode-dopri5", x0, rtol=1e-10, atol=1e-10).x
    exact_sample = ds.sample(model, "ode-dopri5", x_T=x_T, rtol=1e-10, atol=1e-10).samples
    rows = []
    for label, (solver, opts, inv) in METHODS.items():
        for n in STEPS:
            lat = ds.invert(model, solver, x0, n, **opts, **inv)
            back = ds.sample(model, solver, latent=lat, **opts).samples
            fwd = ds.sample(model, solver, n, x_T=x_T, **opts).samples
            rows.append({"method": label, "steps": n, "round_trip": rms(back, x0),
                         "latent_error": rms(lat.x, exact_latent), "sampling_error": rms(fwd, exact_sample),
                         "inversion_nfe": lat.nfe})
            print(json.dumps(rows[-1]), flush=True)
    out = ROOT / "benchmarks"
    out.mkdir(exist_ok=True)
    (out / "inversion.json").write_text(json.dumps({"rows": rows}, indent=2) + "\n")
    lines = ["# Inversion: round trip, latent and sampling error", "",
             "Written by `scripts/bench_inversion.py`: 16-D 3-component GaussianMixture, SD scaled-linear "
             "schedule, 64 points, float64; errors are RMS; the exact references are dopri5 at rtol 1e-10.", ""]
    for key, title in (("round_trip", "Round trip sample(invert(x0)) - x0"),
                       ("latent_error", "Latent error against the exact ODE latent"),
                       ("sampling_error", "Sampling error against the exact ODE solution"),
                       ("inversion_nfe", "NFE of the inversion")):
        lines += [f"## {title}", "", "| method | " + " | ".join(f"{n} steps" for n in STEPS) + " |",
                  "|---|" + "---|" * len(STEPS)]
        for label in METHODS:
            vals = [next(r[key] for r in rows if r["method"] == label and r["steps"] == n) for n in STEPS]
            lines.append(f"| {label} | " + " | ".join(str(v) if key == "inversion_nfe" else f"{v:.2e}" for v in vals) + " |")
        lines.append("")
    (out / "inversion.md").write_text("\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
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
    fig.savefig(out / "inversion.png", dpi=120)


if __name__ == "__main__":
    main()
