"""Consistency-model samplers: multistep consistency sampling (``lcm``, diffusers' LCMScheduler) and
Trajectory Consistency Distillation's strategic stochastic sampling (``tcd``, diffusers'
TCDScheduler).

Notation: alpha_i, sigma_i at grid time t_i (t_0 = t_max > ... > t_N, the grid's data end); x0 and
eps are the model's predictions (``pred.x0``, ``pred.eps``) at (x_i, t_i); mu is the mean-reverting
condition (0 otherwise); z ~ N(0, I) is fresh noise.

A consistency model's network is usually wrapped in a boundary condition
f(x, t) = c_skip(t) x + c_out(t) F(x, t) (diffusers' ``timestep_scaling``, sigma_data = 0.5). These
solvers take the denoised estimate as the model gives it (``pred.x0``): wrap the network so that its
prediction is the consistency function's output, or note that with diffusers' default
``timestep_scaling = 10`` the scalings at the discrete timesteps LCM uses (>= 19) are within 1e-5 of
c_skip = 0, c_out = 1.
"""

from __future__ import annotations

import math

from ...core.options import Option
from ...core.protocol import Query, Solver
from ...core.registry import register
from ..exponential.maths import alpha_sigma


@register(
    "lcm",
    family="sde",
    order=1,
    calls_per_step=1,
    deterministic=False,
    description="Latent Consistency Model multistep sampling (diffusers LCMScheduler)",
    reference="Luo et al. 2023, Latent Consistency Models (arXiv 2310.04378); Song et al. 2023, Consistency Models",
)
class LCM(Solver):
    """Multistep consistency sampling (Song et al. 2023, Algorithm 1; Luo et al. 2023, Algorithm 3,
    diffusers' LCMScheduler). Each step takes the model's denoised estimate at t_i and re-noises it
    to the next grid time with fresh noise:

        x0_i    = x0(x_i, t_i)
        x_{i+1} = alpha_{i+1} x0_i + (1 - alpha_{i+1}) mu + sigma_{i+1} z      (i < N - 1)
        x_N     = x0_{N-1}                                                      (the last step)

    The last step returns the denoised estimate itself, not a state at t_N (as diffusers' last
    ``step``, whose ``prev_sample`` is ``denoised``): t_N only closes the grid. One model call per
    step; the earlier x_i enter only through the model (no ODE is integrated).

    ``from_end``: the consistency function's boundary is the grid's data end t_N (Song et al. 2023,
    Algorithm 1, whose f(x, eps) = x: its output is a state at t_N = eps, not at t = 0), so the
    re-noising is the forward process from t_N to t_{i+1}, r = alpha_{i+1} / alpha_N:

        x_{i+1} = mu + r (x0_i - mu) + sqrt(sigma_{i+1}^2 - r^2 sigma_N^2) z

    On EDM sigmas (alpha = 1, sigma_N = sigma_min) this is diffusers' CMStochasticIterativeScheduler,
    x_{i+1} = x0_i + sqrt(sigma_{i+1}^2 - sigma_min^2) s_noise z (with clip_denoised off). Where
    sigma_N = 0 both rules agree. ``s_noise`` scales the drawn noise (z -> s_noise z; 1 is the
    papers' rule).
    """

    steps_with_pair = True  # the step uses the prediction's own x0
    runs_backward = False  # the last step returns x0: no inversion

    from_end = Option(
        False,
        "re-noise from the grid's data end t_N, the consistency function's boundary (Song et al. "
        "2023, Algorithm 1; diffusers' CMStochasticIterativeScheduler), not from t = 0",
    )
    s_noise = Option(1.0, "a scale on the drawn noise (diffusers' CMStochasticIterativeScheduler s_noise)", low=0.0)

    def run(self, x, grid, noise, *, schedule, mu=None):
        n = len(grid) - 1
        for i in range(n):
            t, t_next = float(grid[i]), float(grid[i + 1])
            pred = yield Query(x, t, step=i + 1)
            if i == n - 1:
                return pred.x0
            a_n, s_n = alpha_sigma(schedule, t_next)
            if self.from_end:
                a_e, s_e = alpha_sigma(schedule, float(grid[-1]))
                a_n = a_n / a_e
                s_n = math.sqrt(max(s_n * s_n - a_n * a_n * s_e * s_e, 0.0))
            z = noise.step(t, t_next)
            x = pred.state_at(a_n, s_n, z if self.s_noise == 1.0 else self.s_noise * z)
        return x


@register(
    "tcd",
    family="sde",
    order=1,
    calls_per_step=1,
    deterministic=False,
    description="Trajectory Consistency Distillation strategic stochastic sampling (diffusers TCDScheduler)",
    reference="Zheng et al. 2024, Trajectory Consistency Distillation (arXiv 2402.19159)",
)
class TCD(Solver):
    """Strategic stochastic sampling of Trajectory Consistency Distillation (Zheng et al. 2024,
    Algorithm 4; diffusers' TCDScheduler, whose ``eta`` is the paper's gamma). With the time
    measured from the grid's data end t_N, each step goes by DDIM from (x0, eps) at t_i to the
    intermediate time s_i = t_N + (1 - gamma)(t_{i+1} - t_N), then forward-noises from s_i to t_{i+1}:

        x_s     = alpha_s x0 + (1 - alpha_s) mu + sigma_s eps
        r       = alpha_{i+1} / alpha_s
        x_{i+1} = mu + r (x_s - mu) + sqrt(sigma_{i+1}^2 - r^2 sigma_s^2) z

    For a VP schedule the noise's variance is 1 - abar_{i+1}/abar_s, diffusers' rule. gamma = 0 is
    deterministic DDIM; gamma = 1 is ``lcm``'s re-noising except at the last step, which (s = t_N)
    is the DDIM step to t_N. diffusers steps discrete timesteps k (t = (k + 1)/N on
    :class:`~diffsolve.schedules.VPDiscrete`, so t_N = 1/N is k = 0): its s is
    floor((1 - gamma) k_{i+1}), ours the same without the floor. One model call per step.
    """

    steps_with_pair = True  # the step uses the prediction's own (x0, eps)
    runs_backward = False  # s is measured from the grid's data end: no inversion

    gamma = Option(
        0.3,
        "the stochasticity (diffusers' eta): the fraction of each step taken as fresh noise; 0 is "
        "deterministic DDIM, 1 re-noises from x0 as lcm",
        low=0.0,
        high=1.0,
    )

    def run(self, x, grid, noise, *, schedule, mu=None):
        t_end = float(grid[-1])
        for i in range(len(grid) - 1):
            t, t_next = float(grid[i]), float(grid[i + 1])
            pred = yield Query(x, t, step=i + 1)
            x, c = tcd_step(pred, t_next, t_end, schedule, self.gamma)
            if c > 0:
                x = x + c * noise.step(t, t_next)
        return x


def tcd_step(pred, t_next: float, t_end: float, schedule, gamma: float):
    """(x_mean, c) of TCD's step to t_next (TCD docstring): x_{i+1} = x_mean + c z."""
    a_n, s_n = alpha_sigma(schedule, t_next)
    if gamma <= 0:
        return pred.state_at(a_n, s_n), 0.0
    a_s, s_s = alpha_sigma(schedule, t_end + (1.0 - gamma) * (t_next - t_end))
    if a_s <= 0:  # from alpha = 0: only noise is left
        return pred.state_at(a_n, 0.0), s_n
    r_sigma = a_n / a_s * s_s
    return pred.state_at(a_n, r_sigma), math.sqrt(max(s_n * s_n - r_sigma * r_sigma, 0.0))
