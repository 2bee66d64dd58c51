"""Restart sampling (Xu, Deng, Cheng, Tian, Liu & Jaakkola 2023, "Restart Sampling for Improving
Generative Processes", NeurIPS, arXiv 2306.14878): EDM Heun steps on the probability-flow ODE, with
restart intervals where the state is noised forward to a higher level and the interval solved again.

Notation as :mod:`diffsolve.solvers.ode.dpm2`: y = (x - mu)/alpha against the EDM noise level
s = sigma/alpha, in which y = (x0 - mu) + s eps is a variance-exploding process; z ~ N(0, I).
"""

from __future__ import annotations

import json
import math

from ...core.options import Option
from ...core.protocol import Query, Solver
from ...core.registry import register
from ..exponential.maths import alpha_sigma
from ..ode.dpm2 import ScaledVariables, noise_level
from ..ode.euler_heun import S_TMAX, S_TMIN, _check_churn, _churn, _sigma_derivative, _sigma_step

#: the paper's example configuration (the official code's README, CIFAR-10): one interval
#: [t_min, t_max] = [0.06, 0.30] in EDM noise level, 3 points (2 Heun steps), restarted K = 2 times
PAPER_RESTARTS = ((3, 2, 0.06, 0.30),)


def restart_list(value) -> tuple[tuple[int, int, float, float], ...]:
    """The ``restarts`` option as a tuple of (n, K, s_min, s_max): a list of such 4-lists (the
    official code's ``restart_info`` values [N_Restart, K, t_min, t_max]), or its JSON text (a list, or
    the official code's dict of them)."""
    if isinstance(value, str):
        value = json.loads(value)
    if isinstance(value, dict):
        value = [value[k] for k in sorted(value, key=lambda k: int(k))]
    out = []
    for item in value:
        if not isinstance(item, (list, tuple)) or len(item) != 4:
            raise ValueError(f"each restart must be [n, K, s_min, s_max], got {item!r}")
        n, k, lo, hi = item
        if isinstance(n, bool) or isinstance(k, bool) or int(n) != n or int(k) != k or n < 2 or k < 0:
            raise ValueError(f"a restart's n (points, >= 2) and K (repeats, >= 0) are integers, got {item!r}")
        lo, hi = float(lo), float(hi)
        if not (0 <= lo < hi and math.isfinite(hi)):
            raise ValueError(f"a restart interval needs 0 <= s_min < s_max < inf, got {item!r}")
        out.append((int(n), int(k), lo, hi))
    return tuple(out)


def karras_levels(s_hi: float, s_lo: float, n: int, rho: float) -> list[float]:
    """n noise levels from s_hi down to s_lo, uniform in s^(1/rho) (EDM's discretisation, Karras et
    al. 2022 eq. 5, without the appended 0)."""
    a, b = s_hi ** (1.0 / rho), s_lo ** (1.0 / rho)
    return [(a + i / (n - 1) * (b - a)) ** rho for i in range(n)]


@register(
    "restart",
    family="sde",
    order=2,
    calls_per_step=2,
    deterministic=False,
    description="Restart sampling: EDM Heun with intervals re-noised forward and re-solved K times",
    reference="Xu et al. 2023, Restart Sampling for Improving Generative Processes (NeurIPS, arXiv 2306.14878)",
)
class Restart(Solver):
    """Restart sampling (Xu et al. 2023, Algorithm 1, as the official code steps it). The main
    backward process is EDM's Heun (``heun`` with s_churn = 0) on the run's grid, in y = (x - mu)/alpha
    against s = sigma/alpha. Each restart [n, K, s_min, s_max] is attached to the grid point t_k whose
    level s_k is nearest s_min (the official code's rounding). When the main process reaches t_k,
    K times:

        y <- y + s_noise sqrt(s_max^2 - s_k^2) z                     (forward: level s_k -> s_max, exact)
        n - 1 Heun steps from s_max down to s_k on the EDM grid
            s_j = (s_max^(1/rho) + j/(n-1) (s_k^(1/rho) - s_max^(1/rho)))^rho,   j = 0 .. n-1

    then the main process goes on from t_k. With ``restart_gamma`` > 0 each restart Heun step is first
    churned as EDM's Algorithm 2 (``heun``'s churn with gamma = restart_gamma where s_tmin <= s <= s_tmax),
    as the official code does (its README runs gamma = 0.05, s_tmin = 0.01, s_tmax = 1, s_noise = 1.003).
    The forward step is the exact transition of the
    variance-exploding process in y, so re-noising keeps the right marginal while the repeated
    backward ODE contracts the error accumulated so far (the paper's argument). With no restarts
    (``restarts=[]`` or K = 0) this is ``heun``. A Heun step ending at sigma = 0 is Euler (one call).

    Model calls: those of ``heun`` on the grid plus, per restart, K (n - 1) Heun steps (2 calls each;
    1 for a step ending at sigma = 0). An interval with s_max <= s_k is skipped (nothing to redo).
    The ODE steps are second order; the law of the samples converges with them.
    """

    restarts = Option(
        PAPER_RESTARTS,
        "the restart intervals [n, K, s_min, s_max] (n points of the restart grid, K repeats, EDM noise "
        "levels sigma/alpha): a list of 4-lists or its JSON text; default the paper's [[3, 2, 0.06, 0.30]]",
        types=(list, tuple, str),
        what="a list of [n, K, s_min, s_max]",
        convert=restart_list,
    )
    s_noise = Option(1.0, "a scale on the restart (and churn) noise (the official code's S_noise)", low=0.0)
    rho = Option(7.0, "the exponent of the restart intervals' EDM grid", low=0.0, low_open=True)
    restart_gamma = Option(
        0.0, "EDM churn gamma of the restart intervals' Heun steps (the official code's restart_gamma)", low=0.0
    )
    s_tmin = S_TMIN
    s_tmax = S_TMAX

    check_options = _check_churn

    def noise_options(self):
        return {"restarts": self.restarts} if any(k > 0 for _, k, _, _ in self.restarts) else {}

    def run(self, x, grid, noise, *, schedule, mu=None):
        maps = ScaledVariables(schedule, mu)
        n = len(grid) - 1
        levels = [noise_level(schedule, float(t)) for t in grid]
        plan: dict[int, list[tuple[int, int, float]]] = {}
        for pts, k, lo, hi in self.restarts:
            idx = min(range(len(levels)), key=lambda j: abs(levels[j] - lo))
            if k > 0 and idx > 0 and hi > levels[idx]:
                plan.setdefault(idx, []).append((pts, k, hi))
        for i in range(n):
            t, t_next = float(grid[i]), float(grid[i + 1])
            x = yield from heun_step(x, t, t_next, schedule, mu, i + 1)
            for pts, k, hi in plan.get(i + 1, ()):
                s_lo = levels[i + 1]
                sub = karras_levels(hi, s_lo, pts, self.rho)
                times = [maps.t(s) for s in sub[:-1]] + [t_next]
                scale = self.s_noise * math.sqrt(hi**2 - s_lo**2)
                for _ in range(k):
                    y = maps.y(x, t_next) + scale * noise.randn()
                    x = maps.x(y, times[0])
                    for j in range(pts - 1):
                        x, t_hat = _churn(self, x, times[j], self.restart_gamma, schedule, mu, noise)
                        x = yield from heun_step(x, t_hat, times[j + 1], schedule, mu, i + 1)
        return x


def heun_step(x, t: float, t_next: float, schedule, mu, step: int):
    """One step of ``heun`` (s_churn = 0, space='sigma') from (x, t) to t_next; Euler into sigma = 0."""
    pred = yield Query(x, t, step=step)
    x_hat = pred.x
    d = _sigma_derivative(pred, t, schedule)
    x = _sigma_step(x_hat, t, t_next, d, schedule, mu)
    if alpha_sigma(schedule, t_next)[1] > 0:
        pred2 = yield Query(x, t_next, step=step)
        x = _sigma_step(x_hat, t, t_next, 0.5 * (d + _sigma_derivative(pred2, t_next, schedule)), schedule, mu)
    return x
