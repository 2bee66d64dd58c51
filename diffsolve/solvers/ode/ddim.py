"""DDIM (and with eta = 1 DDPM, registered in :mod:`diffsolve.solvers.sde.ddpm`).

Notation: alpha_i, sigma_i, lambda_i = log(alpha_i/sigma_i) at grid time t_i (t_0 = t_max > ... >
t_N = t_min); x0 and eps are the model's predictions (``pred.x0``, ``pred.eps``); mu is the
mean-reverting condition (0 otherwise).
"""

from __future__ import annotations

import math

from ...core.options import Option
from ...core.protocol import Query, Solver
from ...core.registry import register
from ...core.renoise import ReNoise
from ...schedules.base import Schedule
from ..exponential.maths import alpha_sigma, half_log_snr, posterior_std


@register(
    "ddim",
    family="ode",
    order=1,
    calls_per_step=1,
    deterministic=True,
    description="DDIM (eta = 0: deterministic; eta = 1: DDPM)",
    reference="Song, Meng & Ermon 2021, Denoising Diffusion Implicit Models",
)
class DDIM(Solver):
    """DDIM (Song et al. 2021, eq. 12) in the general schedule form. With h = lambda_{i+1} - lambda_i:

        c       = eta sigma_{i+1} sqrt(1 - exp(-2 h))
        x_{i+1} = alpha_{i+1} x0 + (1 - alpha_{i+1}) mu + sqrt(sigma_{i+1}^2 - c^2) eps + c z

    eta = 0 is the deterministic DDIM (the first-order exponential integrator, DPM-Solver-1);
    eta = 1 draws from the DDPM posterior q(x_{i+1} | x_i, x0) (Ho et al. 2020), registered as
    ``ddpm`` (:mod:`diffsolve.solvers.sde.ddpm`), and on a mean-reverting schedule it is IR-SDE's posterior sampling step
    x*_{i+1} + lam sqrt((1 - A^2)(1 - C^2)/(1 - B^2)) z (A = alpha_{i+1}/alpha_i, B = alpha_i,
    C = alpha_{i+1}) generalised to a jump of any length, registered as ``irsde-posterior``
    (IR-SDE's own code applies the one-index transition even when the grid skips indices). For a
    VP schedule c reduces to DDIM's
    eta sqrt((1 - abar_{i+1})/(1 - abar_i)) sqrt(1 - abar_i/abar_{i+1}). One model call per step.

    Inversion (:func:`diffsolve.invert`, eta = 0) runs the step on the grid backwards (DDIM
    inversion); ``renoise=True`` (or a :class:`~diffsolve.samplers.ReNoise` with other settings)
    refines it with ReNoise's fixed-point iteration. Sampling ignores ``renoise``.
    """

    steps_with_pair = True  # the step above uses the prediction's own (x0, eps), so CFG++'s pair acts as given

    eta = Option(
        0.0, "the fraction of the posterior's noise drawn: 0 is deterministic DDIM, 1 is DDPM", low=0.0, high=1.0
    )
    renoise = Option(
        False,
        "inversion only: refine DDIM inversion by ReNoise's fixed-point iteration (True, or "
        "a ReNoise with other settings)",
        types=(bool, ReNoise),
        what="True, False or a ReNoise",
    )

    def check_options(self):
        if self.renoise is not False and self.eta != 0:
            raise ValueError(f"renoise refines the inversion of deterministic DDIM: it needs eta = 0, got {self.eta}")

    def noise_options(self):
        return {"eta": self.eta} if self.eta > 0 else {}

    def run(self, x, grid, noise, *, schedule, mu=None):
        for i in range(len(grid) - 1):
            t, t_next = float(grid[i]), float(grid[i + 1])
            pred = yield Query(x, t, step=i + 1)
            x, c = ddim_step(pred, t, t_next, schedule, self.eta)
            if c > 0:
                x = x + c * noise.step(t, t_next)
        return x

    def run_inverse(self, x, grid, noise, *, schedule, mu=None):
        """Data at grid[-1] to the latent at grid[0]: DDIM inversion, or ReNoise's refinement."""
        if self.renoise is not False:
            return (yield from (ReNoise() if self.renoise is True else self.renoise).run(x, grid, schedule, mu))
        return (yield from self.run(x, grid.flip(0), noise, schedule=schedule, mu=mu))


def ddim_step(pred, t: float, t_next: float, schedule: Schedule, eta: float):
    """(x_mean, c) of DDIM's step t -> t_next (DDIM docstring): x_{i+1} = x_mean + c z, with
    c = eta sigma_{i+1} sqrt(1 - e^{-2h}) (:func:`~diffsolve.solvers.exponential.maths.posterior_std`)."""
    a_n, s_n = alpha_sigma(schedule, t_next)
    c = 0.0
    if eta > 0 and s_n > 0:
        a, s = alpha_sigma(schedule, t)
        if a > 0:
            h = half_log_snr(a_n, s_n) - half_log_snr(a, s)
            c = posterior_std(eta * s_n, h)
        else:  # from alpha = 0 (rectified flow's t = 1): h = infinity
            c = eta * s_n
    return pred.state_at(a_n, math.sqrt(max(s_n * s_n - c * c, 0.0))), c
