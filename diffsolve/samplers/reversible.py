"""Algebraically reversible solvers of the probability-flow ODE: exact inversion.

They work in the noise form of the ODE (the variables in which DDIM is an Euler step):

    y = (x - mu) / alpha,    s = sigma / alpha,    dy/ds = eps_hat(x, t),    x = alpha y + mu,

and carry a second state, so that each step can be undone in closed form with forward model calls
only. :func:`diffsolve.invert` runs the inverse from the data and returns both states as a
:class:`~diffsolve.Latent`; sampling from it reproduces the data to round-off.
"""

from __future__ import annotations

import torch

from .base import Outcome, Query, Solver
from .registry import register

Tensor = torch.Tensor


class _NoiseForm:
    """Conversions between x at grid time t and the noise-form state y, and the field eps_hat."""

    def __init__(self, grid: Tensor, schedule, mu):
        g = grid.to(torch.float64)
        self.t = g
        self.alpha = schedule.alpha(g)
        self.s = schedule.sigma(g) / self.alpha
        self.mu = mu

    def y(self, x: Tensor, i: int) -> Tensor:
        return (x if self.mu is None else x - self.mu) / float(self.alpha[i])

    def x(self, y: Tensor, i: int) -> Tensor:
        x = float(self.alpha[i]) * y
        return x if self.mu is None else x + self.mu

    def field(self, y: Tensor, i: int, step: int):
        """Yields a query at grid point i; returns eps_hat there (a generator helper)."""
        pred = yield Query(self.x(y, i), float(self.t[i]), step=step)
        return pred.eps

    def ds(self, i: int, j: int) -> float:
        return float(self.s[j] - self.s[i])


@register("rev-heun", family="reversible", order=2, calls_per_step=1, deterministic=True, invertible=True,
          description="reversible Heun (Kidger et al.): second-order, exactly invertible, 1 call per step",
          reference="Kidger, Foster, Li, Lyons 2021, Efficient and Accurate Gradients for Neural SDEs (NeurIPS)")
class ReversibleHeun(Solver):
    """Reversible Heun on the noise-form ODE dy/ds = f(y, s) = eps_hat. State (y, z), z_0 = y_0 unless
    a latent gives it; with h = s_{n+1} - s_n and f_n = f(z_n, s_n):

        z_{n+1} = 2 y_n - z_n + h f_n
        y_{n+1} = y_n + (h / 2) (f_n + f(z_{n+1}, s_{n+1}))

    Inverse step (one call): z_n = 2 y_{n+1} - z_{n+1} - h f_{n+1};  y_n = y_{n+1} - (h / 2)(f_n + f_{n+1}).
    Second order; N + 1 model calls for N steps. Its linear stability is leapfrog's (neutral only on the
    imaginary axis): the difference y - z is a parasitic mode that grows where the flow contracts.
    """

    def __init__(self):
        pass

    def run(self, x, grid, noise, *, schedule, mu=None, aux=None):
        nf = _NoiseForm(grid, schedule, mu)
        n = len(grid) - 1
        y = nf.y(x, 0)
        z = y if aux is None else nf.y(aux, 0)
        f = yield from nf.field(z, 0, 1)
        for i in range(n):
            h = nf.ds(i, i + 1)
            z = 2 * y - z + h * f
            f_next = yield from nf.field(z, i + 1, i + 1)
            y = y + 0.5 * h * (f + f_next)
            f = f_next
        return nf.x(y, n)

    def run_inverse(self, x, grid, noise, *, schedule, mu=None):
        """From data at grid[-1] (z = y) back to the pair at grid[0]; returns Outcome(x_T, aux=z_T)."""
        nf = _NoiseForm(grid, schedule, mu)
        n = len(grid) - 1
        y = z = nf.y(x, n)
        f = yield from nf.field(z, n, n)
        for i in range(n - 1, -1, -1):
            h = nf.ds(i, i + 1)
            z = 2 * y - z - h * f
            f_prev = yield from nf.field(z, i, i + 1)
            y = y - 0.5 * h * (f_prev + f)
            f = f_prev
        return Outcome(nf.x(y, 0), stats={"aux": nf.x(z, 0)})
