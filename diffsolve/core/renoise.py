"""ReNoise inversion (Garibi et al., ECCV 2024): DDIM inversion refined by fixed-point iteration.

DDIM inversion takes the step t_k -> t_{k+1} (towards noise) with the noise predicted at the *current*
point; exact inversion of DDIM sampling needs it at the *next* point, z_{k+1} = inv(z_k, eps(z_{k+1})),
an implicit relation. ReNoise iterates it and averages the predictions. In the noise form
(y = (x - mu)/alpha, s = sigma/alpha, where a DDIM step is y + (s' - s) eps):

    z^(0)  = y_k + (s_{k+1} - s_k) eps(y_k, t_k)                         (plain DDIM inversion)
    eps_j  = eps(z^(j-1), t_{k+1}),  z^(j) = y_k + (s_{k+1} - s_k) eps_j,  j = 1..K
    y_{k+1} = y_k + (s_{k+1} - s_k) mean(eps_j, j in the averaging window)

Defaults are the paper's (SDXL-Turbo): K = 9 renoising steps averaged over iterations 8..9
(``average=(8, 10)``, Python range), and in the first quarter of the time range (the paper's
t < 250 of 1000) K = 5 averaged over all of them. Cost per step: 1 + K model calls.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .protocol import Outcome, Query


@dataclass(frozen=True)
class ReNoise:
    """ReNoise's settings (see the module docstring)."""

    steps: int = 9
    average: tuple[int, int] = (8, 10)
    first_steps: int = 5
    first_average: tuple[int, int] = (0, 5)
    first_fraction: float = 0.25

    def __post_init__(self):
        for name, k, (lo, hi) in (
            ("steps", self.steps, self.average),
            ("first_steps", self.first_steps, self.first_average),
        ):
            if isinstance(k, bool) or not isinstance(k, int) or k < 1:
                raise ValueError(f"renoise {name} must be an integer >= 1, got {k!r}")
            if not 0 <= lo < hi or lo >= k:
                raise ValueError(f"renoise averaging window {(lo, hi)} must pick some of the {k} iterations")

    def run(self, x, grid, schedule, mu=None):
        """A generator: inverts data x at grid[-1] to grid[0] (grid descending); returns Outcome(x_T)."""
        g = grid.to(torch.float64)
        alpha = schedule.alpha(g)
        if not bool((alpha > 0).all()):
            raise ValueError(
                "t_max: ReNoise works in y = x / alpha: every grid time needs alpha > 0 "
                "(lower t_max, e.g. t_max=0.999 for rectified flow)"
            )
        s = schedule.sigma(g) / alpha
        n = len(g) - 1
        span = float(g[0] - g[-1])

        def to_x(y, i):
            xx = float(alpha[i]) * y
            return xx if mu is None else xx + mu

        y = (x if mu is None else x - mu) / float(alpha[n])
        for step, i in enumerate(range(n, 0, -1), start=1):  # grid index i (data side) -> i - 1
            h = float(s[i - 1] - s[i])
            pred = yield Query(to_x(y, i), float(g[i]), step=step)
            z = y + h * pred.eps
            first = float(g[i - 1] - g[-1]) < self.first_fraction * span
            k, (lo, hi) = (self.first_steps, self.first_average) if first else (self.steps, self.average)
            eps_sum, count = torch.zeros_like(y), 0
            for j in range(k):
                pred = yield Query(to_x(z, i - 1), float(g[i - 1]), step=step)
                z = y + h * pred.eps
                if lo <= j < hi:
                    eps_sum, count = eps_sum + pred.eps, count + 1
            y = y + h * eps_sum / count
        return Outcome(to_x(y, 0))
