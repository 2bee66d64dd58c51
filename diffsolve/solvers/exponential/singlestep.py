"""Singlestep DPM-Solver++ / MR Sampler on a fixed grid: ``dpmpp-3s``.

A step from lambda_s by h evaluates the model at intermediate log-SNRs lambda_s + r h and combines
the outputs with the weights of :func:`.maths.ode_weights_expm1` (the 2S and 3S rules are written out
in :mod:`.adaptive`, whose singlestep pairs these steps are: Lu et al. 2023, DPM-Solver++ singlestep;
Li et al. 2025, MRS, for the mean-reverting form y = x - mu). Replaying the grid mrs-adaptive accepted
(:func:`.adaptive.pilot_grid` with ``method="singlestep"``) gives the adaptive run's accuracy.
"""

from __future__ import annotations

import math
from functools import partial

import torch

from ...core.options import Option
from ...core.protocol import Query, Solver, per_row
from ...core.registry import register
from .maths import at_log_snr, model_output, ode_weights_expm1, raw_output, shift_output

Tensor = torch.Tensor


def first_call(x: Tensor, ts: Tensor, rows, it, q, cached):
    """The model's q at the start of a try: ``cached`` = (q, fresh) reuses the q of rows whose last
    try was rejected (their state and time are unchanged) and queries only the ``fresh`` rows.
    Returns (the state the model saw, q)."""
    if cached is None:
        pred = yield Query(x, ts, rows=rows, step=it)
        return pred.x, q(pred)
    q_old, fresh = cached
    idx = fresh.nonzero().squeeze(1)
    if len(idx) == 0:
        return x, q_old
    sel = rows[idx] if rows is not None else idx
    pred = yield Query(x[idx], ts[idx], rows=sel, step=it)
    return x.index_copy(0, idx, pred.x), q_old.index_copy(0, idx, q(pred))


def singlestep_pair(
    x: Tensor, ls: Tensor, hr: Tensor, m, schedule, order: int, rows, it, param: str = "data", cached=None
):
    """One try from log-SNR ``ls`` by ``hr`` (per row): yields the model queries and returns
    (the state the model saw, the model output at the start, low-order y, high-order y, the end time). The 2S / 3S
    rules are written out in :mod:`.adaptive`'s docstring, whose embedded pairs these are; ``cached``: see :func:`first_call`.
    ``order`` 3: (2S with r = 1/3, 3S), 3 calls; 2: (first order, 2S with r = 1/2), 2 calls; 1: the
    first-order step as both (DDIM / DPM-Solver-1), 1 call."""

    at = partial(at_log_snr, schedule)
    out = partial(raw_output, param=param)  # the model output the solver uses (cached raw: mu is per row)

    ts, a_s, s_s = at(ls)
    xr, raw = yield from first_call(x, ts, rows, it, out, cached)
    q_s = shift_output(raw, m, param)
    y = xr if m is None else xr - m
    tt, a_t, s_t = at(ls + hr)
    w = ode_weights_expm1(param, a_t, s_t, a_s, s_s, hr)  # y_t = decay y_s + w0 q_s + w1 D1
    y1 = per_row(w.decay, y) * y + per_row(w.w0, y) * q_s
    if order == 1:
        return xr, raw, y1, y1, tt
    r1 = 0.5 if order == 2 else 1.0 / 3.0
    t1, a1, s1 = at(ls + r1 * hr)
    w_1 = ode_weights_expm1(param, a1, s1, a_s, s_s, r1 * hr)
    u1 = per_row(w_1.decay, y) * y + per_row(w_1.w0, y) * q_s
    q_1 = model_output((yield Query(u1 if m is None else u1 + m, t1, rows=rows, step=it)), m, param)
    y2 = y1 + per_row(w.w0 / (2 * r1), y) * (q_1 - q_s)
    if order == 2:
        return xr, raw, y1, y2, tt
    r2 = 2.0 / 3.0
    t2, a2, s2 = at(ls + r2 * hr)
    w_2 = ode_weights_expm1(param, a2, s2, a_s, s_s, r2 * hr)
    u2 = per_row(w_2.decay, y) * y + per_row(w_2.w0, y) * q_s + per_row(w_2.w1 * (r2 / r1), y) * (q_1 - q_s)
    q_2 = model_output((yield Query(u2 if m is None else u2 + m, t2, rows=rows, step=it)), m, param)
    return xr, raw, y2, y1 + per_row(w.w1 / r2, y) * (q_2 - q_s), tt


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
            _, _, _, high, _ = yield from singlestep_pair(x, ls, hr, mu, schedule, self.order, None, i + 1)
            x = high if mu is None else high + mu
        return x
