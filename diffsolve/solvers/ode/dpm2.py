"""DPM-2 as k-diffusion's ``sample_dpm_2`` and diffusers' KDPM2DiscreteScheduler, and the helpers of
k-diffusion's samplers in y = (x - mu)/alpha against s = sigma/alpha shared with the ancestral ones
(:mod:`diffsolve.solvers.sde.ancestral`).

These samplers step in the variables y = (x - mu)/alpha against s = sigma/alpha = exp(-lambda): there
y = (x0 - mu) + s eps is a variance-exploding process in s, the probability-flow ODE is
dy/ds = eps, and the posterior of an ancestral step is Gaussian in y. For diffusion schedules these
are k-diffusion's and diffusers' variables (latents x/alpha against sigma/alpha).

Notation: s, s' are the noise levels sigma/alpha at grid times t_i, t_{i+1}; eps is the model's
noise prediction (``pred.eps``); z ~ N(0, I); mu is the mean-reverting condition (0 otherwise).
"""

from __future__ import annotations

import math

from ...core.protocol import Query, Solver
from ...core.registry import register
from ...schedules.base import Schedule
from ..exponential.maths import alpha_sigma, model_output


def noise_level(schedule: Schedule, t: float) -> float:
    """s = sigma/alpha at t (0 at sigma = 0); a clear error where alpha = 0 (s infinite)."""
    a, sig = alpha_sigma(schedule, t)
    if a <= 0:
        raise ValueError(
            f"the k-diffusion-style samplers step in sigma/alpha, infinite at t = {t:.6g} (alpha = 0): "
            "only a grid's first time may be there"
        )
    return sig / a


class ScaledVariables:
    """The map between x at time t and y = (x - mu)/alpha(t).

    ``first`` is the number of steps :meth:`enter` took (1 after a jump from alpha = 0, else 0): a
    query's 1-based step number is ``first + i + 1`` for step i of the grid :meth:`enter` returned."""

    def __init__(self, schedule: Schedule, mu):
        self.schedule, self.mu = schedule, mu
        self.first = 0

    def enter(self, x, grid):
        """Where ``grid`` starts at alpha = 0 (rectified flow's t = 1: s = sigma/alpha is infinite,
        y undefined), the first step is DDIM's jump, the limit of every step here as s -> inf:

            y_1 = (x0_hat - mu) + s_1 eps_hat        (one model call at t_0; eps_hat = x / sigma there)

        Returns the state and the grid to continue from (a generator: ``x, grid = yield from
        maps.enter(x, grid)``); elsewhere both unchanged, without a model call."""
        if len(grid) < 2 or alpha_sigma(self.schedule, float(grid[0]))[0] > 0:
            return x, grid
        t0, t1 = float(grid[0]), float(grid[1])
        pred = yield Query(x, t0, step=1)
        y = model_output(pred, self.mu, "data") + noise_level(self.schedule, t1) * pred.eps
        self.first = 1
        return self.x(y, t1), grid[1:]

    def y(self, x, t: float):
        a = float(self.schedule.alpha(t))
        return (x if self.mu is None else x - self.mu) / a

    def x(self, y, t: float):
        x = float(self.schedule.alpha(t)) * y
        return x if self.mu is None else x + self.mu

    def steps(self, grid):
        """(i, t_i, t_{i+1}, s_i, s_{i+1}) for each step of ``grid``."""
        for i in range(len(grid) - 1):
            t, t_next = float(grid[i]), float(grid[i + 1])
            yield i, t, t_next, noise_level(self.schedule, t), noise_level(self.schedule, t_next)

    def t(self, s: float) -> float:
        """The schedule time at noise level s = sigma/alpha > 0."""
        return float(self.schedule.t_of_log_snr(-math.log(s)))


def dpm2_step(maps: ScaledVariables, x, t: float, s: float, s_to: float, eps, step: int):
    """k-diffusion's DPM-2 step from (x, t) at level s toward level s_to (a generator: it may
    query the model once more at the log-midpoint). Returns y at level s_to."""
    y = maps.y(x, t)
    if s_to <= 0 or s <= 0:  # Euler to s' = 0 (or from s = 0: an inversion's first step)
        return y + (s_to - s) * eps
    s_mid = math.exp(0.5 * (math.log(s) + math.log(s_to)))
    t_mid = maps.t(s_mid)
    y_mid = y + (s_mid - s) * eps
    pred = yield Query(maps.x(y_mid, t_mid), t_mid, step=step)
    return y + (s_to - s) * pred.eps


@register(
    "dpm-2",
    family="ode",
    order=2,
    calls_per_step=2,
    deterministic=True,
    description="DPM-Solver-2 as k-diffusion's sample_dpm_2 (midpoint in log sigma; diffusers KDPM2Discrete)",
    reference="Lu et al. 2022, DPM-Solver (DPM-Solver-2); Karras et al. 2022 (k-diffusion variables)",
)
class DPM2(Solver):
    """DPM-2 (k-diffusion's ``sample_dpm_2``; diffusers' KDPM2DiscreteScheduler): the second-order
    DPM-Solver-2 (Lu et al. 2022) as Karras et al. (2022) step it, a midpoint method in log sigma.
    In y = (x - mu)/alpha against s = sigma/alpha, for each step:

        s_mid   = exp((log s + log s') / 2)
        y_mid   = y_i + (s_mid - s) eps(x_i, t_i)
        y_{i+1} = y_i + (s' - s) eps(x_mid, t_mid)        (t_mid: the time with sigma/alpha = s_mid)

    A step to s' = 0 is an Euler step (one call). Two model calls per step; order 2. For diffusion
    schedules these are k-diffusion's variables; on rectified flow the step is taken in
    x/alpha against sigma/alpha (not x against t, as ``euler`` and ``heun`` do there).
    """

    def run(self, x, grid, noise, *, schedule, mu=None):
        maps = ScaledVariables(schedule, mu)
        x, grid = yield from maps.enter(x, grid)
        for i, t, t_next, s, s_next in maps.steps(grid):
            pred = yield Query(x, t, step=maps.first + i + 1)
            y = yield from dpm2_step(maps, pred.x, t, s, s_next, pred.eps, maps.first + i + 1)
            x = maps.x(y, t_next)
        return x
