"""Singlestep DPM-Solver++ / MR Sampler on a fixed grid: ``dpmpp-3s``.

A step from lambda_s by h evaluates the model at intermediate log-SNRs lambda_s + r h and combines
the outputs with the weights of :func:`.maths.ode_weights_expm1` (the 2S and 3S rules are written out
in :mod:`.adaptive`, whose singlestep pairs these steps are: Lu et al. 2023, DPM-Solver++ singlestep;
Li et al. 2025, MRS, for the mean-reverting form y = x - mu). Replaying the grid mrs-adaptive accepted
(:func:`.adaptive.pilot_grid` with ``method="singlestep"``) gives the adaptive run's accuracy.
"""

from __future__ import annotations

import math

import torch

from ...core.options import Option
from ...core.protocol import Query, Solver
from ...core.registry import register
from .adaptive import _pair


@register(
    "dpmpp-3s",
    family="ode",
    order=3,
    calls_per_step=3,
    deterministic=True,
    description="singlestep DPM-Solver++(3S) / MRS on a fixed grid (mrs-adaptive's step; replays a pilot grid)",
    reference="Lu et al. 2023, DPM-Solver++ (singlestep); Li et al. 2025 (MR Sampler)",
)
class SinglestepMRS(Solver):
    """The higher-order solution of mrs-adaptive's singlestep pair (:mod:`.adaptive`) on a fixed grid:
    ``order=3`` is DPM-Solver++(3S) (3 calls per step), ``order=2`` DPM-Solver++(2S) with r = 1/2
    (2 calls). A step from alpha = 0 or to sigma = 0 (an infinite log-SNR: no midpoints in log-SNR)
    is first order, a DDIM step: x_t = alpha_t x0_hat + sigma_t eps_hat (+ (1 - alpha_t) mu).
    Replaying a grid chosen by mrs-adaptive (:func:`~.adaptive.pilot_grid`) gives the adaptive accuracy.
    """

    order = Option(3, "the order of the singlestep update", choices=(2, 3))

    def run(self, x, grid, noise, *, schedule, mu=None):
        b = x.shape[0]
        for i in range(len(grid) - 1):
            t, t_next = float(grid[i]), float(grid[i + 1])
            lam_s, lam_t = float(schedule.log_snr(t)), float(schedule.log_snr(t_next))
            if not (math.isfinite(lam_s) and math.isfinite(lam_t)):  # from alpha = 0 or to sigma = 0: DDIM, one call
                pred = yield Query(x, t, step=i + 1)
                x = pred.state_at(*schedule.at(t_next))
                continue
            ls = torch.full((b,), lam_s, dtype=torch.float64, device=x.device)
            hr = torch.full((b,), lam_t - lam_s, dtype=torch.float64, device=x.device)
            _, _, _, high, _ = yield from _pair(x, ls, hr, mu, schedule, self.order, None, i + 1)
            x = high if mu is None else high + mu
        return x
