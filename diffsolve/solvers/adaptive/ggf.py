"""Adaptive-step reverse-SDE solver: "Gotta Go Fast" (Jolicoeur-Martineau et al. 2021).

With the reverse-time drift a(x, t) = f(t) (x - mu) + g2(t) score(x, t) (the rate of change of x per
unit of time run backwards) and one standard normal z per step, shared by both stages:

    K1 = h a(x, t) + sqrt(g2(t) h) z
    K2 = h a(x + K1, t - h) + sqrt(g2(t - h) h) z
    x'  = x + K1                    (Euler-Maruyama)
    x'' = x + (K1 + K2) / 2         (stochastic improved Euler)
    E   = x'' - x'
    err = sqrt(mean_d (E / delta)^2),  delta = max(eps_abs, eps_rel max(|x'_prev|, |x'|))
    accept if err <= 1: x <- x'' (extrapolation), x'_prev <- x', t <- t - h
    h <- min(t - t_min, 0.9 h err^-0.9)

and at t_min a Tweedie step x + sigma(t_min)^2 score(x, t_min). x'_prev is the Euler-Maruyama proposal
of the last accepted step (the paper's pseudocode and its PyTorch port; the JAX code uses the last
accepted state instead). Each iteration costs two model calls, accepted or not.
"""

from __future__ import annotations

import torch

from ...core.protocol import Outcome, Query, Solver, col, sub
from ...core.control import StepSizeController, check_adaptive
from ...core.registry import register
from ..sde.euler_maruyama import reverse_sde_coefs

Tensor = torch.Tensor


@register("adaptive-sde", family="adaptive", order=1, calls_per_step=2, deterministic=False, fixed_grid=False,
          description="Gotta Go Fast: adaptive EM / improved-Euler pair on the reverse SDE, per-sample steps",
          reference="Jolicoeur-Martineau et al. 2021, Gotta Go Fast When Generating Data with Score-Based Models")
class GottaGoFast(Solver):
    """Gotta Go Fast's adaptive reverse-SDE solver; the update rule is in the module docstring.

    Options:
      ``eps_rel`` (0.01; the paper sweeps 0.01, 0.02, 0.05, 0.1), ``eps_abs`` (0.0078, the paper's for
      data in [-1, 1]; 0.0039 for [0, 1]);
      ``mode``: ``"per_sample"`` (each sample has its own time and step size; a finished sample leaves
      the batch, so its row costs no more model calls; batch invariant where the network's rows are,
      e.g. with ``ds.sample(..., row_block=k)``) or ``"batch"`` (one step size
      for the batch, accepted when every sample's error norm is <= 1, as in the paper's algorithm;
      the samples then depend on their batch);
      ``h_init`` (0.01, the first step size in time units), ``controller`` (the
      :class:`StepSizeController`; default safety 0.9, exponent 0.9, no limits), ``denoise`` (True:
      the final Tweedie step, one more model call).
    Noise defaults to ``"brownian"`` so a rejected step and its retry see one Brownian path;
    ``noise="gaussian"`` draws fresh noise for every try, as the paper's code does. NFE counts every
    model call, the Tweedie call included (the paper leaves it out). The result's ``accepted`` and
    ``rejected`` give each sample's step counts.
    """

    default_noise = "brownian"

    def __init__(self, eps_rel: float = 0.01, eps_abs: float = 0.0078, mode: str = "per_sample",
                 h_init: float = 0.01, controller: StepSizeController | None = None, denoise: bool = True):
        self.controller = check_adaptive(controller, StepSizeController(), mode, eps_rel=eps_rel, eps_abs=eps_abs,
                                         h_init=h_init)
        if not isinstance(denoise, bool):
            raise TypeError(f"denoise must be True or False, got {denoise!r}")
        self.eps_rel, self.eps_abs, self.h_init = float(eps_rel), float(eps_abs), float(h_init)
        self.mode, self.denoise = mode, denoise

    def run(self, x, grid, noise, *, schedule, mu=None):
        t_max, t_min = float(grid[0]), float(grid[-1])
        if not float(schedule.sigma(t_min)) > 0:
            raise ValueError(f"adaptive-sde needs sigma(t_min) > 0 (the score is infinite at sigma = 0, t_min = {t_min:g}); "
                             "pass t_min, e.g. t_min=1e-3 as Score-SDE does")
        b, dev, f64 = x.shape[0], x.device, torch.float64
        t = torch.full((b,), t_max, dtype=f64, device=dev)
        h = torch.full((b,), min(self.h_init, t_max - t_min), dtype=f64, device=dev)
        x_prev = x.clone()
        err_hist = self.controller.history(b, dev)
        accepted = torch.zeros(b, dtype=torch.long, device=dev)
        rejected = torch.zeros(b, dtype=torch.long, device=dev)
        tiny = 1e-13 * (t_max - t_min)
        it = 0

        def drift(pred, tt):
            y = pred.x if mu is None else pred.x - sub(mu, rows)
            f, g2 = reverse_sde_coefs(schedule, tt)
            return col(f, y) * y + col(g2, y) * pred.score

        # per_sample: the unfinished rows step on their own; batch: every row, one shared error norm
        # (so all rows keep one time and one step size and finish together)
        while bool((t > t_min).any()):
            it += 1
            rows = (t > t_min).nonzero().squeeze(1)
            xr, tr, hr, xp = x[rows], t[rows], h[rows], x_prev[rows]
            if bool((hr < tiny).any()):
                raise RuntimeError(f"adaptive-sde: the step size underflowed at t = {float(tr.max()):.6g} "
                                   f"(eps_rel={self.eps_rel}, eps_abs={self.eps_abs}); loosen the tolerances")
            z = noise.step(tr, tr - hr, rows)
            pred = yield Query(xr, tr, index=rows, step=it)
            xr = pred.x
            k1 = col(hr, xr) * drift(pred, tr) + col((schedule.g2(tr) * hr).sqrt(), xr) * z
            pred = yield Query(xr + k1, tr - hr, index=rows, step=it)
            k2 = col(hr, xr) * drift(pred, tr - hr) + col((schedule.g2(tr - hr) * hr).sqrt(), xr) * z
            x_em, x_heun = xr + k1, xr + 0.5 * (k1 + k2)
            err = self.controller.error_norm(0.5 * (k2 - k1), xp, x_em, self.eps_abs, self.eps_rel)
            if self.mode == "batch":
                err = err.max().expand_as(err)
            ok = self.controller.accepts(err)
            t_new = torch.where(ok, torch.where(hr >= tr - t_min - tiny, torch.full_like(tr, t_min), tr - hr), tr)
            h_new = torch.minimum(hr * self.controller.factor(err, err_hist[rows]), t_new - t_min)
            err_hist = err_hist.index_copy(0, rows, self.controller.push(err_hist[rows], err, ok))
            okx = col(ok, xr).bool()
            x = x.index_copy(0, rows, torch.where(okx, x_heun, xr))
            x_prev = x_prev.index_copy(0, rows, torch.where(okx, x_em, xp))
            t, h = t.index_copy(0, rows, t_new), h.index_copy(0, rows, h_new)
            accepted[rows] += ok.long()
            rejected[rows] += (~ok).long()
        if self.denoise:
            rows = None
            pred = yield Query(x, t_min, step=it + 1)
            x = pred.point(pred.coefs.alpha, 0.0)  # = x + sigma^2 score, finite also where sigma = 0
        return Outcome(x, accepted=accepted, rejected=rejected)
