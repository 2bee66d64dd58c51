"""Tier 3 of :func:`diffsolve.optimize_grid`: the grid and the tuned model calls
(:mod:`diffsolve.models.tuned`) fitted together."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from ..models.tuned import tunable

Tensor = torch.Tensor


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
