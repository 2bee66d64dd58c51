"""The one schedule form every forward process in diffsolve is written in.

    x_t = alpha(t) * x_0 + (1 - alpha(t)) * mu + sigma(t) * eps,      eps ~ N(0, I)

``mu = 0`` for VP, sub-VP, VE, EDM and rectified flow; ``mu`` is the condition (the degraded
signal) for mean-reverting diffusion. Writing ``y = x - mu`` turns every schedule into the familiar
``y_t = alpha y_0 + sigma eps``, which is why one set of solvers serves all of them.

Derived quantities (all computed here and nowhere else):

    lambda(t) = log(alpha / sigma)                  half log-SNR, strictly decreasing in t
    f(t)      = -d log alpha / dt                   drift rate:  dx = f (mu - x) dt + g dw
    g2(t)     = -2 sigma^2 d lambda / dt            squared diffusion, so that
                d sigma^2/dt = -2 f sigma^2 + g2

A subclass implements ``alpha`` and ``sigma`` (and may give closed-form time derivatives and a
closed-form ``t_of_log_snr``); everything else follows. Times run from ``t_min`` (data) to ``t_max``
(prior); samplers integrate from ``t_max`` down to ``t_min``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

Tensor = torch.Tensor


def as_time(t, like: Tensor | None = None) -> Tensor:
    """Return ``t`` as a float64 tensor (on the device of ``like`` when given)."""
    if isinstance(t, Tensor):
        if t.dtype != torch.float64 and t.device.type != "mps":
            t = t.to(torch.float64)
        return t
    device = like.device if like is not None else None
    return torch.as_tensor(t, dtype=torch.float64, device=device)


def memoised(owner, table: str, key, make):
    """``owner``'s cached value for ``key`` in its table ``table`` (made by ``make()`` on first use;
    a table is cleared when it outgrows 65536 entries)."""
    memo = owner.__dict__.setdefault(table, {})
    v = memo.get(key)
    if v is None:
        if len(memo) > 65536:
            memo.clear()
        v = memo[key] = make()
    return v


class Schedule:
    """Base class of a forward process ``x_t = alpha x_0 + (1 - alpha) mu + sigma eps``.

    Subclasses set ``t_min``/``t_max`` and implement :meth:`alpha` and :meth:`sigma`. The time
    derivatives default to exact automatic differentiation of those two functions, and
    :meth:`t_of_log_snr` defaults to a bisection on the (monotone) log-SNR.
    """

    #: smallest time a sampler integrates to (the data end)
    t_min: float = 0.0
    #: largest time (the prior end)
    t_max: float = 1.0
    #: the grid kind the driver uses when the user names none (see :mod:`diffsolve.schedules.grids`)
    default_grid: str = "log-snr"

    # ----------------------------------------------------------------- to implement
    def alpha(self, t) -> Tensor:
        """Coefficient of x_0 in x_t."""
        raise NotImplementedError

    def sigma(self, t) -> Tensor:
        """Standard deviation of the noise in x_t."""
        raise NotImplementedError

    # ----------------------------------------------------------------- derived
    def at(self, t: float) -> tuple[float, float]:
        """(alpha, sigma) at one time, as Python floats, memoised per schedule: fixed-grid solvers
        and the model wrapper ask for the same few grid times at every step, and a tensor evaluation
        per ask is most of a step's cost outside the model."""

        def make():
            tt = torch.tensor(float(t), dtype=torch.float64)
            return float(self.alpha(tt)), float(self.sigma(tt))

        return memoised(self, "_at_memo", t, make)

    def _derivative(self, fn, t) -> Tensor:
        t = as_time(t).detach()
        shape = t.shape
        with torch.enable_grad():
            tt = t.reshape(-1).clone().requires_grad_(True)
            out = fn(tt)
            (grad,) = torch.autograd.grad(out.sum(), tt)
        return grad.reshape(shape)

    def alpha_dot(self, t) -> Tensor:
        """d alpha / dt."""
        return self._derivative(self.alpha, t)

    def sigma_dot(self, t) -> Tensor:
        """d sigma / dt."""
        return self._derivative(self.sigma, t)

    def log_snr(self, t) -> Tensor:
        """lambda(t) = log(alpha(t) / sigma(t)) (half log-SNR)."""
        t = as_time(t)
        return torch.log(self.alpha(t)) - torch.log(self.sigma(t))

    def f(self, t) -> Tensor:
        """Drift rate f(t) = -d log alpha / dt of  dx = f (mu - x) dt + g dw."""
        t = as_time(t)
        return -self.alpha_dot(t) / self.alpha(t)

    def g2(self, t) -> Tensor:
        """Squared diffusion g(t)^2 = d sigma^2/dt + 2 f sigma^2 = -2 sigma^2 d lambda/dt."""
        t = as_time(t)
        s = self.sigma(t)
        return 2.0 * s * self.sigma_dot(t) + 2.0 * self.f(t) * s * s

    def t_of_log_snr(self, lam) -> Tensor:
        """Inverse of :meth:`log_snr` (bisection unless a subclass gives a closed form)."""
        lam = as_time(lam)
        lo = torch.full_like(lam, self._t_lo())
        hi = torch.full_like(lam, self._t_hi())
        for _ in range(100):  # 100 halvings reach float64 resolution on any bounded interval
            mid = 0.5 * (lo + hi)
            above = self.log_snr(mid) > lam  # log-SNR decreases in t: the root lies later
            lo = torch.where(above, mid, lo)
            hi = torch.where(above, hi, mid)
        return 0.5 * (lo + hi)

    @property
    def time_range(self) -> tuple[float, float]:
        """The times a run may use, [0, t_max]: grids and ``t_max`` / ``t_min`` outside it are refused
        (build the schedule with a larger ``t_max`` to start later)."""
        return 0.0, float(self.t_max)

    def _t_lo(self) -> float:
        return self.t_min

    def _t_hi(self) -> float:
        return self.t_max

    def prior(
        self,
        shape: Sequence[int] | None = None,
        mu: Tensor | float | None = None,
        noise: Tensor | None = None,
        t: float | None = None,
    ) -> Tensor:
        """The prior state x_T = mu + sigma(T) * noise at T = ``t`` (default ``t_max``).

        The alpha(T) (x_0 - mu) term of the marginal is dropped (it is small where samplers start).
        ``noise`` is a standard normal tensor made by the caller's noise source; ``shape``, when
        given, is checked against it.
        """
        if noise is None:
            raise ValueError("prior(): pass `noise`, a standard normal tensor (see diffsolve.core.noise)")
        if shape is not None and tuple(noise.shape) != tuple(shape):
            raise ValueError(f"prior(): noise has shape {tuple(noise.shape)}, expected {tuple(shape)}")
        x = float(self.sigma(self.t_max if t is None else t)) * noise
        return x if mu is None else x + mu

    def sampling_scale(self, t: float) -> float:
        """The scale c(t) of the variable y = (x - mu)/c in which k-diffusion-style samplers step
        against the noise level sigma/c: alpha for diffusion schedules (EDM's and diffusers' x/alpha
        against sigma/alpha), 1 for rectified flow (diffusers' FlowMatch schedulers step x against
        sigma = t)."""
        return self.at(t)[0]

    # ----------------------------------------------------------------- network time
    def timestep(self, t) -> Tensor:
        """The time value a network trained on this schedule was conditioned on (default: t)."""
        return as_time(t)

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in self._repr_fields().items())
        return f"{type(self).__name__}({fields})"

    def _repr_fields(self) -> dict:
        return {"t_min": self.t_min, "t_max": self.t_max}


def check_range(
    name: str, value: float, low: float | None = None, high: float | None = None, strict_low: bool = True
) -> float:
    """Validate a scalar schedule parameter; raise a ValueError naming it."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if low is not None and (value <= low if strict_low else value < low):
        raise ValueError(f"{name} must be {'>' if strict_low else '>='} {low}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}, got {value}")
    return value


def check_times(t_min: float, t_max: float, lo: float = 0.0, hi: float = math.inf) -> tuple[float, float]:
    t_min = check_range("t_min", t_min, lo, None, strict_low=False)
    t_max = check_range("t_max", t_max, None, hi)
    if not t_min < t_max:
        raise ValueError(f"t_min must be < t_max, got t_min={t_min}, t_max={t_max}")
    return t_min, t_max
