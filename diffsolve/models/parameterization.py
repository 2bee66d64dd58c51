"""The one place where network outputs are converted between parameterisations.

With y = x - mu and y_0 = x_0 - mu, every schedule reads y = alpha y_0 + sigma eps. Writing a', s'
for d alpha/dt and d sigma/dt and r = sqrt(alpha^2 + sigma^2):

    eps       the noise:                     eps
    x0        the clean data:                x_0 = mu + y_0
    v         v-prediction (Salimans & Ho):  v = (alpha eps - sigma y_0) / r
              (for VP, r = 1 and this is the usual v; elsewhere it is v of the normalised y / r)
    score     grad_x log p_t(x):             score = -eps / sigma
    velocity  probability-flow drift dx/dt:  velocity = a' y_0 + s' eps
              (= -f (x - mu) - g2/2 score; for rectified flow eps - x_0)

``to_x0_eps`` inverts each of these given x; ``from_x0_eps`` builds each from (x_0, eps). At
sigma = 0 an x_0 prediction gives eps = 0 (the limit for data with a density).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

Tensor = torch.Tensor

PREDICTIONS = ("eps", "x0", "v", "score", "velocity")


class Coefs(NamedTuple):
    """Schedule coefficients at the query time, already shaped to broadcast against x."""

    alpha: Tensor
    sigma: Tensor
    alpha_dot: Tensor | None = None
    sigma_dot: Tensor | None = None


def check_prediction(kind: str) -> str:
    if kind not in PREDICTIONS:
        raise ValueError(f"prediction {kind!r} is unknown; allowed: {', '.join(PREDICTIONS)}")
    return kind


def _need_dots(c: Coefs) -> tuple[Tensor, Tensor]:
    if c.alpha_dot is None or c.sigma_dot is None:
        raise ValueError("the 'velocity' parameterisation needs alpha_dot and sigma_dot in Coefs")
    return c.alpha_dot, c.sigma_dot


def to_x0_eps(kind: str, out: Tensor, x: Tensor, c: Coefs, mu: Tensor | float = 0.0) -> tuple[Tensor, Tensor]:
    """(x_0, eps) from a network output ``out`` of parameterisation ``kind`` at state ``x``."""
    zero = _is_zero(mu)
    y = x if zero else x - mu
    a, s = c.alpha, c.sigma
    if kind == "eps":
        eps = out
        y0 = (y - s * eps) / a
    elif kind == "x0":
        y0 = out if zero else out - mu
        # at sigma = 0 (the clean end) x_0 determines no eps: take its limit for data with a density,
        # E[eps | x_t] -> E[eps] = 0 (a masked division, so gradients stay finite)
        clean = s == 0
        eps = (y - a * y0) / torch.where(clean, torch.ones_like(s), s) * ~clean  # no host read of s
    elif kind == "v":
        r = torch.sqrt(a * a + s * s)
        at, st = a / r, s / r
        y0 = at * (y / r) - st * out
        eps = st * (y / r) + at * out
    elif kind == "score":
        eps = -s * out
        y0 = (y - s * eps) / a
    elif kind == "velocity":
        ad, sd = _need_dots(c)
        det = a * sd - s * ad
        y0 = (sd * y - s * out) / det
        eps = (a * out - ad * y) / det
    else:
        check_prediction(kind)
        raise AssertionError
    return (y0 if zero else y0 + mu), eps


def _is_zero(mu) -> bool:
    """mu is the scalar 0 (no mean reversion): its terms can be skipped, which saves passes over x."""
    return isinstance(mu, (int, float)) and mu == 0


def from_x0_eps(kind: str, x0: Tensor, eps: Tensor, c: Coefs, mu: Tensor | float = 0.0) -> Tensor:
    """The output of parameterisation ``kind`` that corresponds to (x_0, eps)."""
    a, s = c.alpha, c.sigma
    if kind == "eps":
        return eps
    if kind == "x0":
        return x0
    y0 = x0 - mu
    if kind == "v":
        r = torch.sqrt(a * a + s * s)
        return (a * eps - s * y0) / r
    if kind == "score":
        return -eps / s
    if kind == "velocity":
        ad, sd = _need_dots(c)
        return ad * y0 + sd * eps
    check_prediction(kind)
    raise AssertionError


def compose(x0: Tensor, eps: Tensor, alpha, sigma, mu: Tensor | float = 0.0) -> Tensor:
    """The forward-process point alpha x_0 + (1 - alpha) mu + sigma eps."""
    if _is_zero(mu):
        return alpha * x0 + sigma * eps
    return mu + alpha * (x0 - mu) + sigma * eps
