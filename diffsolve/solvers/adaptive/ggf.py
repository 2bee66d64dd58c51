"""Adaptive-step reverse-SDE solver: "Gotta Go Fast" (Jolicoeur-Martineau et al. 2021).

With the reverse-time drift a(x, t) = f(t) (x - mu) + g2(t) score(x, t) (the rate of change of x per
unit of time run backwards) and one standard normal z per step, shared by both stages:

    K1 = h a(x, t) + sqrt(g2(t) h) z
    K2 = h a(x + K1, t - h) + sqrt(g2(t - h) h) z
    x'  = x + K1                    (Euler-Maruyama)
    x'' = x + (K1 + K2) / 2         (stochastic improved Euler)
    E   = x'' - x'
    err = sqrt(mean_d (E / delta)^2),  delta = max(atol, rtol max(|x'_prev|, |x'|))
    accept if err <= 1: x <- x'' (extrapolation), x'_prev <- x', t <- t - h
    h <- min(t - t_min, 0.9 h err^-0.9)

and at t_min a Tweedie step x + sigma(t_min)^2 score(x, t_min). x'_prev is the Euler-Maruyama proposal
of the last accepted step (the paper's pseudocode and its PyTorch port; the JAX code uses the last
accepted state instead). Each iteration costs two model calls, accepted or not. The paper's tolerances
eps_rel and eps_abs are ``rtol`` and ``atol`` here (the old names stay as aliases).

The solver supplies the try (K1, K2 and the pair above, :class:`_Tries`); the accept / reject loop, the
per-row times and step sizes, x'_prev (the loop's ``reference="low"``) and the error-norm history are
:func:`diffsolve.core.adaptive.adaptive_loop`'s, with the :class:`StepSizeController`'s decisions.
"""

from __future__ import annotations

from typing import Any

import torch

from ...core.adaptive import AdaptiveSolver, Clock, Try
from ...core.noise import NoiseSource
from ...core.options import Option
from ...core.protocol import Outcome, Query, per_row, take_rows
from ...core.registry import register
from ...schedules.base import Schedule
from ..sde.euler_maruyama import reverse_sde_coefs

Tensor = torch.Tensor


@register(
    "adaptive-sde",
    family="adaptive",
    order=1,
    calls_per_step=2,
    deterministic=False,
    fixed_grid=False,
    description="Gotta Go Fast: adaptive EM / improved-Euler pair on the reverse SDE, per-sample steps",
    reference="Jolicoeur-Martineau et al. 2021, Gotta Go Fast When Generating Data with Score-Based Models",
    aliases=("gotta-go-fast",),
)
class GottaGoFast(AdaptiveSolver):
    """Gotta Go Fast's adaptive reverse-SDE solver; the update rule is in the module docstring.

    Options:
      ``rtol`` (0.01; the paper's eps_rel, which it sweeps over 0.01, 0.02, 0.05, 0.1), ``atol``
      (0.0078, the paper's eps_abs for data in [-1, 1]; 0.0039 for [0, 1]); ``eps_rel`` and
      ``eps_abs`` are aliases of them (give one name of each, not both);
      ``mode``: ``"per_sample"`` (each sample has its own time and step size; a finished sample leaves
      the batch, so its row costs no more model calls; batch invariant where the network's rows are,
      e.g. with ``ds.sample(..., row_block=k)``) or ``"batch"`` (one step size
      for the batch, accepted when every sample's error norm is <= 1, as in the paper's algorithm;
      the samples then depend on their batch);
      ``h_init`` (0.01, the first step size in time units), ``controller`` (the
      :class:`StepSizeController`; default safety 0.9, exponent 0.9, no limits; explicit ``rtol`` /
      ``atol`` replace its tolerances, which otherwise replace the defaults:
      :class:`~diffsolve.core.adaptive.AdaptiveSolver`), ``denoise`` (True: the final Tweedie step,
      one more model call).
    Noise defaults to ``"brownian"`` so a rejected step and its retry see one Brownian path;
    ``noise="gaussian"`` draws fresh noise for every try, as the paper's code does. NFE counts every
    model call, the Tweedie call included (the paper leaves it out). The result's ``accepted`` and
    ``rejected`` give each sample's step counts.
    """

    default_noise = "brownian"
    rtol = Option(0.01, "the relative tolerance (the paper's eps_rel)", low=0.0, low_open=True)
    atol = Option(0.0078, "the absolute tolerance (the paper's eps_abs, for data in [-1, 1])", low=0.0, low_open=True)
    h_init = Option(0.01, "the first step size, in time units", low=0.0, low_open=True)
    denoise = Option(True, "the final Tweedie step (one more model call)")
    eps_rel: Option[Any] = Option(None, alias_of="rtol")
    eps_abs: Option[Any] = Option(None, alias_of="atol")

    def run(self, x, grid, noise, *, schedule, mu=None):
        t_max, t_min = float(grid[0]), float(grid[-1])
        if not float(schedule.sigma(t_min)) > 0:
            raise ValueError(
                f"adaptive-sde needs sigma(t_min) > 0 (the score is infinite at sigma = 0, t_min = {t_min:g}); "
                "pass t_min, e.g. t_min=1e-3 as Score-SDE does"
            )
        out = yield from self._loop(
            _Tries(schedule, noise, mu), x, Clock(t_max, t_min, descending=True), snap=1e-13, reference="low"
        )
        x = out.x
        if self.denoise:
            pred = yield Query(x, t_min, step=out.iterations + 1)
            x = pred.state_at(pred.coefs.alpha, 0.0)  # = x + sigma^2 score, finite also where sigma = 0
        return Outcome(x, accepted=out.accepted, rejected=out.rejected)


class _Tries:
    """Gotta Go Fast's try from t by h (per row): K1 and K2 on one normal draw z, the Euler-Maruyama
    proposal x' (low), the improved-Euler x'' (high) and E = (K2 - K1) / 2 (module docstring)."""

    def __init__(self, schedule: Schedule, noise: NoiseSource, mu: Tensor | None):
        self.schedule, self.noise, self.mu = schedule, noise, mu

    def _drift(self, pred, t: Tensor, rows: Tensor) -> Tensor:
        """The reverse-time drift a(x, t) = f(t) (x - mu) + g2(t) score(x, t) at the model's answer."""
        y = pred.x if self.mu is None else pred.x - take_rows(self.mu, rows)
        f, g2 = reverse_sde_coefs(self.schedule, t)
        return per_row(f, y) * y + per_row(g2, y) * pred.score

    def attempt(self, x: Tensor, t: Tensor, h: Tensor, rows: Tensor, it: int):
        z = self.noise.step(t, t - h, rows)
        pred = yield Query(x, t, rows=rows, step=it)
        x = pred.x
        k1 = per_row(h, x) * self._drift(pred, t, rows) + per_row((self.schedule.g2(t) * h).sqrt(), x) * z
        pred = yield Query(x + k1, t - h, rows=rows, step=it)
        k2 = per_row(h, x) * self._drift(pred, t - h, rows) + per_row((self.schedule.g2(t - h) * h).sqrt(), x) * z
        return Try(x, x + k1, x + 0.5 * (k1 + k2), t - h, error=0.5 * (k2 - k1))

    def commit(self, rows: Tensor, ok: Tensor, t_new: Tensor) -> None:
        """Nothing to keep: x'_prev is the loop's reference."""
