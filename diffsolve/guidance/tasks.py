"""Inverse problems on images and one function that solves them with any of the guidance methods.

    prob = inverse_problem("inpaint", clean)              # the top half known
    restored, result = restore(model, prob, "dps", steps=50, seed=0)

Used by ``diffsolve restore`` and its tests; the digits are the shipped example.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..core.driver import sample
from ..core.hooks import StepHook
from ..core.result import SampleResult
from ..models.model import DiffusionModel
from .dflow import dflow
from .hooks import EnKG, Inpaint
from .wrappers import DPS, Masked

Tensor = torch.Tensor

TASKS = ("inpaint", "deblur")
METHODS = ("dps", "enkg", "inpaint", "repaint", "dflow", "none")
#: per method: (default solver, default options); zeta 4 was the best of 0.5 / 1 / 2 / 4 on the digits
DEFAULTS: dict[str, tuple[str, dict[str, Any]]] = {
    "dps": ("ddim", {"zeta": 4.0}),
    "enkg": ("ddim", {"guidance_scale": 2.0, "particles": 16}),
    "inpaint": ("ddpm", {"resample": 1}),
    "repaint": ("ddpm", {"resample": 10}),
    # L-BFGS with the noise-norm regulariser at weight 1: +1.1 dB deblurring (paired over the 16
    # digits, standard error 0.5), neutral on inpainting, and it keeps a third L-BFGS step from
    # overfitting the measurement noise (benchmarks/restore.md)
    "dflow": ("rev-heun", {"iterations": None, "optimizer": "lbfgs", "lr": None, "noise_reg": 1.0, "adjoint": None}),
    "none": ("ddim", {}),
}
#: the other options a method takes (besides those of DEFAULTS)
MORE_OPTIONS: dict[str, tuple[str, ...]] = {"dps": ("norm",), "enkg": ("num_updates", "inner_steps", "window")}
#: steps per run when none are given: 50, and 5 for dflow (each of its evaluations runs the sampler
#: forwards and its adjoint backwards; on the digits 5 steps restored better than 10 at equal
#: iterations, with L-BFGS and with Adam, benchmarks/restore.md)
DEFAULT_STEPS: dict[str, int] = {"dflow": 5}


@dataclass
class InverseProblem:
    """y = A(x) (+ noise): ``operator`` A, the ``measurement`` y, an image of it for display, and
    for inpainting the ``mask`` (1 where known)."""

    task: str
    operator: Callable[[Tensor], Tensor]
    measurement: Tensor
    display: Tensor
    mask: Tensor | None = None


def inverse_problem(
    task: str, clean: Tensor, *, seed: int = 0, blur_sigma: float = 1.5, noise_std: float = 0.05
) -> InverseProblem:
    """``inpaint``: the top half of each image known exactly (the unknown half shown as 0);
    ``deblur``: Gaussian blur of std ``blur_sigma`` pixels plus N(0, ``noise_std``^2) noise."""
    if task == "inpaint":
        h = clean.shape[-2]
        mask = torch.zeros(clean.shape[1:], dtype=clean.dtype)
        mask[..., : h // 2, :] = 1.0
        y = clean * mask
        return InverseProblem(task, Masked(mask), y, y, mask)
    if task == "deblur":
        from ..data import gaussian_blur

        y = gaussian_blur(clean, blur_sigma)
        y = y + noise_std * torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=y.dtype)
        return InverseProblem(task, lambda x: gaussian_blur(x, blur_sigma), y, y)
    raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")


def restore(
    model: DiffusionModel,
    problem: InverseProblem,
    method: str,
    *,
    steps: int | None = None,
    solver: str | None = None,
    seed: int = 0,
    progress: bool | None = None,
    **options: Any,
) -> tuple[Tensor, SampleResult]:
    """Restore ``problem.measurement`` (one image per row) with ``method``:

    - ``dps``: the :class:`DPS` model wrapper (option ``zeta``, ``norm``);
    - ``enkg``: the :class:`EnKG` hook, ``particles`` per image (option ``guidance_scale``,
      ``num_updates``, ``inner_steps``, ``window``); the first particle of each ensemble is returned;
    - ``inpaint``: the :class:`Inpaint` hook (option ``resample``; inpainting only);
    - ``repaint``: the same with RePaint's resampling, ``resample`` = 10 by default (Lugmayr et al.
      2022's U = 10, with jump length 1); inpainting only;
    - ``dflow``: D-Flow (:func:`~diffsolve.guidance.dflow.dflow`) on the data term
      |A(x) - y|^2 of each image, options ``optimizer`` (lbfgs, the default, or adam),
      ``iterations`` (default 2 for lbfgs, 60 for adam), ``lr`` (default 1 for lbfgs, 0.1 for
      adam), ``noise_reg`` (default 1), ``adjoint``;
      ``steps`` (default 5) per run of the sampler;
    - ``none``: unguided samples with the same seeds (the baseline).

    ``steps`` defaults to 50 (5 for dflow). Returns (restored [K, ...], the SampleResult; for dflow
    its ``nfe`` counts every call of the optimisation, its ``stats`` hold the mean loss per iteration,
    ``dflow_loss``, and the norm of each optimised x_T, ``x_T_norm``).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    default_solver, defaults = DEFAULTS[method]
    allowed = set(defaults) | set(MORE_OPTIONS.get(method, ()))
    unknown = set(options) - allowed
    if unknown:
        raise ValueError(f"options {sorted(unknown)} are not options of method {method!r}; allowed: {sorted(allowed)}")
    opts = {**defaults, **options}
    name = solver or default_solver
    steps = DEFAULT_STEPS.get(method, 50) if steps is None else steps
    y = problem.measurement
    k = y.shape[0]

    def run(m: DiffusionModel, hooks: Sequence[StepHook] | None = None, per_image: int = 1) -> SampleResult:
        # one seed per row: seed, seed + 1, ... (``per_image`` rows per measured image)
        return sample(
            m,
            name,
            steps,
            shape=(k * per_image, *y.shape[1:]),
            seed=[seed + i for i in range(k * per_image)],
            dtype=y.dtype,
            progress=progress,
            hooks=hooks,
        )

    if method == "dps":
        res = run(DPS(model, problem.operator, y, **opts))
        return res.samples, res
    if method in ("inpaint", "repaint"):
        if problem.mask is None:
            raise ValueError(f"method {method!r} needs an inpainting problem, got task {problem.task!r}")
        res = run(model, hooks=[Inpaint(problem.mask, y, resample=opts["resample"])])
        return res.samples, res
    if method == "dflow":
        return _dflow(model, problem, name, steps, seed, opts)
    if method == "none":
        res = run(model)
        return res.samples, res
    j = int(opts.pop("particles"))
    hook = EnKG(problem.operator, y, ensemble_size=j, **opts)
    res = run(model, hooks=[hook], per_image=j)
    return res.samples[::j], res


def _dflow(model: DiffusionModel, problem: InverseProblem, solver: str, steps: int, seed: int, opts: dict):
    """restore's dflow: D-Flow on |A(x) - y|^2 per image, one seed per row; its SampleResult."""
    y = problem.measurement
    k = y.shape[0]

    def data_term(x: Tensor) -> Tensor:
        return (problem.operator(x) - y).pow(2).flatten(1).sum(1)

    seeds = [seed + i for i in range(k)]
    out = dflow(model, solver, steps, data_term, shape=tuple(y.shape), seed=seeds, **opts)
    res = SampleResult(
        samples=out.samples,
        nfe=out.nfe,
        nfe_per_sample=torch.full((k,), out.nfe, dtype=torch.long),
        grid=out.grid,
        wall_time=out.wall_time,
        solver=out.solver,
        options={**opts, "adjoint": out.adjoint},
        seeds=seeds,
        stats={
            "dflow_loss": [float(v.mean()) for v in out.losses],
            "x_T_norm": out.x_T.flatten(1).norm(dim=1).tolist(),
        },
    )
    return out.samples, res
