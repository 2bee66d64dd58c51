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

The optimiser is L-BFGS with a strong-Wolfe line search by default (``"lbfgs"``, torch's algorithm
and options, as D-Flow's reimplementations run it; on the digit inverse problems it restores better
than Adam at fewer calls, benchmarks/restore.md), run per sample (:mod:`.lbfgs`): each sample's
curvature history, line search and stopping tests are its own, while the evaluations of all samples
run as one batch. Adam (``"adam"``) and any ``torch.optim`` optimiser given as a callable run over
the whole batch; the loss is summed over it, so an elementwise one (Adam, SGD, RMSprop, ...) keeps
each sample's problem its own too, while torch's own LBFGS given that way would couple them. With
``"lbfgs"`` or an elementwise optimiser the same seed gives the same result whatever the batch size.
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
from .lbfgs import LBFGS, minimise_per_sample

Tensor = torch.Tensor

#: how the gradient through the sampler is taken (:func:`dflow`'s ``adjoint``)
ADJOINTS = ("reversible", "continuous", "autograd")
#: :func:`dflow`'s named optimisers: name -> (default lr, default iterations). On the digit inverse
#: problems (benchmarks/restore.md) L-BFGS (torch's lr) restored best at 2 steps (up to 2 x 25
#: evaluations) of 1 / 2 / 3, where 3 overfits the deblurring noise unless regularised; Adam (lr 0.1)
#: at 60 steps of 30 / 60
OPTIMIZERS: dict[str, tuple[float, int]] = {"lbfgs": (1.0, 2), "adam": (0.1, 60)}


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
    iterations: int | None = None,
    optimizer: str | Callable[[list[Tensor]], torch.optim.Optimizer] = "lbfgs",
    lr: float | None = None,
    noise_reg: float = 0.0,
    adjoint: str | None = None,
    cond: dict[str, Any] | None = None,
    uncond: dict[str, Any] | None = None,
    **solver_options: Any,
) -> DFlowResult:
    """D-Flow (module docstring): ``iterations`` optimiser steps on each sample's x_T of
    ``L_b + noise_reg * R(x_T_b)``, where ``loss(samples)`` returns one value per sample ([B]), each
    depending on its own sample only.

    ``optimizer``: ``"lbfgs"`` (per sample, torch.optim.LBFGS's algorithm with ``max_iter`` 20 and a
    strong-Wolfe line search: each step evaluates the loss up to 25 times; ``lr`` 1 and 2
    ``iterations`` by default), ``"adam"`` (``lr`` 0.1 and 60 ``iterations`` by default), or a
    callable ``[x_T] -> torch.optim.Optimizer`` over the whole batch (e.g.
    ``functools.partial(torch.optim.SGD, lr=0.1)``; it sets its own learning rate, and
    ``iterations`` must be given). Every evaluation's calls count in ``nfe``, and ``losses`` records
    the first evaluation of each step.

    ``model``, ``solver`` (deterministic; a reversible one keeps memory flat), ``steps``, ``cond``,
    ``uncond`` and ``solver_options`` as in :func:`diffsolve.sample`. The start is ``x_T``, or noise of
    ``shape`` drawn with ``seed`` (per-sample seeds, as ``ds.sample`` draws them). ``adjoint``:
    ``"reversible"``, ``"continuous"`` or ``"autograd"`` (module docstring; default: reversible for a
    reversible solver, else autograd)."""
    if not callable(loss):
        raise TypeError(f"loss must be a callable samples -> per-sample losses [B], got {type(loss).__name__}")
    if lr is not None and not (isinstance(lr, (int, float)) and not isinstance(lr, bool) and lr > 0):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    if isinstance(optimizer, str):
        if optimizer not in OPTIMIZERS:
            raise ValueError(
                f"optimizer must be one of {', '.join(OPTIMIZERS)} or a callable [x_T] -> torch.optim.Optimizer, "
                f"got {optimizer!r}"
            )
        rate = OPTIMIZERS[optimizer][0] if lr is None else float(lr)
        iterations = OPTIMIZERS[optimizer][1] if iterations is None else iterations
    elif callable(optimizer):
        if lr is not None:
            raise ValueError("lr is for a named optimizer ('lbfgs', 'adam'); a callable optimizer sets its own")
        if iterations is None:
            raise ValueError("give iterations with a callable optimizer")
    else:
        raise TypeError(f"optimizer must be a name or a callable [x_T] -> torch.optim.Optimizer, got {optimizer!r}")
    for name, value in (("iterations", iterations), ("steps", steps)):
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "iterations" else 1):
            raise ValueError(
                f"{name} must be a {'non-negative' if name == 'iterations' else 'positive'} int, got {value!r}"
            )
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
    kw = dict(cond=cond, uncond=uncond, **solver_options)
    calls, start = model.nfe, time.perf_counter()

    def run(x: Tensor, with_grad: bool):
        res = sample(model, solver, steps, x_T=x, progress=False, **{**kw, "grad": grad if with_grad else False})
        per = loss(res.samples)
        if not isinstance(per, Tensor) or per.shape != (x.shape[0],):
            got = getattr(per, "shape", per)
            raise ValueError(f"loss must return one value per sample (shape [{x.shape[0]}]), got {got}")
        return res, per

    def evaluate(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        z = x.requires_grad_(True)
        _, per = run(z, True)
        objective = per + noise_reg * chi_penalty(z) if noise_reg else per
        (dz,) = torch.autograd.grad(objective.sum(), z)
        return objective.detach(), dz, per.detach()

    if optimizer == "lbfgs":
        z, losses, _ = minimise_per_sample(LBFGS(lr=rate), x_T.detach(), evaluate, iterations)
    else:
        make = optimizer if callable(optimizer) else (lambda params: torch.optim.Adam(params, lr=rate))
        z, losses = _torch_steps(make, x_T.detach(), evaluate, iterations)
    with torch.no_grad():
        res, per = run(z, False)
    losses.append(per.detach())
    return DFlowResult(
        samples=res.samples.detach(),
        x_T=z,
        losses=losses,
        nfe=model.nfe - calls,
        wall_time=time.perf_counter() - start,
        solver=res.solver,
        grid=res.grid,
        adjoint=adjoint,
    )


def _torch_steps(
    make: Callable[[list[Tensor]], torch.optim.Optimizer],
    x0: Tensor,
    evaluate: Callable[[Tensor], tuple[Tensor, Tensor, Tensor]],
    steps: int,
) -> tuple[Tensor, list[Tensor]]:
    """``steps`` calls of ``opt.step(closure)`` of the optimiser ``make([z])`` over the whole batch z
    (from ``x0``), the closure evaluating the summed objective; the final z and the record of the
    first evaluation of each step."""
    z = x0.clone().requires_grad_(True)
    opt = make([z])
    if not isinstance(opt, torch.optim.Optimizer):
        raise TypeError(f"optimizer must return a torch.optim.Optimizer, got {type(opt).__name__}")
    records: list[Tensor] = []
    losses: list[Tensor] = []

    def closure() -> float:
        objective, grad, record = evaluate(z.detach().clone())
        z.grad = grad
        records.append(record)
        return float(objective.sum())

    for _ in range(steps):
        opt.step(closure)
        if not records:
            raise RuntimeError(f"{type(opt).__name__}.step(closure) did not call its closure")
        losses.append(records[0])
        records.clear()
    return z.detach(), losses
