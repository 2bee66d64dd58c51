"""Parity of diffsolve's k-diffusion-named entries with k-diffusion itself.

k-diffusion is not a dependency: install it beside the project, without its dependencies, and point
this script at it (its ``sampling`` module needs only torch, scipy, torchdiffeq, torchsde and tqdm,
which the project's environment has; the package's other modules are not imported):

    pip install --no-deps --target /tmp/kdiff k-diffusion
    python scripts/parity_kdiffusion.py --kdiffusion /tmp/kdiff [--out benchmarks/parity_kdiffusion.md]

Both sides sample the same oracle (a Gaussian mixture whose denoiser is exact) on the same sigmas
(EDM schedule: t = sigma, alpha = 1, which are k-diffusion's variables), from the same x_T, and the
stochastic samplers draw the same noise: k-diffusion's ``noise_sampler(sigma, sigma_next)`` and our
noise source's ``step(t, t_next)`` read one shared sequence of draws in call order. The table gives
max |ours - theirs| / max |theirs| and both sides' model calls.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import sys
import types
from pathlib import Path

import torch

import diffsolve as ds
from diffsolve.core.protocol import as_outcome, drive

SHAPE = (16, 3)
MIX = ds.models.GaussianMixture([[1.0, -0.5, 0.2], [-1.0, 0.5, 0.0]], 0.4)


def load_sampling(root: Path) -> types.ModuleType:
    """k_diffusion.sampling without the package's __init__ (which imports training code)."""
    pkg = types.ModuleType("k_diffusion")
    pkg.__path__ = [str(root / "k_diffusion")]
    sys.modules["k_diffusion"] = pkg
    utils = types.ModuleType("k_diffusion.utils")  # sampling uses only append_dims from utils

    def append_dims(x, target_dims):
        return x[(...,) + (None,) * (target_dims - x.ndim)]

    utils.append_dims = append_dims  # type: ignore[attr-defined]
    sys.modules["k_diffusion.utils"] = utils
    pkg.utils = utils  # type: ignore[attr-defined]
    spec = importlib.util.spec_from_file_location("k_diffusion.sampling", root / "k_diffusion" / "sampling.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["k_diffusion.sampling"] = mod
    spec.loader.exec_module(mod)
    return mod


class Draws:
    """One sequence of standard normal draws, read in call order by either side."""

    def __init__(self, seed: int):
        self.gen = torch.Generator().manual_seed(seed)

    def __call__(self, *_args) -> torch.Tensor:
        return torch.randn(SHAPE, generator=self.gen, dtype=torch.float64)

    def step(self, t, t_next, index=None) -> torch.Tensor:
        return self()


class TreeNoise(Draws):
    """Our noise interface over k-diffusion's ``BrownianTreeNoiseSampler``: the Brownian path the
    Brownian-tree samplers (``dpmpp-sde``, ``dpmpp-3m-sde``) read, W at noise level s."""

    kind = "brownian"

    def __init__(self, K, x_T: torch.Tensor, sigmas: torch.Tensor, seed: int):
        super().__init__(seed)
        positive = sigmas[sigmas > 0]
        self.lo = float(positive.min())
        self.sampler = K.BrownianTreeNoiseSampler(x_T, positive.min(), positive.max(), seed=seed)  # float64 times

    def time_changed(self, t0: float, t1: float, clock):
        tree, lo = self.sampler.tree, self.lo

        class Path:
            def __init__(self):
                self.t0, self.t1 = t0, t1

            def __call__(self, u):
                s = float(clock(torch.as_tensor(u, dtype=torch.float64)))
                return (
                    tree(torch.as_tensor(lo), torch.as_tensor(s)) if s > lo else torch.zeros(SHAPE, dtype=torch.float64)
                )

        return Path()


def theirs(K, name: str, sigmas: torch.Tensor, x_T: torch.Tensor, sched, kw: dict, seed: int):
    model, calls = MIX.model(sched), [0]

    def denoiser(x, sigma):
        calls[0] += 1
        return model(x, float(sigma.reshape(-1)[0])).x0

    fn = getattr(K, f"sample_{name}")
    extra = dict(kw)
    if "noise_sampler" in inspect.signature(fn).parameters:
        extra["noise_sampler"] = TreeNoise(K, x_T, sigmas, seed).sampler if name in TREE else Draws(seed)
    if name in ("dpm_fast", "dpm_adaptive"):
        lo, hi = float(sigmas[-2]), float(sigmas[0])
        args = (lo, hi) + ((len(sigmas) - 1,) if name == "dpm_fast" else ())
        # they make tensors of these floats (torch.tensor(sigma_max)): float64 ones, as ours
        default = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)
        try:
            out = fn(denoiser, x_T.clone(), *args, disable=True, **extra)
        finally:
            torch.set_default_dtype(default)
    else:
        out = fn(denoiser, x_T.clone(), sigmas, disable=True, **extra)
    if isinstance(out, tuple):
        out = out[0]
    return out, calls[0]


def ours(K, solver: str, sigmas: torch.Tensor, x_T: torch.Tensor, sched, opts: dict, seed: int):
    model, calls = MIX.model(sched), [0]

    def answer(query):
        calls[0] += 1
        return model(query.x, query.t)

    slv = ds.get_solver(solver, **opts)
    noise = TreeNoise(K, x_T, sigmas, seed) if solver in ("dpmpp-sde", "dpmpp-3m-sde") else Draws(seed)
    out = as_outcome(drive(slv.run(x_T.clone(), sigmas, noise, schedule=sched), answer), solver).x
    return out, calls[0]


#: k-diffusion's samplers that draw from a Brownian tree (both sides then read one torchsde tree)
TREE = ("dpmpp_sde", "dpmpp_3m_sde")

CASES = [
    # (k-diffusion sampler, its kwargs, diffsolve entry, its options)
    ("euler", {}, "euler", {}),
    ("heun", {}, "heun", {}),
    ("dpm_2", {}, "dpm-2", {}),
    ("lms", {}, "lms", {}),
    ("euler_ancestral", {}, "euler-ancestral", {}),
    ("dpm_2_ancestral", {}, "dpm-2-ancestral", {}),
    ("dpmpp_2m", {}, "dpmpp-2m", {}),
    ("dpmpp_2m_sde", {}, "dpmpp-2m-sde", {}),
    ("dpmpp_2m_sde", {"solver_type": "heun"}, "mrs-sde", {"solver_type": "taylor"}),
    ("dpmpp_3m_sde", {}, "dpmpp-3m-sde", {"published_d2": True}),
    ("dpmpp_2s_ancestral", {}, "dpmpp-2s-ancestral", {}),
    ("dpmpp_sde", {}, "dpmpp-sde", {}),
    ("dpm_fast", {}, "dpm-fast", {}),
    ("dpm_fast", {"eta": 0.5}, "dpm-fast", {"eta": 0.5}),
    ("dpm_adaptive", {}, "dpm-adaptive", {"mode": "batch"}),
    ("dpm_adaptive", {"order": 2, "rtol": 0.01}, "dpm-adaptive", {"mode": "batch", "order": 2, "rtol": 0.01}),
]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kdiffusion", type=Path, required=True, help="folder holding the k_diffusion package")
    ap.add_argument("--steps", type=int, nargs="+", default=[10, 25])
    ap.add_argument("--out", type=Path, help="write the table (markdown) here too")
    args = ap.parse_args(argv)
    K = load_sampling(args.kdiffusion)
    sched = ds.schedules.EDM(sigma_min=0.002, sigma_max=80.0)
    rows = [
        "| k-diffusion | diffsolve | steps | sigmas | rel. difference | calls (k-diffusion / ours) |",
        "|---|---|---|---|---|---|",
    ]
    for n in args.steps:
        for label, (lo, hi) in {"karras 0.03-14.6": (0.0292, 14.6146), "karras 0.002-80": (0.002, 80.0)}.items():
            sigmas = K.get_sigmas_karras(n, lo, hi, device="cpu").to(torch.float64)
            x_T = hi * torch.randn(SHAPE, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
            for kname, kw, name, opts in CASES:
                try:
                    ds.get_solver(name, **opts)
                except (KeyError, ValueError, TypeError) as err:
                    rows.append(f"| {kname} {kw or ''} | {name} {opts or ''} | {n} | {label} | not run: {err} | |")
                    continue
                a, ca = theirs(K, kname, sigmas, x_T, sched, kw, seed=7)
                b, cb = ours(K, name, sigmas, x_T, sched, opts, seed=7)
                rel = float((a - b).abs().max() / a.abs().max())
                rows.append(f"| {kname} {kw or ''} | {name} {opts or ''} | {n} | {label} | {rel:.1e} | {ca} / {cb} |")
    table = "\n".join(rows)
    header = (
        "# Parity with k-diffusion\n\n`python scripts/parity_kdiffusion.py --kdiffusion /tmp/kdiff` (k-diffusion "
        "0.1.1.post1, installed with `pip install --no-deps --target /tmp/kdiff k-diffusion`): the same oracle "
        "(a 3-D Gaussian mixture, EDM schedule: t = sigma, k-diffusion's variables), sigmas, x_T and noise "
        "(sequential draws; for the Brownian-tree samplers both sides read one torchsde tree, whose increments "
        "are sensitive to round-off in the query times). Relative difference max|ours - theirs| / max|theirs|.\n\n"
    )
    print(table)
    if args.out:
        args.out.write_text(header + table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
