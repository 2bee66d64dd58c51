"""Tuned model calls: the answer a solver gets at a grid time, made from the model asked at another time.

A few-step solver's error is mostly truncation error, and two numbers per model call can absorb much
of it without touching the solver's update (so any registered solver can use them): the time the
network is asked at, tau_i, decoupled from the grid time t_i the solver steps from (LD3, Tong et al.
2025, learns the same "time fed to the network"), and a weight gamma_i between the network's clean
data prediction and the state's own. A query at (x, t_i) is answered with

    x0 = gamma_i D(x, tau_i) + (1 - gamma_i) x0(x, t_i; eps = 0),

where D(x, tau) is the model's clean-data prediction asked at tau and x0(x, t; eps = 0) = (x - (1 -
alpha_t) mu) / alpha_t is the clean data x stands for when it holds no noise. Its noise prediction,
the consistent one at t_i, is then gamma_i times the one D implies there, (x - alpha_t D) / sigma_t
(mu = 0): gamma is the epsilon scaling of Ning et al. (2024, "Elucidating the Exposure Bias in
Diffusion Models"), fitted per call instead of one schedule. tau_i = t_i and gamma_i = 1 change
nothing. :func:`diffsolve.optimize_grid` fits both with the grid (``tune_calls=True``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from ..guidance.wrappers import GuidedModel
from ..models.model import DiffusionModel, Prediction
from ..schedules.base import as_time

Tensor = torch.Tensor


def tuned_prediction(pred: Prediction, x: Tensor, t, weight: float) -> Prediction:
    """The answer at (x, t) made from ``pred`` (the model's answer for x asked at another time) with
    data weight ``weight`` (module docstring)."""
    x0 = pred.x0
    if weight != 1.0:
        own = Prediction(x, t, torch.zeros_like(x), "eps", pred.schedule, pred.mu).x0  # x0(x, t; eps = 0)
        x0 = weight * x0 + (1.0 - weight) * own
    return Prediction(x, t, x0, "x0", pred.schedule, pred.mu)


def tunable(schedule, t: float) -> bool:
    """Whether a call at ``t`` can be tuned: its log-SNR is finite (alpha > 0 and sigma > 0)."""
    return math.isfinite(float(schedule.log_snr(torch.tensor(float(t), dtype=torch.float64))))


class TunedCalls(GuidedModel):
    """``model`` with its calls at the times of ``grid`` tuned (module docstring): a query at
    ``grid[i]`` asks ``model`` at ``model_times[i]`` and mixes with ``data_weights[i]``; queries at other
    times (a multi-stage solver's intermediate times) pass through. Model calls are counted as the
    wrapped model's."""

    def __init__(
        self,
        model: DiffusionModel,
        grid: Sequence[float],
        model_times: Sequence[float],
        data_weights: Sequence[float],
    ):
        super().__init__(model)
        if not len(grid) == len(model_times) == len(data_weights):
            raise ValueError(
                f"model_times and data_weights need one entry per grid time ({len(grid)}), got "
                f"{len(model_times)} and {len(data_weights)}"
            )
        self.table: Mapping[float, tuple[float, float]] = {
            float(t): (float(tau), float(w)) for t, tau, w in zip(grid, model_times, data_weights)
        }
        for t, (tau, w) in self.table.items():
            if not (math.isfinite(tau) and math.isfinite(w)):
                raise ValueError(f"model_times and data_weights must be finite, got {tau} and {w} at t={t:.6g}")
            if (tau != t or w != 1.0) and not tunable(self.schedule, t):
                raise ValueError(f"the call at t={t:.6g} cannot be tuned (alpha or sigma is 0 there)")

    def __call__(self, x, t, *, mu=None, counter=None, index=None, **cond):
        tt = as_time(t)
        entry = self.table.get(float(tt)) if tt.ndim == 0 else None
        if entry is None or entry == (float(tt), 1.0):
            return self.inner(x, t, mu=mu, counter=counter, index=index, **cond)
        tau, weight = entry
        pred = self.inner(x, tau, mu=mu, counter=counter, index=index, **cond)
        return tuned_prediction(pred, x, t, weight)


def fit_calls(
    student,
    check,
    schedule,
    grid: Sequence[float],
    target: Tensor,
    check_target: Tensor,
    score,
    end: float | None = None,
    rounds: int = 4,
    evaluations: int = 150,
) -> tuple[list[float], list[float], list[float], dict]:
    """Tier 3 of :func:`diffsolve.optimize_grid`: the grid and the tuned calls together, by Nelder-Mead
    on the fitting batch (``student`` / ``target``, students of :mod:`diffsolve.optimize.search`),
    early-stopped on the held-out batch (``check`` / ``check_target``). Parameters, all starting at 0:
    the log-SNR shift of each interior time of ``grid`` (and of its last time where it stops above
    ``end``), and for each grid time the solver queries (with a finite log-SNR) the log-SNR shift of
    its model time and the log of its data weight. A round is one Nelder-Mead run of at most
    ``evaluations`` per parameter from the best point so far; after each the held-out error is
    measured, and the rounds stop when it no longer falls (at most ``rounds``). Returns (grid,
    model_times, data_weights, record); with no round better on held-out noise than the start, the
    start (untuned)."""
    import numpy as np
    from scipy.optimize import minimize

    from .search import _log_snr_maps  # the search module imports this one

    lam, time_of = _log_snr_maps(schedule)
    grid = [float(t) for t in grid]
    n = len(grid) - 1
    student.asked.clear()
    student.tuning = {}
    start_fit = score(student.run(grid), target)
    moving = list(range(1, n)) + ([n] if end is not None and grid[-1] > end else [])
    asked = [i for i, t in enumerate(grid) if t in student.asked and tunable(schedule, t)]
    finite = [lam(t) for t in grid if math.isfinite(lam(t))]
    lo_l, hi_l = min(finite), max(finite)  # the model times stay inside the grid's range
    base = [lam(t) for t in grid]

    def decode(p) -> tuple[list[float], dict[float, tuple[float, float]]] | None:
        g = list(grid)
        for k, i in enumerate(moving):
            g[i] = time_of(base[i] + float(p[k]))
        if any(not a > b for a, b in zip(g, g[1:])) or (n in moving and end is not None and not g[-1] > end):
            return None
        table = {}
        for k, i in enumerate(asked):
            shift, log_w = float(p[len(moving) + 2 * k]), float(p[len(moving) + 2 * k + 1])
            v = min(max(lam(g[i]) + shift, lo_l), hi_l)
            table[g[i]] = (time_of(v) if shift else g[i], math.exp(log_w))
        return g, table

    def error(p, st, tgt) -> float:
        decoded = decode(p)
        if decoded is None:
            return math.inf
        st.tuning = decoded[1]
        try:
            return score(st.run(decoded[0]), tgt)
        except (ArithmeticError, ValueError):  # a grid the solver cannot step
            return math.inf
        finally:
            st.tuning = {}

    dim = len(moving) + 2 * len(asked)
    best = np.zeros(dim)
    check.tuning = {}
    best_held = score(check.run(grid), check_target)
    history = [{"round": 0, "fit_error": start_fit, "heldout_error": best_held}]
    if dim == 0:  # nothing to tune (no call at a finite log-SNR, no interior time)
        return grid, grid, [1.0] * len(grid), {"rounds": history, "fit_error": start_fit, "heldout_error": best_held}
    student.memo = check.memo = False
    cur, scale = best.copy(), 0.15
    try:
        for r in range(1, rounds + 1):
            simplex = np.vstack([cur] + [cur + scale * e for e in np.eye(dim)])
            res = minimize(
                lambda p: error(p, student, target),
                cur,
                method="Nelder-Mead",
                options={
                    "initial_simplex": simplex,
                    "maxfev": evaluations * dim,
                    "adaptive": True,
                    "xatol": 1e-4,
                    "fatol": 1e-7,
                },
            )
            cur = res.x
            held = error(cur, check, check_target)
            history.append(
                {"round": r, "fit_error": float(res.fun), "heldout_error": held, "evaluations": int(res.nfev)}
            )
            if not held < best_held:
                break
            best, best_held = cur.copy(), held
            scale /= 2
    finally:
        student.memo = check.memo = True
    decoded = decode(best)
    assert decoded is not None
    g, table = decoded
    times = [table.get(t, (t, 1.0))[0] for t in g]
    weights = [table.get(t, (t, 1.0))[1] for t in g]
    fit_err = error(best, student, target)
    return g, times, weights, {"rounds": history, "fit_error": fit_err, "heldout_error": best_held}
