"""ComfyUI's one-call multistep samplers in k-diffusion's variables: RES multistep
(``sample_res_multistep``; Zhang, Song & Chen 2023) and gradient estimation
(``sample_gradient_estimation``; Permenter & Yuan 2024). Both step y = (x - mu)/alpha against
s = sigma/alpha as :mod:`diffsolve.solvers.ode.dpm2` (whose notation this module uses); the ancestral
RES sampler is in :mod:`diffsolve.solvers.sde.ancestral`.
"""

from __future__ import annotations

import math

import torch

from ...core.options import Option
from ...core.protocol import Query, Solver
from ...core.registry import register
from ..exponential.maths import model_output, phi_functions
from .dpm2 import ScaledVariables


def res_weights(h: float, h_prev: float) -> tuple[float, float]:
    """(b1, b2) of the RES multistep step of length h = log s - log s' after one of length h_prev:

        c2 = -h_prev / h,    b2 = phi_2(-h) / c2,    b1 = phi_1(-h) - b2

    with phi_1(z) = (e^z - 1)/z and phi_2(z) = (phi_1(z) - 1)/z (:func:`phi_functions`, so at small h
    the series, not the cancelling closed form)."""
    phi1, phi2 = (float(p) for p in phi_functions(torch.tensor(-h, dtype=torch.float64), 2))
    b2 = phi2 / (-h_prev / h)
    return phi1 - b2, b2


def res_step(y, eps, d, d_prev, s: float, s_to: float, h_prev: float | None):
    """y at level s_to from y at level s (model outputs eps and d = x0_hat - mu there, d_prev = the
    previous step's x0_hat - mu, h_prev = that step's length in t = -log s, None on the first step):
    the RES multistep step, or Euler on the first step and toward s_to = 0."""
    if d_prev is None or h_prev is None or s <= 0 or s_to <= 0 or s_to == s or h_prev == 0:
        return y + (s_to - s) * eps
    h = math.log(s) - math.log(s_to)
    b1, b2 = res_weights(h, h_prev)
    return (s_to / s) * y + h * (b1 * d + b2 * d_prev)


@register(
    "res-multistep",
    family="ode",
    order=2,
    calls_per_step=1,
    deterministic=True,
    description="RES second-order multistep (ComfyUI sample_res_multistep), exponential in -log sigma on x0",
    reference="Zhang, Song & Chen 2023, Improved Order Analysis and Design of Exponential Integrator (RES)",
)
class ResMultistep(Solver):
    """RES multistep (ComfyUI's ``sample_res_multistep``): the second-order exponential multistep
    method of Zhang, Song & Chen (2023, "Improved Order Analysis and Design of Exponential Integrator
    for Diffusion Models Sampling", RES, arXiv 2308.02157) on the data prediction. In
    y = (x - mu)/alpha against s = sigma/alpha, with t = -log s, h = t' - t = log(s/s') and D the
    model's x0_hat - mu, for each step after the first:

        c2      = -h_prev / h                       (h_prev: the previous step's h)
        b2      = phi_2(-h) / c2,    b1 = phi_1(-h) - b2
        y_{i+1} = e^{-h} y_i + h (b1 D_i + b2 D_{i-1}),    e^{-h} = s'/s

    with phi_1(z) = (e^z - 1)/z, phi_2(z) = (phi_1(z) - 1)/z. The first step and the step to s' = 0
    are Euler, y_{i+1} = y_i + (s' - s) eps_i (= DDIM). One model call per step; order 2. For
    diffusion schedules these are ComfyUI's variables (its latents x/alpha against sigma/alpha). On
    rectified flow the step is taken in x/alpha against sigma/alpha too, whereas ComfyUI applies the
    same formulas to x against its own sigma = t: a different discretisation of the same ODE.

    The step takes x0 and eps as separate terms (``steps_with_pair``): y_i is that of the state the
    pair composes, (x0 - mu) + s eps (``Prediction.pair_x``), and D (now and in the history) is the
    data prediction eps implies at x_i (``Prediction.eps_prediction``); for a plain model both are
    the above. Under :class:`~diffsolve.guidance.CFGPlusPlus` (guided x0, unconditional eps; the name
    ``res-multistep-cfg-pp``) the first step is (x0 - mu) + s' eps and the others
    e^{-h} ((x0 - mu) + s eps) + h (b1 D_u + b2 D_u,prev) with the unconditional D_u: ComfyUI's
    ``sample_res_multistep_cfg_pp``.
    """

    steps_with_pair = True

    def run(self, x, grid, noise, *, schedule, mu=None):
        maps = ScaledVariables(schedule, mu)
        x, grid = yield from maps.enter(x, grid)
        d_prev, h_prev = None, None
        for i, t, t_next, s, s_next in maps.steps(grid):
            pred = yield Query(x, t, step=maps.first + i + 1)
            d = model_output(pred.eps_prediction(), mu, "data")
            y = res_step(maps.y(pred.pair_x, t), pred.eps, d, d_prev, s, s_next, h_prev)
            x = maps.x(y, t_next)
            d_prev = d
            h_prev = math.log(s) - math.log(s_next) if s_next > 0 and s > 0 else None
        return x


@register(
    "gradient-estimation",
    family="ode",
    order=1,
    calls_per_step=1,
    deterministic=True,
    description="Gradient estimation (ComfyUI sample_gradient_estimation): Euler plus (gamma - 1)(d - d_prev)",
    reference="Permenter & Yuan 2024, Interpreting and Improving Diffusion Models from an Optimization Perspective",
)
class GradientEstimation(Solver):
    """Gradient estimation (ComfyUI's ``sample_gradient_estimation``): Permenter & Yuan (2024,
    "Interpreting and Improving Diffusion Models from an Optimization Perspective", ICML) read the
    denoiser as an approximate gradient of the distance to the data manifold and extrapolate it from
    the last two steps. In y = (x - mu)/alpha against s = sigma/alpha, with d = eps (k-diffusion's
    (x - denoised)/sigma), for each step after the first:

        y_{i+1} = y_i + (s' - s) (d_i + (gamma - 1)(d_i - d_{i-1}))      (gamma = ``ge_gamma``)

    i.e. the direction gamma d_i + (1 - gamma) d_{i-1}; the first step is Euler,
    y_1 = y_0 + (s_1 - s_0) d_0, and gamma = 1 is Euler throughout. One model call per step. The
    extrapolation weight (gamma - 1) does not depend on the step sizes, so it is not a consistent
    second-order multistep method: the paper's default gamma = 2 converges with order 1 (its
    leading error is smaller than Euler's at few steps, which is what the paper uses it for).

    The step takes x0 and eps as separate terms (``steps_with_pair``): y_i is that of the state the
    pair composes (``Prediction.pair_x``), so y_{i+1} = (x0 - mu) + s' d_i + (s' - s)(gamma - 1)(d_i -
    d_{i-1}) with d = eps. Under :class:`~diffsolve.guidance.CFGPlusPlus` (the name
    ``gradient-estimation-cfg-pp``) that is ComfyUI's ``sample_gradient_estimation_cfg_pp``
    (guided x0, unconditional eps and its history), except on a step to s' = 0, which ComfyUI takes
    as x0 alone and this solver, guided or not, as the formula above.
    """

    ge_gamma = Option(2.0, "the extrapolation gamma: d_bar = gamma d + (1 - gamma) d_prev (1 is Euler)")
    steps_with_pair = True

    def run(self, x, grid, noise, *, schedule, mu=None):
        maps = ScaledVariables(schedule, mu)
        x, grid = yield from maps.enter(x, grid)
        d_prev = None
        for i, t, t_next, s, s_next in maps.steps(grid):
            pred = yield Query(x, t, step=maps.first + i + 1)
            d = pred.eps
            d_bar = d if d_prev is None else d + (self.ge_gamma - 1.0) * (d - d_prev)
            y = maps.y(pred.pair_x, t) + (s_next - s) * d_bar
            x = maps.x(y, t_next)
            d_prev = d
        return x
