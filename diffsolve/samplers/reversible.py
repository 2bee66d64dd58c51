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


class _TwoLevel(Solver):
    """Two-time-level reversible schemes on the noise form, one model call per step. With u_k the state
    at grid point k (k = 0 the noise end) and e_k = eps_hat(u_k):

        u_1     = u_0 + (s_1 - s_0) e_0                              (a DDIM step)
        u_{k+1} = P_k u_{k-1} + Q_k u_k + R_k e_k,                   k >= 1
        inverse u_{k-1} = (u_{k+1} - Q_k u_k - R_k e_k) / P_k

    Inversion starts from the data u_n and one DDIM-inversion step u_{n-1} = u_n + (s_{n-1} - s_n) e_n,
    and returns the pair (u_0, u_1) (``Latent.x``, ``Latent.aux``; aux at grid[1]).
    """

    def coefs(self, s_prev: float, s: float, s_next: float) -> tuple[float, float, float]:
        raise NotImplementedError

    def run(self, x, grid, noise, *, schedule, mu=None, aux=None):
        nf = _NoiseForm(grid, schedule, mu)
        n = len(grid) - 1
        u_prev = nf.y(x, 0)
        if aux is None:
            e = yield from nf.field(u_prev, 0, 1)
            u = u_prev + nf.ds(0, 1) * e
        else:
            u = nf.y(aux, 1)
        for k in range(1, n):
            e = yield from nf.field(u, k, k + 1)
            p, q, r = self.coefs(float(nf.s[k - 1]), float(nf.s[k]), float(nf.s[k + 1]))
            u_prev, u = u, p * u_prev + q * u + r * e
        return nf.x(u, n)

    def run_inverse(self, x, grid, noise, *, schedule, mu=None):
        nf = _NoiseForm(grid, schedule, mu)
        n = len(grid) - 1
        u_next = nf.y(x, n)
        e = yield from nf.field(u_next, n, n)
        u = u_next + nf.ds(n, n - 1) * e
        for k in range(n - 1, 0, -1):
            e = yield from nf.field(u, k, k + 1)
            p, q, r = self.coefs(float(nf.s[k - 1]), float(nf.s[k]), float(nf.s[k + 1]))
            u_next, u = u, (u_next - q * u - r * e) / p
        return Outcome(nf.x(u, 0), stats={"aux": nf.x(u_next, 1)})


@register("bdia", family="reversible", order=2, calls_per_step=1, deterministic=True, invertible=True,
          description="BDIA: bidirectional integration approximation over DDIM (gamma = 1: symmetric)",
          reference="Zhang, Lewis, Kleijn 2024, Exact Diffusion Inversion via Bidirectional Integration Approximation (ECCV)")
class BDIA(_TwoLevel):
    """BDIA-DDIM in the noise form. With Delta_{k->j} = (s_j - s_k) e_k (the DDIM increment from u_k):

        u_{k+1} = u_k + Delta_{k->k+1} + gamma (u_{k-1} - u_k - Delta_{k->k-1})

    ``gamma`` multiplies the correction by the step just taken (the BDIA README's current convention):
    gamma = 0 is DDIM (not invertible), gamma = 1 (default) the symmetric, leapfrog-like scheme.
    The inverse divides by gamma: for gamma < 1 it amplifies round-off by 1/gamma per step (gamma 0.5
    at 50 steps: 2^50), so use gamma < 1 only for sampling. (The paper writes it in x; in the noise
    form the scaled states differ by alpha ratios, equal at the data end.)
    """

    def __init__(self, gamma: float = 1.0):
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0 < gamma <= 1:
            raise ValueError(f"gamma must be in (0, 1], got {gamma!r}")
        self.gamma = float(gamma)

    def coefs(self, s_prev, s, s_next):
        g = self.gamma
        return g, 1.0 - g, (s_next - s) - g * (s_prev - s)


@register("o-belm", family="reversible", order=2, calls_per_step=1, deterministic=True, invertible=True,
          description="O-BELM: the optimal 2-step bidirectional explicit linear multistep method (second order)",
          reference="Wang et al. 2024, BELM: Bidirectional Explicit Linear Multi-step Sampler for Exact Inversion (NeurIPS)")
class OBELM(_TwoLevel):
    """O-BELM in the noise form, with a = s_{k-1} - s_k and b = s_k - s_{k+1} (both > 0 when sampling):

        u_{k+1} = (b/a)^2 u_{k-1} + (1 - (b/a)^2) u_k - (b (a + b) / a) e_k

    (the paper's x_{i-1} formula divided by alpha_{i-1}); local error O(h^3), second order. With equal
    steps it is leapfrog, u_{k+1} = u_{k-1} - 2 h e_k; the parasitic root -(b/a)^2 damps in sampling
    where steps shrink towards the data and amplifies by the same factor in inversion.
    """

    def __init__(self):
        pass

    def coefs(self, s_prev, s, s_next):
        a, b = s_prev - s, s - s_next
        return (b / a) ** 2, 1.0 - (b / a) ** 2, -b * (a + b) / a


@register("edict", family="reversible", order=1, calls_per_step=2, deterministic=True, invertible=True,
          description="EDICT: two coupled DDIM chains with mixing p (default 0.93)",
          reference="Wallace, Gokul, Naik 2023, EDICT: Exact Diffusion Inversion via Coupled Transformations (CVPR)")
class EDICT(Solver):
    """EDICT in the noise form (where a DDIM step is y + h e): states (x, y), x_0 = y_0; per step,
    with h = s_{k+1} - s_k,

        x' = x + h eps_hat(y);   y' = y + h eps_hat(x');   x'' = p x' + (1 - p) y';   y'' = p y' + (1 - p) x''

    (the paper's equations; the mixing commutes with the alpha scaling, so this is EDICT exactly).
    Inverse: y' = (y'' - (1 - p) x'') / p;  x' = (x'' - (1 - p) y') / p;  y = y' - h eps_hat(x');
    x = x' - h eps_hat(y). Two model calls per step, first order. The mixing contracts x - y by p^2
    per sampling step and expands it by 1/p^2 per inversion step (p = 0.93: 1.156^N), which is why
    the reference code runs in float64.
    """

    def __init__(self, p: float = 0.93):
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p < 1:
            raise ValueError(f"p must be in (0, 1), got {p!r}")
        self.p = float(p)

    def run(self, x, grid, noise, *, schedule, mu=None, aux=None):
        nf, p = _NoiseForm(grid, schedule, mu), self.p
        n = len(grid) - 1
        a = nf.y(x, 0)
        b = a if aux is None else nf.y(aux, 0)
        for k in range(n):
            h = nf.ds(k, k + 1)
            a = a + h * (yield from nf.field(b, k, k + 1))
            b = b + h * (yield from nf.field(a, k + 1, k + 1))
            a = p * a + (1 - p) * b
            b = p * b + (1 - p) * a
        return nf.x(a, n)

    def run_inverse(self, x, grid, noise, *, schedule, mu=None):
        nf, p = _NoiseForm(grid, schedule, mu), self.p
        n = len(grid) - 1
        a = b = nf.y(x, n)
        for k in range(n - 1, -1, -1):
            h = nf.ds(k, k + 1)
            b = (b - (1 - p) * a) / p
            a = (a - (1 - p) * b) / p
            b = b - h * (yield from nf.field(a, k + 1, k + 1))
            a = a - h * (yield from nf.field(b, k, k + 1))
        return Outcome(nf.x(a, 0), stats={"aux": nf.x(b, 0)})


@register("rex", family="reversible", order=2, calls_per_step=4, deterministic=True, invertible=True,
          description="Rex: McCallum-Foster coupling over an exponential-integrator base (euler = DDIM, midpoint)",
          reference="Blasingame & Liu 2025, Rex: Reversible Solvers for Diffusion Models; McCallum & Foster 2024")
class Rex(Solver):
    """Rex in the data form: v = (x - mu) / sigma, time g = alpha / sigma, dv/dg = x0_hat - mu =: D(v, g),
    where an Euler step is exactly DDIM (DPM-Solver++(1)). The base increment Phi_h(g, v) is

        euler     h D(v, g)                                       (1 call, first order)
        midpoint  h D(v + (h/2) D(v, g), g + h/2)                 (2 calls, second order)

    and McCallum & Foster's coupling (``coupling`` zeta, default 0.999) makes it reversible. State
    (v, w), w_0 = v_0; with h = g_{k+1} - g_k:

        v_{k+1} = zeta v_k + (1 - zeta) w_k + Phi_h(g_k, w_k)
        w_{k+1} = w_k - Phi_{-h}(g_{k+1}, v_{k+1})
        inverse: w_k = w_{k+1} + Phi_{-h}(g_{k+1}, v_{k+1});
                 v_k = (v_{k+1} - (1 - zeta) w_k - Phi_h(g_k, w_k)) / zeta

    Order: the base's. Calls per step: twice the base's. The two chains may drift apart in inversion
    (the latent pair's gap), while the round trip stays exact; the inverse multiplies round-off by
    1/zeta per step.
    """

    BASES = ("euler", "midpoint")

    def __init__(self, base: str = "midpoint", coupling: float = 0.999):
        if base not in self.BASES:
            raise ValueError(f"base must be one of {', '.join(self.BASES)}, got {base!r}")
        if isinstance(coupling, bool) or not isinstance(coupling, (int, float)) or not 0 < coupling <= 1:
            raise ValueError(f"coupling must be in (0, 1], got {coupling!r}")
        self.base, self.coupling = base, float(coupling)

    def _setup(self, grid, schedule, mu):
        g = grid.to(torch.float64)
        alpha, sigma = schedule.alpha(g), schedule.sigma(g)
        if not bool((sigma > 0).all()):
            raise ValueError("rex works in x / sigma: every grid time needs sigma > 0 (raise t_min)")
        self._schedule, self._mu, self._sigma, self._t = schedule, mu, sigma, g
        return alpha / sigma

    def _x(self, v, sigma):
        return sigma * v if self._mu is None else sigma * v + self._mu

    def _d(self, v, g, t=None, step=None):
        """D(v, g) = x0_hat - mu at log-SNR log g (a generator: one model call)."""
        t = float(self._schedule.t_of_log_snr(torch.tensor(g, dtype=torch.float64).log())) if t is None else t
        sigma = float(self._schedule.sigma(torch.tensor(t, dtype=torch.float64)))
        pred = yield Query(self._x(v, sigma), t, step=step)
        return pred.x0 if self._mu is None else pred.x0 - self._mu

    def _phi(self, v, g, h, t, step):
        """The base increment Phi_h(g, v) (t: the time of g)."""
        d = yield from self._d(v, g, t, step)
        if self.base == "euler":
            return h * d
        return h * (yield from self._d(v + 0.5 * h * d, g + 0.5 * h, None, step))

    def run(self, x, grid, noise, *, schedule, mu=None, aux=None):
        gam = self._setup(grid, schedule, mu)
        z, n = self.coupling, len(grid) - 1
        to_v = (lambda y: (y if mu is None else y - mu) / float(self._sigma[0]))  # noqa: E731
        v = to_v(x)
        w = v if aux is None else to_v(aux)
        for k in range(n):
            g0, g1, t0, t1 = float(gam[k]), float(gam[k + 1]), float(self._t[k]), float(self._t[k + 1])
            h = g1 - g0
            v = z * v + (1 - z) * w + (yield from self._phi(w, g0, h, t0, k + 1))
            w = w - (yield from self._phi(v, g1, -h, t1, k + 1))
        return self._x(v, float(self._sigma[n]))

    def run_inverse(self, x, grid, noise, *, schedule, mu=None):
        gam = self._setup(grid, schedule, mu)
        z, n = self.coupling, len(grid) - 1
        v = w = (x if mu is None else x - mu) / float(self._sigma[n])
        for k in range(n - 1, -1, -1):
            g0, g1, t0, t1 = float(gam[k]), float(gam[k + 1]), float(self._t[k]), float(self._t[k + 1])
            h = g1 - g0
            w = w + (yield from self._phi(v, g1, -h, t1, k + 1))
            v = (v - (1 - z) * w - (yield from self._phi(w, g0, h, t0, k + 1))) / z
        s0 = float(self._sigma[0])
        return Outcome(self._x(v, s0), stats={"aux": self._x(w, s0)})
