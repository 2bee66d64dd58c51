"""DEIS: the diffusion exponential integrator sampler (Zhang & Chen 2023, Fast Sampling of Diffusion
Models with Exponential Integrator, ICLR, arXiv 2204.13902), multistep, as diffusers'
``DEISMultistepScheduler`` and, by option, as ComfyUI's ``deis`` sampler.

With y = x - mu, rho = sigma / c the noise-to-signal ratio and z = y / c (c = alpha), the
probability-flow ODE in eps-form is exactly dz/drho = eps(z, rho) (DEIS, eq. (10)-(12)). DEIS's
multistep rule (its "AB" variants) replaces eps over the step [rho_i, rho_{i+1}] by the polynomial
through the k newest outputs eps_i, ..., eps_{i-k+1}, the polynomial taken in some variable u(rho),
and integrates it exactly in rho:

    z_{i+1} = z_i + sum_{j<k} C_ij eps_{i-j},    C_ij = int_{rho_i}^{rho_{i+1}} l_j(u(rho)) drho,

l_j the Lagrange basis polynomial of node u(rho_{i-j}) on the k nodes. ``mode`` chooses u:

- ``"logrho"`` (default; diffusers' ``solver_type="logrho"``, DEIS's log-rho AB): u = log rho =
  -lambda. Then rho = e^{-lambda} and the step is the noise-form exponential integrator of
  :mod:`.maths` with the Lagrange weights of its polynomial in lambda,
  y_t = (alpha_t / alpha_s) y_s - sigma_t sum_j w_j eps_j, w_j = sum_m c_jm J_m, J_m = h m! phi_{m+1}(h)
  (:func:`.maths.phi_integrals` with kappa = +1, :func:`.maths.lagrange_weights`); the weights are
  exact, diffusers writes the same integrals in closed form in log rho.
- ``"tab"`` (ComfyUI's default ``deis_mode``, DEIS's "t-AB"): u = the time tau of a VP-linear
  schedule, rho(tau)^2 = exp(beta_d tau^2 / 2 + beta_min tau) - 1 (Song et al. 2021), fitted as
  ComfyUI's ``edm2t`` (zju-pi/diff-sampler) fits it: rho(1) = 80, rho(1e-3) = 0.002, whatever the
  model's range. Its inverse tau(rho) = (sqrt(beta_min^2 + 2 beta_d log(1 + rho^2)) - beta_min) / beta_d
  is smooth in rho, and the C_ij are integrated in rho by 24-point Gauss-Legendre quadrature (ComfyUI
  sums the integrand d rho / d tau l_j(tau) over 10 000 points in tau, which agrees to about 1e-4).
- ``"rhoab"`` (DEIS's rho-AB): u = rho, so C_ij are Adams-Bashforth's variable-step weights
  (:func:`.maths.ab_weights`) in rho: this is ``ipndm-v`` (and ``lms``) with at most three nodes.
  ComfyUI's ``get_deis_coeff_list(deis_mode="rhoab")`` builds min(i, max_order) + 1 nodes at step i,
  one more than its sampler's loop unpacks (it fails from step ``max_order`` on); here step i uses
  min(i + 1, order) nodes, as in the other modes.

Variables: ``logrho`` steps x / alpha against sigma / alpha, as diffusers (for rectified flow too,
alpha = 1 - t); ``tab`` and ``rhoab`` step k-diffusion's y / c against s = sigma / c, with c the
schedule's ``sampling_scale`` (alpha; 1 for rectified flow, as ComfyUI steps a flow model's x
against its sigma = t) and d = dy/ds (eps for diffusion schedules), as ``lms`` does.

Orders, as diffusers: step i uses k = min(order, i + 1) nodes (warm-up); with ``lower_order_final``
and fewer than 15 steps the last step is first order and the one before at most second order
(ComfyUI's sampler has no such rule: ``lower_order_final=False``); a step that ends at sigma = 0 is
first order (ComfyUI: Euler to the denoised sample; diffusers never ends there). k = 1 is DDIM in
every mode. A step from a noise level to itself (diffusers' repeated last Karras sigma) leaves x as
it is. One model call per step; deterministic. ``order`` defaults to diffusers' ``solver_order=2``;
ComfyUI's ``deis`` sampler is ``mode="tab", order=3, lower_order_final=False``.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ...core.options import Option
from ...core.protocol import Query, Solver
from ...core.registry import register
from ..ode.euler_heun import _sigma_derivative, _sigma_step
from .maths import (
    ab_weights,
    alpha_sigma,
    half_log_snr,
    lagrange_weights,
    model_output,
    ode_weights,
    phi_integrals,
)
from .multistep import _step_orders

#: DEIS's choices of the interpolation variable u(rho) (module docstring)
DEIS_MODES = ("logrho", "tab", "rhoab")

#: ComfyUI's (zju-pi/diff-sampler's) VP-linear fit for "tab": rho(1) = SIGMA_MAX, rho(EPS_T) = SIGMA_MIN
SIGMA_MIN, SIGMA_MAX, EPS_T = 0.002, 80.0, 1e-3
_GL_X, _GL_W = np.polynomial.legendre.leggauss(24)


def _vp_fit() -> tuple[float, float]:
    """(beta_min, beta_d) of the VP-linear schedule rho(tau)^2 = exp(beta_d tau^2 / 2 + beta_min tau) - 1
    through rho(1) = SIGMA_MAX and rho(EPS_T) = SIGMA_MIN: two linear equations in (beta_min, beta_d)."""
    l_max, l_min = math.log1p(SIGMA_MAX**2), math.log1p(SIGMA_MIN**2)
    beta_d = 2.0 * (l_min / EPS_T - l_max) / (EPS_T - 1.0)
    return l_max - 0.5 * beta_d, beta_d


def tab_time(rho: float) -> float:
    """tau(rho) of the "tab" mode: the inverse of the fitted VP-linear rho(tau)."""
    beta_min, beta_d = _vp_fit()
    return (math.sqrt(beta_min**2 + 2.0 * beta_d * math.log1p(rho * rho)) - beta_min) / beta_d


def tab_weights(nodes: list[float], a: float, b: float) -> list[float]:
    """C_j = int_a^b l_j(tau(rho)) drho for the Lagrange basis on the nodes tau(``nodes``) (rho values),
    by Gauss-Legendre quadrature in rho."""
    mid, half = 0.5 * (a + b), 0.5 * (b - a)
    taus = [tab_time(mid + half * float(x)) for x in _GL_X]
    knots = [tab_time(r) for r in nodes]
    out = []
    for j, kj in enumerate(knots):
        total = 0.0
        for tau, w in zip(taus, _GL_W):
            basis = 1.0
            for m, km in enumerate(knots):
                if m != j:
                    basis *= (tau - km) / (kj - km)
            total += float(w) * basis
        out.append(half * total)
    return out


@register(
    "deis",
    family="ode",
    order=3,
    calls_per_step=1,
    deterministic=True,
    description="DEIS multistep exponential integrator, orders 1-3; log-rho (diffusers), t-AB (ComfyUI), rho-AB",
    reference="Zhang & Chen 2023, Fast Sampling of Diffusion Models with Exponential Integrator (ICLR, "
    "arXiv 2204.13902)",
)
class DEIS(Solver):
    """DEIS (see the module docstring for the update rules and the modes).

    Options: ``order`` 1, 2 (default, diffusers' ``solver_order``) or 3, the number of outputs the
    polynomial goes through; ``mode`` ``"logrho"`` (default, diffusers), ``"tab"`` (ComfyUI's
    default) or ``"rhoab"``; ``lower_order_final`` (diffusers' rule, below 15 steps). One model call
    per step.
    """

    order = Option(2, "the number of past outputs interpolated (diffusers' solver_order)", choices=(1, 2, 3))
    mode = Option(
        "logrho",
        "the interpolation variable: 'logrho' (diffusers), 'tab' (VP time, ComfyUI's default) or 'rhoab' (rho)",
        choices=DEIS_MODES,
    )
    lower_order_final = Option(True, "first order at the last step, at most second before it, below 15 steps")

    def run(self, x, grid, noise, *, schedule, mu=None):
        n = len(grid) - 1
        ts = [float(t) for t in grid]
        alpha = [alpha_sigma(schedule, t)[0] for t in ts]
        sigma = [max(alpha_sigma(schedule, t)[1], 0.0) for t in ts]
        if sigma[0] == 0.0:
            raise ValueError(
                f"{self.name} cannot step away from sigma = 0 (rho = sigma/alpha = 0, log rho = -inf): "
                "to invert, start from t_min > 0"
            )
        if self.mode == "logrho":
            if alpha[0] <= 0:
                raise ValueError(
                    f"{self.name} (mode='logrho') cannot start where alpha = 0 (t = 1 of rectified flow, "
                    "rho = inf); use a grid with t_max < 1"
                )
            scale = alpha
        else:
            scale = [schedule.sampling_scale(t) for t in ts]
            if min(scale) <= 0:
                raise ValueError(f"{self.name} (mode={self.mode!r}) steps in sigma/alpha, which needs alpha > 0")
        rho = [s / c if c > 0 else math.inf for s, c in zip(sigma, scale)]  # inf: an inversion's end at alpha = 0
        orders = _step_orders(self.order, n, self.lower_order_final, sigma[-1] == 0.0)
        hist: list[torch.Tensor] = []  # eps (logrho) or d = dy/ds, newest first
        for i in range(n):
            pred = yield Query(x, ts[i], step=i + 1)
            if self.mode == "logrho":
                out = model_output(pred, mu, "noise")
            else:
                out = _sigma_derivative(pred, ts[i], schedule)
            hist = [out, *hist][: self.order]
            k = min(orders[i], len(hist))
            if rho[i + 1] == rho[i]:  # no step (a repeated noise level)
                x = pred.x
                continue
            if self.mode == "logrho":
                x = self._logrho_step(pred.x, hist[:k], i, alpha, sigma, mu)
            else:
                nodes = rho[i : i - k : -1] if i - k >= 0 else rho[i::-1]
                w = (tab_weights if self.mode == "tab" else ab_weights)(nodes, rho[i], rho[i + 1])
                d = sum((wj * hj for wj, hj in zip(w[1:], hist[1:k])), w[0] * hist[0]) / (rho[i + 1] - rho[i])
                x = _sigma_step(pred.x, ts[i], ts[i + 1], d, schedule, mu)
        return x

    @staticmethod
    def _logrho_step(x, eps, i, alpha, sigma, mu):
        """y_t = (alpha_t / alpha_s) y_s - sigma_t sum_j w_j eps_j, the Lagrange polynomial in lambda
        through the k = len(eps) newest nodes (module docstring)."""
        a_s, s_s, a_t, s_t = alpha[i], sigma[i], alpha[i + 1], sigma[i + 1]
        ls, lt = half_log_snr(a_s, s_s), half_log_snr(a_t, s_t)
        h = lt - ls
        y = x if mu is None else x - mu
        first = ode_weights("noise", a_t, s_t, a_s, s_s, h)
        out = torch.mul(y, first.decay)
        if len(eps) == 1 or not math.isfinite(h):  # DDIM (also to sigma = 0, from or to alpha = 0)
            out = out.add_(eps[0], alpha=first.w0)
        else:
            ht = torch.tensor([h], dtype=torch.float64)
            nodes = [
                torch.tensor([(half_log_snr(alpha[i - j], sigma[i - j]) - ls) / h], dtype=torch.float64)
                for j in range(len(eps))
            ]
            w = lagrange_weights(nodes, phi_integrals(ht, len(eps), 1.0))
            for wj, ej in zip(w, eps):
                out = out.add_(ej, alpha=-s_t * float(wj))
        return out if mu is None else out + mu
