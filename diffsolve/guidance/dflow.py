"""D-Flow: controlled generation by optimising the source noise through the sampler.

Ben-Hamu et al. 2024, "D-Flow: Differentiating through Flows for Controlled Generation": for a loss L
on generated samples, minimise over the starting noise

    L(Phi(x_T)) + lambda R(x_T),        R(z) = -log chi_d(|z|) = |z|^2 / 2 - (d - 1) log |z| + const,

where Phi is the sampler (a deterministic ODE solve from x_T) and R the negative log-density of the
norm of a d-dimensional standard normal (the paper's regulariser: it keeps |x_T| near sqrt(d - 1),
where Gaussian noise lives). Differentiating through Phi keeps the result a sample of the model. The
gradient (``adjoint``) goes through the reversible adjoint (``ds.sample(..., grad=True)``: exact,
memory flat in the step count; the default for a reversible solver), the continuous adjoint
(``grad="continuous"``, AdjointDPM: any deterministic solver, memory flat, the exact flow's gradient
to the solver's accuracy) or autograd over the unrolled run (exact; memory grows with the steps; the
default for other solvers).

The optimiser is Adam by default (any ``torch.optim`` optimiser can be given, L-BFGS included, the
paper's choice). The loss is summed over the batch, so with an elementwise optimiser (Adam, SGD,
RMSprop, ...) each sample's problem is independent of the others: the same seed gives the same
result whatever the batch size. L-BFGS's line search and curvature history couple the batch; run
one sample per call for it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..core.driver import sample
from ..core.noise import prior_sample
from ..core.protocol import ExactInverse
from ..core.registry import get_solver
from ..models.model import DiffusionModel

Tensor = torch.Tensor

#: how the gradient through the sampler is taken (:func:`dflow`'s ``adjoint``)
ADJOINTS = ("reversible", "continuous", "autograd")


@dataclass
class DFlowResult:
    """What :func:`dflow` returns: ``samples`` (the final x_T's samples), ``x_T``, ``losses`` (the
    per-sample loss L at each iteration, before its update, and after the last: ``iterations + 1``
    tensors of shape [B]), ``nfe`` (the network calls made, each on the whole batch: the forward
    runs and the adjoint's calls in the backward passes), ``wall_time`` (seconds), the ``solver``'s
    name, the ``grid`` of its runs and the ``adjoint`` used."""

    samples: Tensor
    x_T: Tensor
    losses: list[Tensor] = field(default_factory=list)
    nfe: int = 0
    wall_time: float = 0.0
    solver: str = ""
    grid: Tensor | None = None
    adjoint: str = ""


def chi_penalty(z: Tensor) -> Tensor:
    """R(z) per sample: |z|^2 / 2 - (d - 1) log |z| (the negative log-density of a standard normal's
    norm in d dimensions, up to a constant); smallest at |z| = sqrt(d - 1)."""
    flat = z.reshape(z.shape[0], -1)
    d = flat.shape[1]
    r2 = flat.pow(2).sum(1)
    return r2 / 2 - (d - 1) / 2 * torch.log(r2)


def dflow(
    model: DiffusionModel,
    solver: str,
    steps: int,
    loss: Callable[[Tensor], Tensor],
    *,
    x_T: Tensor | None = None,
    shape: tuple[int, ...] | None = None,
    seed: int | list[int] | None = None,
    iterations: int = 20,
    lr: float = 0.05,
    optimizer: Callable[[list[Tensor]], torch.optim.Optimizer] | None = None,
    noise_reg: float = 0.0,
    adjoint: str | None = None,
    cond: dict[str, Any] | None = None,
    uncond: dict[str, Any] | None = None,
    **solver_options: Any,
) -> DFlowResult:
    """D-Flow (module docstring): ``iterations`` optimiser steps on x_T of
    ``sum_b L_b + noise_reg * R(x_T_b)``, where ``loss(samples)`` returns one value per sample ([B]).

    ``optimizer``: a callable ``[x_T] -> torch.optim.Optimizer`` (e.g. ``lambda p:
    torch.optim.LBFGS(p, max_iter=5)``, or ``functools.partial(torch.optim.SGD, lr=0.1)``); default
    Adam with learning rate ``lr``. Each step is taken with a closure, so optimisers that evaluate
    the loss several times per step (L-BFGS) work; every evaluation's calls count in ``nfe``, and
    ``losses`` records the first evaluation of each step.

    ``model``, ``solver`` (deterministic; a reversible one keeps memory flat), ``steps``, ``cond``,
    ``uncond`` and ``solver_options`` as in :func:`diffsolve.sample`. The start is ``x_T``, or noise of
    ``shape`` drawn with ``seed`` (per-sample seeds, as ``ds.sample`` draws them). ``adjoint``:
    ``"reversible"``, ``"continuous"`` or ``"autograd"`` (module docstring; default: reversible for a
    reversible solver, else autograd)."""
    if not callable(loss):
        raise TypeError(f"loss must be a callable samples -> per-sample losses [B], got {type(loss).__name__}")
    for name, value in (("iterations", iterations), ("steps", steps)):
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "iterations" else 1):
            raise ValueError(
                f"{name} must be a {'non-negative' if name == 'iterations' else 'positive'} int, got {value!r}"
            )
    if not (isinstance(lr, (int, float)) and lr > 0):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    if optimizer is not None and not callable(optimizer):
        raise TypeError(f"optimizer must be a callable [x_T] -> torch.optim.Optimizer, got {type(optimizer).__name__}")
    if not (isinstance(noise_reg, (int, float)) and noise_reg >= 0):
        raise ValueError(f"noise_reg must be a non-negative number, got {noise_reg!r}")
    slv = get_solver(solver, **solver_options)
    if adjoint is None:
        adjoint = "reversible" if isinstance(slv, ExactInverse) else "autograd"
    if adjoint not in ADJOINTS:
        raise ValueError(f"adjoint must be one of {', '.join(ADJOINTS)}, got {adjoint!r}")
    grad = {"reversible": True, "continuous": "continuous", "autograd": False}[adjoint]
    if x_T is None:
        if shape is None:
            raise ValueError("give x_T (the starting noise) or shape (and seed) to draw it")
        dtype = model.dtype or torch.get_default_dtype()
        device = model.device or torch.get_default_device()
        x_T = prior_sample(model.schedule, shape, seed, device=device, dtype=dtype)
    z = x_T.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([z], lr=lr) if optimizer is None else optimizer([z])
    if not isinstance(opt, torch.optim.Optimizer):
        raise TypeError(f"optimizer must return a torch.optim.Optimizer, got {type(opt).__name__}")
    kw = dict(cond=cond, uncond=uncond, **solver_options)
    losses: list[Tensor] = []
    calls, start = model.nfe, time.perf_counter()

    def run(x: Tensor, with_grad: bool):
        res = sample(model, solver, steps, x_T=x, progress=False, **{**kw, "grad": grad if with_grad else False})
        per = loss(res.samples)
        if not isinstance(per, Tensor) or per.shape != (x.shape[0],):
            got = getattr(per, "shape", per)
            raise ValueError(f"loss must return one value per sample (shape [{x.shape[0]}]), got {got}")
        return res, per

    evaluations: list[Tensor] = []  # the per-sample losses of one step's evaluations

    def closure() -> float:
        opt.zero_grad()
        _, per = run(z, True)
        total = (per + noise_reg * chi_penalty(z) if noise_reg else per).sum()
        total.backward()
        evaluations.append(per.detach())
        return float(total.detach())

    for _ in range(iterations):
        opt.step(closure)
        losses.append(evaluations[0])
        evaluations.clear()
    with torch.no_grad():
        res, per = run(z.detach(), False)
    losses.append(per.detach())
    return DFlowResult(
        samples=res.samples.detach(),
        x_T=z.detach(),
        losses=losses,
        nfe=model.nfe - calls,
        wall_time=time.perf_counter() - start,
        solver=res.solver,
        grid=res.grid,
        adjoint=adjoint,
    )
