"""Solver overhead: time per model call spent outside the model, ours against diffusers' ``step()``.

    diffsolve bench --only overhead [--quick]   (or python scripts/bench_overhead.py [--quick])

1. A no-op network (it returns its input: no model time at all) under Stable Diffusion's discrete
   schedule, float32 on the CPU, at batch x shape 1x4x64x64 and 16x4x128x128. Ours: the whole
   ``ds.sample`` call (driver, model wrapper, conversions, finite checks, solver update) divided by
   its model calls. diffusers: the Stable Diffusion loop (``scale_model_input``, the network,
   ``step``) with the paired scheduler on the same tensors, divided by its calls. Each pair is timed
   side by side in one run, alternating, best of ``repeats``; the ratio is what we report.
2. The digits-vp UNet (the shipped model, batch 64, CPU): total sampling time against the time of its
   network calls alone, so overhead fraction = 1 - network time / total.
Writes overhead.{json,md}. ``quick``: 10 steps, best of 3 (full: 25 steps, best of 5).
"""

from __future__ import annotations

import inspect
import json
import time
from pathlib import Path
from typing import Any

import torch

import diffsolve as ds

from . import write_text

STEMS = ("overhead",)
SD = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000}


def pairs():
    from diffusers import (
        DDIMScheduler,
        DDPMScheduler,
        DPMSolverMultistepScheduler,
        EulerDiscreteScheduler,
        HeunDiscreteScheduler,
    )

    return {
        "ddim": ("ddim", {}, DDIMScheduler, {}),
        "ddpm": ("ddpm", {}, DDPMScheduler, {}),
        "euler": ("euler", {"space": "sigma"}, EulerDiscreteScheduler, {}),
        "heun": ("heun", {"space": "sigma"}, HeunDiscreteScheduler, {}),
        "dpmpp-2m": ("dpmpp-2m", {}, DPMSolverMultistepScheduler, {"solver_order": 2}),
        "dpmpp-3m": ("dpmpp-3m", {}, DPMSolverMultistepScheduler, {"solver_order": 3}),
        "dpmpp-2m-sde": (
            "dpmpp-2m-sde",
            {},
            DPMSolverMultistepScheduler,
            {"solver_order": 2, "algorithm_type": "sde-dpmsolver++"},
        ),
    }


def ours_per_call(model, solver, opts, x_T, steps):
    t0 = time.perf_counter()
    res = ds.sample(model, solver, steps, x_T=x_T, seed=0, progress=False, **opts)
    return (time.perf_counter() - t0) / res.nfe


def diffusers_per_call(net, cls, opts, x_T, steps):
    sched = cls.from_config({**SD, **opts})
    t0 = time.perf_counter()
    sched.set_timesteps(steps)
    x = x_T * sched.init_noise_sigma
    kw = (
        {"generator": torch.Generator().manual_seed(0)}
        if "generator" in inspect.signature(sched.step).parameters
        else {}
    )
    calls = 0
    for t in sched.timesteps:
        out = net(sched.scale_model_input(x, t), t)
        calls += 1
        x = sched.step(out, t, x, **kw).prev_sample
    return (time.perf_counter() - t0) / calls


def noop_rows(shapes, steps, repeats):
    sd = ds.schedules.VPDiscrete.from_diffusers_config(SD)
    net = lambda x, t: x
    model = ds.DiffusionModel(net, sd, "eps")
    rows = []
    for shape in shapes:
        x_T = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
        for name, (solver, opts, cls, dopts) in pairs().items():
            ours, theirs = [], []
            for _ in range(repeats):  # alternate, keep the best of each
                ours.append(ours_per_call(model, solver, opts, x_T, steps))
                theirs.append(diffusers_per_call(net, cls, dopts, x_T, steps))
            o, d = min(ours), min(theirs)
            rows.append(
                {
                    "shape": "x".join(map(str, shape)),
                    "solver": name,
                    "diffusers": cls.__name__,
                    "ours_us_per_call": o * 1e6,
                    "diffusers_us_per_call": d * 1e6,
                    "ratio": o / d,
                }
            )
            print(rows[-1], flush=True)
    return rows


def unet_rows(steps, repeats, batch):
    model = ds.pretrained.load("digits-vp")
    net = model.net
    u = ds.pretrained.card("digits-vp")["unet"]
    x_T = torch.randn(
        batch, u["in_channels"], u["sample_size"], u["sample_size"], generator=torch.Generator().manual_seed(0)
    )
    rows = []
    for solver in ("ddim", "heun", "dpmpp-2m", "dpmpp-3m", "mrs-ode"):
        best: dict[str, Any] | None = None
        for _ in range(repeats):
            spent = [0.0]

            def timed(x, t, _net=net, spent=spent, **kw):
                t0 = time.perf_counter()
                out = _net(x, t, **kw)
                spent[0] += time.perf_counter() - t0
                return out

            model.net = timed
            t0 = time.perf_counter()
            with torch.no_grad():
                res = ds.sample(model, solver, steps, x_T=x_T, seed=0, progress=False)
            total = time.perf_counter() - t0
            frac = 1.0 - spent[0] / total
            if best is None or frac < best["overhead_fraction"]:
                best = {
                    "solver": solver,
                    "nfe": res.nfe,
                    "total_s": total,
                    "network_s": spent[0],
                    "overhead_fraction": frac,
                }
        model.net = net
        rows.append(best)
        print(best, flush=True)
    return rows


def run(out: Path, quick: bool = False) -> None:
    torch.set_num_threads(2)
    steps, repeats = (10, 3) if quick else (25, 5)
    noop = noop_rows([(1, 4, 64, 64), (16, 4, 128, 128)], steps, repeats)
    unet = unet_rows(steps, 2 if quick else 3, 64)
    stem = "overhead"
    write_text(
        out / f"{stem}.json",
        json.dumps(
            {
                "noop": noop,
                "unet": unet,
                "steps": steps,
                "repeats": repeats,
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
            },
            indent=2,
        )
        + "\n",
    )
    lines = [
        "# Solver overhead",
        "",
        (
            f"Written by `diffsolve bench{' --quick' if quick else ''}` on the "
            f"CPU ({torch.get_num_threads()} threads, float32, {steps} steps, best of {repeats}, torch "
            f"{torch.__version__}). Per model call, with a no-op network: our whole `ds.sample` against diffusers' "
            "loop (`scale_model_input` + `step`) with the paired scheduler on the same tensors."
        ),
        "",
        "| shape | solver | diffusers scheduler | ours (us/call) | diffusers (us/call) | ours / diffusers |",
        "|---|---|---|---|---|---|",
    ]
    for r in noop:
        lines.append(
            f"| {r['shape']} | {r['solver']} | {r['diffusers']} | {r['ours_us_per_call']:.0f} | "
            f"{r['diffusers_us_per_call']:.0f} | {r['ratio']:.2f} |"
        )
    lines += [
        "",
        "With the digits-vp UNet (batch 64): the share of sampling time spent outside the network.",
        "",
        "| solver | NFE | total (s) | network (s) | overhead |",
        "|---|---|---|---|---|",
    ]
    for r in unet:
        lines.append(
            f"| {r['solver']} | {r['nfe']} | {r['total_s']:.3f} | {r['network_s']:.3f} | "
            f"{100 * r['overhead_fraction']:.1f}% |"
        )
    write_text(out / f"{stem}.md", "\n".join(lines) + "\n")
