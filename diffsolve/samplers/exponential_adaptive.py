"""Adaptive exponential integrators: error-controlled singlestep MRS / DPM-Solver++ steps in log-SNR,
with a step size per sample.

With y = x - mu, q = x0_hat - mu (the data parameterisation of MRS, i.e. DPM-Solver++), a step from
lambda_s by h > 0 in log-SNR, with phi1(h) = e^{-h} - 1 and phi2(h) = phi1(h)/h + 1, uses

    first order (DDIM):  y1 = (sigma_t/sigma_s) y_s - alpha_t phi1(h) q_s
    2S, r:               u = (sigma_r/sigma_s) y_s - alpha_r phi1(r h) q_s,   q_r = q(u, lambda_s + r h)
                         y2 = y1 - alpha_t phi1(h) (q_r - q_s) / (2 r)
    3S (r1 = 1/3, r2 = 2/3):
                         u2 = (sigma_2/sigma_s) y_s - alpha_2 phi1(r2 h) q_s
                              + alpha_2 (r2/r1) phi2(r2 h) (q_1 - q_s),          q_2 = q(u2, lambda_s + r2 h)
                         y3 = y1 + alpha_t phi2(h) (q_2 - q_s) / r2

(Lu et al. 2023, DPM-Solver++ singlestep; Li et al. 2025, MRS, for the mean-reverting form). Embedded
pairs share their model evaluations, as k-diffusion's ``dpm_adaptive`` does:
``order=2``: y1 / 2S(r = 1/2), 2 calls per try; ``order=3`` (default): 2S(r = 1/3) / 3S, 3 calls.
The local error estimate E = y_high - y_low goes to the shared :class:`StepSizeController` (scaled
RMS norm with delta = max(atol, rtol max(|x_prev|, |x_low|)), accept when <= 1); the step continues
from the higher-order solution. Default controller: I-control, safety 0.9, exponent 1/order, factor
limits [0.2, 5] (``controller=`` replaces it, e.g. PI with ``exponent_prev``).

``mode="per_sample"``: each sample has its own lambda and h and leaves the batch when it reaches
lambda(t_min); ``"batch"``: one h for all (the largest error norm decides). The result's ``stats``
give each sample's accepted times (``"grids"``, and ``"grid"`` in batch mode).
"""

from __future__ import annotations

import torch

from .base import Outcome, Query, Solver, col, sub
from .control import StepSizeController, check_adaptive
from .registry import register

Tensor = torch.Tensor


def _phi1(h: Tensor) -> Tensor:
    return torch.expm1(-h)


def _phi2(h: Tensor) -> Tensor:
    return torch.expm1(-h) / h + 1.0


def _pair(x: Tensor, ls: Tensor, hr: Tensor, m, schedule, order: int, rows, it):
    """One try from log-SNR ``ls`` by ``hr`` (per row): yields the model queries and returns
    (the state the model saw, low-order y, high-order y, the end time). See the module docstring."""

    def coefs(lm):
        t = schedule.t_of_log_snr(lm)
        return t, schedule.alpha(t), schedule.sigma(t)

    ts, a_s, s_s = coefs(ls)
    pred = yield Query(x, ts, index=rows, step=it)
    xr = pred.x
    y = xr if m is None else xr - m
    q_s = pred.x0 if m is None else pred.x0 - m
    tt, a_t, s_t = coefs(ls + hr)
    y1 = col(s_t / s_s, y) * y - col(a_t * _phi1(hr), y) * q_s
    r1 = 0.5 if order == 2 else 1.0 / 3.0
    t1, a1, s1 = coefs(ls + r1 * hr)
    u1 = col(s1 / s_s, y) * y - col(a1 * _phi1(r1 * hr), y) * q_s
    pred1 = yield Query(u1 if m is None else u1 + m, t1, index=rows, step=it)
    q_1 = pred1.x0 if m is None else pred1.x0 - m
    y2 = y1 - col(a_t * _phi1(hr) / (2 * r1), y) * (q_1 - q_s)
    if order == 2:
        return xr, y1, y2, tt
    r2 = 2.0 / 3.0
    t2, a2, s2 = coefs(ls + r2 * hr)
    u2 = col(s2 / s_s, y) * y - col(a2 * _phi1(r2 * hr), y) * q_s + col(a2 * (r2 / r1) * _phi2(r2 * hr), y) * (q_1 - q_s)
    pred2 = yield Query(u2 if m is None else u2 + m, t2, index=rows, step=it)
    q_2 = pred2.x0 if m is None else pred2.x0 - m
    return xr, y2, y1 + col(a_t * _phi2(hr) / r2, y) * (q_2 - q_s), tt


@register("mrs-adaptive", family="adaptive", order=3, calls_per_step=3, deterministic=True, fixed_grid=False,
          description="adaptive MRS / DPM-Solver++ in log-SNR: embedded singlestep pairs, per-sample steps",
          reference="Lu et al. 2023 (DPM-Solver++); Li et al. 2025 (MR Sampler); k-diffusion dpm_adaptive")
class MRSAdaptive(Solver):
    """Adaptive probability-flow ODE solver; the update rule is in the module docstring.

    Options: ``order`` (3: the 2/3 pair, 3 calls per try; 2: the 1/2 pair, 2 calls), ``rtol``
    (0.05) and ``atol`` (0.0078, for data in [-1, 1]), ``h_init`` (0.05, in log-SNR), ``mode``
    (``"per_sample"`` or ``"batch"``), ``controller``.
    """

    def __init__(self, order: int = 3, rtol: float = 0.05, atol: float = 0.0078, h_init: float = 0.05,
                 mode: str = "per_sample", controller: StepSizeController | None = None):
        if order not in (2, 3):
            raise ValueError(f"order must be 2 or 3, got {order!r}")
        default = StepSizeController(safety=0.9, exponent=1.0 / order, factor_min=0.2, factor_max=5.0)
        self.controller = check_adaptive(controller, default, mode, rtol=rtol, atol=atol, h_init=h_init)
        self.order, self.rtol, self.atol, self.h_init, self.mode = order, float(rtol), float(atol), float(h_init), mode

    def run(self, x, grid, noise, *, schedule, mu=None):
        t_max, t_min = float(grid[0]), float(grid[-1])
        lam_max, lam_end = float(schedule.log_snr(t_max)), float(schedule.log_snr(t_min))
        if not (abs(lam_max) < float("inf") and abs(lam_end) < float("inf")):
            raise ValueError("mrs-adaptive steps in log-SNR, which must be finite at both ends: use t_min with "
                             "sigma > 0 (e.g. 1e-3) and, for rectified flow, t_max < 1 (e.g. 0.999)")
        b, dev, f64 = x.shape[0], x.device, torch.float64
        lam = torch.full((b,), lam_max, dtype=f64, device=dev)
        h = torch.full((b,), min(self.h_init, lam_end - lam_max), dtype=f64, device=dev)
        err_prev = torch.ones(b, dtype=f64, device=dev)
        accepted = torch.zeros(b, dtype=torch.long, device=dev)
        rejected = torch.zeros(b, dtype=torch.long, device=dev)
        grids = [[t_max] for _ in range(b)]
        x_prev = x.clone()
        tiny = 1e-12 * (lam_end - lam_max)
        it = 0

        while bool((lam < lam_end).any()):
            it += 1
            rows = (lam < lam_end).nonzero().squeeze(1)
            ls, hr = lam[rows], h[rows]
            if bool((hr < tiny).any()):
                raise RuntimeError(f"mrs-adaptive: the step size underflowed at log-SNR {float(ls.min()):.6g} "
                                   f"(rtol={self.rtol}, atol={self.atol}); loosen the tolerances")
            m = sub(mu, rows)
            xr, low, high, tt = yield from _pair(x[rows], ls, hr, m, schedule, self.order, rows, it)
            x_low = low if m is None else low + m
            x_high = high if m is None else high + m
            err = self.controller.error_norm(high - low, x_prev[rows], x_low, self.atol, self.rtol)
            if self.mode == "batch":
                err = err.max().expand_as(err)
            ok = err <= 1
            last = hr >= lam_end - ls - tiny
            lam_new = torch.where(ok, torch.where(last, torch.full_like(ls, lam_end), ls + hr), ls)
            h_new = torch.minimum(hr * self.controller.factor(err, err_prev[rows]), lam_end - lam_new)
            h_new = torch.where(lam_new >= lam_end, hr, h_new)
            okx = col(ok, xr).bool()
            x = x.index_copy(0, rows, torch.where(okx, x_high, xr))
            x_prev = x_prev.index_copy(0, rows, torch.where(okx, x_high, x_prev[rows]))
            err_prev = err_prev.index_copy(0, rows, torch.where(ok, err.clamp_min(1e-10), err_prev[rows]))
            lam, h = lam.index_copy(0, rows, lam_new), h.index_copy(0, rows, h_new)
            accepted[rows] += ok.long()
            rejected[rows] += (~ok).long()
            t_acc = torch.where(last, torch.full_like(tt, t_min), tt)
            for j, i in enumerate(rows.tolist()):
                if bool(ok[j]):
                    grids[i].append(float(t_acc[j]))
        stats = {"grids": grids}
        if self.mode == "batch":
            stats["grid"] = torch.tensor(grids[0], dtype=f64)
        return Outcome(x, accepted=accepted, rejected=rejected, stats=stats)


@register("dpmpp-3s", family="ode", order=3, calls_per_step=3, deterministic=True,
          description="singlestep DPM-Solver++(3S) / MRS on a fixed grid (mrs-adaptive's step; replays a pilot grid)",
          reference="Lu et al. 2023, DPM-Solver++ (singlestep); Li et al. 2025 (MR Sampler)")
class SinglestepMRS(Solver):
    """The higher-order solution of mrs-adaptive's pair (module docstring) on a fixed grid:
    ``order=3`` is DPM-Solver++(3S) (3 calls per step), ``order=2`` DPM-Solver++(2S) with r = 1/2
    (2 calls). A step that ends at sigma = 0 (infinite log-SNR) is first order: y = alpha_t x0_hat.
    Replaying a grid chosen by mrs-adaptive (:func:`pilot_grid`) gives the adaptive accuracy.
    """

    def __init__(self, order: int = 3):
        if order not in (2, 3):
            raise ValueError(f"order must be 2 or 3, got {order!r}")
        self.order = order

    def run(self, x, grid, noise, *, schedule, mu=None):
        b = x.shape[0]
        for i in range(len(grid) - 1):
            t, t_next = float(grid[i]), float(grid[i + 1])
            lam_s, lam_t = float(schedule.log_snr(t)), float(schedule.log_snr(t_next))
            if lam_t == float("inf"):  # to the clean end: first order (DDIM), one call
                pred = yield Query(x, t, step=i + 1)
                x = pred.point(float(schedule.alpha(t_next)), 0.0)
                continue
            ls = torch.full((b,), lam_s, dtype=torch.float64, device=x.device)
            hr = torch.full((b,), lam_t - lam_s, dtype=torch.float64, device=x.device)
            _, _, high, _ = yield from _pair(x, ls, hr, mu, schedule, self.order, None, i + 1)
            x = high if mu is None else high + mu
        return x


def pilot_grid(model, shape, *, seed: int = 0, mu=None, cond=None, grid=None, t_max=None, t_min=None,
               **options) -> Tensor:
    """Run mrs-adaptive once in batch mode on a small batch of ``shape`` and return the times it
    accepted: a grid for any fixed-grid solver (``dpmpp-3s`` replays the same steps) and for the
    diffusers scheduler (``set_timesteps(timesteps=...)``)."""
    from .driver import sample

    res = sample(model, "mrs-adaptive", shape=shape, seed=seed, mu=mu, cond=cond, grid=grid, t_max=t_max,
                 t_min=t_min, **{**options, "mode": "batch"})
    return res.stats["grid"]
