"""Gradients through any deterministic ODE solver by the continuous adjoint (AdjointDPM).

Pan et al. 2023, "Adjoint Sensitivity Method for Gradient Backpropagation of Diffusion Probabilistic
Models" (AdjointDPM): the forward run is any deterministic solver, fixed-grid or adaptive, run without
a graph; the backward pass solves the augmented adjoint system of the probability-flow ODE from the
sample back to x_T. For an ODE dz/ds = f(z, s, theta) run from s_0 to s_1 and a loss L(z(s_1)),
a(s) = dL/dz(s) and g(s) collect

    d/ds [z, a, g] = [f, -a^T df/dz, -a^T df/dtheta],     a(s_1) = dL/dz(s_1),  g(s_1) = 0,

integrated from s_1 back to s_0: a(s_0) = dL/dx_T and g(s_0) = dL/dtheta (theta: the network's
parameters and the conditioning tensors). z is rebuilt backwards with the adjoint, so memory holds
one model call's graph whatever the number of steps.

The exponential-integrator form (AdjointDPM's reparameterisation): with y = x - mu and lambda the
half log-SNR, the linear part of the ODE is integrated exactly by a change of variables, leaving

    near the data (alpha >= sigma):   z = y / alpha,  s = rho = sigma / alpha,  dz/ds = eps_hat
    near the noise (alpha < sigma):   z = y / sigma,  s = r = alpha / sigma,    dz/ds = y0_hat

(DDIM's two forms: the noise and the data prediction, each bounded, so both ends, sigma = 0 and
alpha = 0, are regular). The adjoint follows the same change (dL/dz = alpha a or sigma a). Each
interval of the backward grid is one classical Runge-Kutta 4 step of the augmented system in s (a
grid interval that crosses alpha = sigma is split there): 4 model calls with a vector-Jacobian
product each. The gradient is that of the exact flow, evaluated along the rebuilt path: it differs
from autograd through the unrolled sampler by the forward solver's error and the backward's
O(h^4) (measured in benchmarks/adjoint.md).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from ..models.model import DiffusionModel, check_finite
from ..schedules.base import Schedule

Tensor = torch.Tensor

#: the classical Runge-Kutta 4 weights (stages at 0, 1/2, 1/2, 1)
RK4_WEIGHTS = (1 / 6, 1 / 3, 1 / 3, 1 / 6)


def _coefs(schedule: Schedule, t: float) -> tuple[float, float]:
    tt = torch.tensor(t, dtype=torch.float64)
    return float(schedule.alpha(tt)), float(schedule.sigma(tt))


def _half_log_snr(a: float, s: float) -> float:
    return math.inf if s == 0 else (-math.inf if a == 0 else math.log(a) - math.log(s))


def exp_pieces(schedule: Schedule, t_a: float, t_b: float) -> list[tuple[str, float, float, float, float]]:
    """The step t_a -> t_b (either direction) in exponential-integrator variables: pieces
    ``(form, t_from, t_to, s_from, s_to)``, form ``"eps"`` (z = y / alpha against s = sigma / alpha)
    where the step lies where alpha >= sigma (by its mean half log-SNR) or touches sigma = 0, ``"x0"``
    (z = y / sigma against s = alpha / sigma) otherwise. One piece, unless the step runs from
    alpha = 0 to sigma = 0: then two, split at alpha = sigma. The same step walked either way gets the
    same pieces (reversed), so a solver stepping with them and the adjoint share their variables."""
    (aa, sa), (ab, sb) = _coefs(schedule, t_a), _coefs(schedule, t_b)
    la, lb = _half_log_snr(aa, sa), _half_log_snr(ab, sb)
    if math.isinf(la) and math.isinf(lb) and la != lb:
        t0 = float(schedule.t_of_log_snr(torch.tensor(0.0, dtype=torch.float64)))
        return exp_pieces(schedule, t_a, t0) + exp_pieces(schedule, t0, t_b)
    if math.isinf(la) or math.isinf(lb):
        eps = la == math.inf or lb == math.inf
    else:
        eps = la + lb >= 0
    if eps:
        return [("eps", t_a, t_b, sa / aa, sb / ab)]
    return [("x0", t_a, t_b, aa / sa, ab / sb)]


def scale_of(schedule: Schedule, form: str, t: float) -> float:
    """What y = x - mu is divided by in ``form``'s variables at t: alpha (eps) or sigma (x0)."""
    a, s = _coefs(schedule, t)
    return a if form == "eps" else s


def stage_time(schedule: Schedule, form: str, s: float) -> float:
    """The time at which ``form``'s variable is s (s = sigma / alpha, or alpha / sigma)."""
    lam = -math.log(s) if form == "eps" else math.log(s)
    return float(schedule.t_of_log_snr(torch.tensor(lam, dtype=torch.float64)))


def rk4_stage_times(schedule: Schedule, piece) -> list[tuple[float, float]]:
    """(c h, t) of the four classical Runge-Kutta stages on ``piece`` (ends exactly at its times)."""
    form, t_a, t_b, s_a, s_b = piece
    h = s_b - s_a
    mid = stage_time(schedule, form, s_a + 0.5 * h)
    return [(0.0, t_a), (0.5 * h, mid), (0.5 * h, mid), (h, t_b)]


def adjoint_backward(
    model: DiffusionModel,
    grid: Tensor,
    x_end: Tensor,
    grad_end: Tensor,
    *,
    mu: Tensor | None,
    cond: Mapping[str, Tensor],
    fixed: Mapping[str, Any],
    wrt: Sequence[Tensor],
    dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor, list[Tensor]]:
    """Integrate the augmented adjoint system (module docstring) from ``x_end`` at grid[-1] back to
    grid[0]. ``cond`` holds the differentiable conditioning tensors (leaves of this pass), ``wrt`` the
    leaves whose gradients are collected (among ``cond``'s values and the network's parameters).
    Returns (x rebuilt at grid[0], dL/dx there, the gradients of ``wrt``)."""
    schedule = model.schedule
    y = x_end.detach() if mu is None else (x_end - mu).detach()
    a = grad_end.detach()
    acc = [torch.zeros_like(w) for w in wrt]

    def field(form: str, z: Tensor, az: Tensor, t: float):
        """(f, a^T df/dz, a^T df/dtheta) at (z, t) in ``form``'s variables."""
        with torch.enable_grad():
            zg = z.detach().requires_grad_(True)
            yy = scale_of(schedule, form, t) * zg
            x = yy if mu is None else yy + mu
            xq = x if dtype is None or dtype == x.dtype else x.to(dtype)
            pred = model(xq, t, mu=mu, **{**cond, **fixed})
            check_finite(pred.output, f"continuous adjoint (t={t:.6g})")
            f = pred.eps if form == "eps" else (pred.x0 if mu is None else pred.x0 - mu)
            f = f.to(z.dtype)
            grads = torch.autograd.grad(f, [zg, *wrt], az, allow_unused=True)
        return f.detach(), grads[0], grads[1:]

    ts = [float(t) for t in grid]
    for k in reversed(range(len(ts) - 1)):
        for piece in exp_pieces(schedule, ts[k + 1], ts[k]):
            form, t_a, t_b, s_a, s_b = piece
            scale_a = scale_of(schedule, form, t_a)
            z, az = y / scale_a, a * scale_a  # z = y / scale, dL/dz = scale dL/dy
            h = s_b - s_a
            dz, da = torch.zeros_like(z), torch.zeros_like(az)
            dg = [torch.zeros_like(w) for w in wrt]
            kz, ka = z, az
            for (ch, t), w in zip(rk4_stage_times(schedule, piece), RK4_WEIGHTS):
                f, fz, fth = field(form, z + ch * kz if ch else z, az + ch * ka if ch else az, t)
                kz, ka = f, -fz
                dz += w * kz
                da += w * ka
                for d, g in zip(dg, fth):
                    if g is not None:
                        d -= w * g
            z, az = z + h * dz, az + h * da
            for s_acc, d in zip(acc, dg):
                s_acc += h * d
            scale_b = scale_of(schedule, form, t_b)
            y, a = z * scale_b, az / scale_b
    x0 = y if mu is None else y + mu
    return x0, a, acc


class _Adjoint(torch.autograd.Function):
    """x_T (and cond tensors, parameters) -> the forward solver's sample; backward: adjoint_backward."""

    @staticmethod
    def forward(ctx, args, x, *inputs):
        forward, keys, box = args[1], args[2], args[6]
        cond_in = inputs[: len(keys)]
        with torch.no_grad():
            x_end, grid = forward(x, dict(zip(keys, cond_in)))
        box["grid"] = grid
        ctx.args = args
        ctx.save_for_backward(x_end, *inputs)
        return x_end.clone()

    @staticmethod
    def backward(ctx, grad_out):
        model, _, keys, fixed, mu, dtype, box = ctx.args
        saved = ctx.saved_tensors
        x_end, cond_in, params = saved[0], saved[1 : 1 + len(keys)], saved[1 + len(keys) :]
        cond_g = [c.detach().requires_grad_(c.requires_grad) for c in cond_in]
        wrt = [t for t in (*cond_g, *params) if t.requires_grad]
        _, a, acc = adjoint_backward(
            model,
            box["grid"],
            x_end,
            grad_out,
            mu=mu,
            cond=dict(zip(keys, cond_g)),
            fixed=fixed,
            wrt=wrt,
            dtype=dtype,
        )
        it = iter(acc)
        rest = [next(it) if t.requires_grad else None for t in (*cond_g, *params)]
        return (None, a, *rest)


def adjoint_sample(
    model: DiffusionModel,
    forward: Callable[[Tensor, dict[str, Any]], tuple[Tensor, Tensor]],
    x: Tensor,
    *,
    mu: Tensor | None = None,
    cond: Mapping[str, Any] | None = None,
    params: Sequence[Tensor] | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """The sample of ``forward(x, cond) -> (x_end, backward grid)`` (run without a graph) as a
    differentiable function of ``x``, the tensors in ``cond`` and ``params`` (default: the parameters
    of ``model.net`` that require grad), back-propagated by the continuous adjoint on the grid
    ``forward`` returns (module docstring). ``mu`` gets no gradient (use the reversible adjoint)."""
    if mu is not None and mu.requires_grad:
        raise ValueError("the continuous adjoint gives no gradient to mu; use a reversible solver with grad=True")
    cond = dict(cond or {})
    if params is None:
        params = (
            [p for p in model.net.parameters() if p.requires_grad] if isinstance(model.net, torch.nn.Module) else []
        )
    keys = [k for k in sorted(cond) if isinstance(cond[k], Tensor) and cond[k].is_floating_point()]
    fixed = {k: v for k, v in cond.items() if k not in keys}
    args: tuple = (model, forward, keys, fixed, mu, dtype, {})
    return _Adjoint.apply(args, x, *[cond[k] for k in keys], *params)
