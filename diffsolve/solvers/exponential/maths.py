"""The maths of the exponential integrators: one home for the formulas every exponential solver
(:mod:`.multistep`, :mod:`.pc`, :mod:`.adaptive`, :mod:`.singlestep`), DDIM and the reversible
solvers' fields use.

Notation. A schedule gives x_t = alpha_t x_0 + (1 - alpha_t) mu + sigma_t eps (mu = 0 unless
mean-reverting), so y = x - mu reads y_t = alpha_t y_0 + sigma_t eps. lambda = log(alpha / sigma) is
the half log-SNR (decreasing in t; +inf where sigma = 0, -inf where alpha = 0). A step goes from s
to t with h = lambda_t - lambda_s (> 0 when sampling).

Parameterisations (:data:`PARAMETERIZATIONS`): the model output q the integrator integrates is
``"data"``: q = x0_hat - mu, ``"noise"``: q = eps_hat, or ``"velocity"``: q = v_hat (below).

Variation of constants. In lambda the probability-flow ODE is linear in y plus a model term, and
its exact solution from s is (Lu et al. 2022, DPM-Solver; Lu et al. 2022/2023, DPM-Solver++; Li et
al. 2025, MR Sampler for y = x - mu)

    data:   y_t = (sigma_t / sigma_s) y_s + alpha_t int_0^h e^{-(h - tau)} q(lambda_s + tau) dtau
    noise:  y_t = (alpha_t / alpha_s) y_s - sigma_t int_0^h e^{+(h - tau)} q(lambda_s + tau) dtau

i.e. y_t = A y_s + C int_0^h e^{kappa (h - tau)} q dtau with (A, C, kappa) = (sigma_t / sigma_s,
alpha_t, -1) for data and (alpha_t / alpha_s, -sigma_t, +1) for noise (:func:`vc_factors`,
:func:`kernel_sign`). ``velocity``: with r = sqrt(alpha^2 + sigma^2) and phi = atan(sigma / alpha)
= atan(e^{-lambda}), u = y / r = cos(phi) y_0 + sin(phi) eps has du/dphi = v, so y_t = (r_t / r_s)
y_s + r_t int_{phi_s}^{phi_t} q dphi: A = r_t / r_s, C = r_t and a constant kernel, in phi.

phi functions. phi_0(z) = e^z, phi_{k+1}(z) = (phi_k(z) - 1/k!) / z = sum_m z^m / (m + k + 1)!
(phi_k(0) = 1/k!), and

    J_j = int_0^h e^{z (1 - tau/h)} (tau/h)^j dtau = h j! phi_{j+1}(z),    z = kappa h.

Taylor-expanding q about lambda_s, q(lambda_s + tau) = sum_k q^(k) tau^k / k!, gives
y_t = A y_s + C sum_k h^{k+1} phi_{k+1}(kappa h) q^(k). With D1 = h q' and D2 = h^2 q'' / 2, in
DPM-Solver's notation phi1 = e^{-h} - 1, phi2 = phi1/h + 1, phi3 = phi2/h - 1/2 (data) and
phi1 = e^h - 1, phi2 = phi1/h - 1, phi3 = phi2/h - 1/2 (noise):

    data:   y_t = (sigma_t/sigma_s) y_s - alpha_t phi1 q_s + alpha_t phi2 D1 - 2 alpha_t phi3 D2
    noise:  y_t = (alpha_t/alpha_s) y_s - sigma_t phi1 q_s - sigma_t phi2 D1 - 2 sigma_t phi3 D2

which this module writes y_t = decay y_s + w0 q_s + w1 D1 + w2 D2 (:class:`Weights`,
:func:`ode_weights`). The first-order step (w0 only) is DDIM (Song et al. 2021) = DPM-Solver-1 =
DPM-Solver++(1); at sigma_t = 0 the data form's is the jump y_t = alpha_t q_s.

SDE (Lu et al. 2023, SDE-DPM-Solver++; the reverse SDE's variation of constants), with
p1 = 1 - e^{-2h} (:func:`fresh_variance`) and z ~ N(0, I):

    data:   y_t = (sigma_t/sigma_s) e^{-h} y_s + alpha_t p1 q_s + alpha_t (1 - p1/(2h)) D1 + sigma_t sqrt(p1) z
    noise:  y_t = (alpha_t/alpha_s) y_s - 2 sigma_t (phi1 q_s + phi2 D1) + sigma_t sqrt(e^{2h} - 1) z

(:func:`sde_weights`, :func:`sde_noise_std`); sigma_t sqrt(p1) is also DDIM's eta = 1 (DDPM
posterior) noise (:func:`posterior_std`).

Multistep on nonuniform nodes. Replacing q by the polynomial through its values at nodes theta_i =
(lambda_i - lambda_s) / h, with Lagrange basis l_i(theta) = sum_j c_ij theta^j, integrates exactly
to the weights w_i = sum_j c_ij J_j (:func:`phi_integrals`, :func:`lagrange_weights`): the
variable-step Adams-Bashforth-type predictor on the last k outputs and the UniPC-type corrector that
adds the output at theta = 1 (:func:`pc_weights`; Zhao et al. 2023, UniPC). With plain integrals
J_j = (b - a) / (j + 1) the same weights are Adams-Bashforth's (:func:`ab_weights`, the velocity form).
UniPC itself writes the same steps as kappa C B(h) sum_k rho_k D1_k over differences D1_k = (q_k - q_s) / r_k
with B(h) = hh or e^{hh} - 1 (:func:`unipc_b`) and rho from its order conditions (:func:`unipc_rhos`),
but takes rho = 1/2 with a single node, which makes its bh1 and bh2 variants differ.

Building on it: DEIS's rhoAB (Zhang & Chen 2023) is :func:`ab_weights` in rho = sigma / alpha on eps;
SA-Solver (Xue et al. 2023) with a constant tau has the data-form kernel e^{-(1 + tau^2)(h - tau')}
and weight (1 + tau^2) alpha_t, i.e. :func:`phi_integrals` with ``sign = -(1 + tau^2)``, decay
(sigma_t/sigma_s) e^{-tau^2 h} and noise sigma_t sqrt(1 - e^{-2 tau^2 h}).

Rounding. Some weights exist in two evaluations that agree to rounding: :func:`ode_weights` from the
ratio e^{-h} = alpha_s sigma_t / (alpha_t sigma_s) (Python floats, exact at sigma_t = 0 where
h = inf: the fixed-grid multistep solvers) and :func:`ode_weights_expm1` from expm1(h) (accurate at
small h; per-row tensors: the adaptive singlestep pairs). Each caller keeps its own, so that results
stay bitwise as they were. Helpers taking ``float | Tensor`` use :mod:`math` on floats and torch on
tensors.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch

Tensor = torch.Tensor
Scalar = Any  # a Python float or a (per-row) tensor

#: the model outputs an exponential integrator can integrate (see the module docstring)
PARAMETERIZATIONS = ("data", "noise", "velocity")


# ----------------------------------------------------------------------------- parameterisations
def check_parameterization(value, *, velocity: bool = True, where: str = "") -> str:
    """``value`` if it is one of :data:`PARAMETERIZATIONS` (without ``"velocity"`` when
    ``velocity=False``), else a ValueError naming the argument, the allowed values and ``where``
    (e.g. ``" for method='singlestep'"``)."""
    allowed = PARAMETERIZATIONS if velocity else tuple(p for p in PARAMETERIZATIONS if p != "velocity")
    if value not in allowed:
        raise ValueError(f"parameterization must be one of {', '.join(allowed)}{where}, got {value!r}")
    return value


def raw_output(pred, param: str) -> Tensor:
    """The prediction's output for ``param`` before the shift by mu: x0_hat (data), eps_hat (noise)
    or v_hat (velocity)."""
    if param == "noise":
        return pred.eps
    if param == "velocity":
        return pred.v
    return pred.x0


def shift_output(raw: Tensor, mu, param: str) -> Tensor:
    """q from :func:`raw_output`: x0_hat - mu for data (y = x - mu has y_0 = x0 - mu); eps_hat and
    v_hat as they are."""
    return raw if param != "data" or mu is None else raw - mu


def model_output(pred, mu, param: str) -> Tensor:
    """The model output q the steps integrate: x0_hat - mu (data), eps_hat (noise) or v_hat (velocity)."""
    return shift_output(raw_output(pred, param), mu, param)


# ----------------------------------------------------------------------------- log-SNR and angles
def alpha_sigma(schedule, t) -> tuple[float, float]:
    """(alpha_t, sigma_t) at one time, as Python floats (the schedule's memoised :meth:`at`)."""
    return schedule.at(float(t))


def half_log_snr(alpha: float, sigma: float) -> float:
    """lambda = log(alpha / sigma), +inf where sigma = 0 and -inf where alpha = 0."""
    if alpha > 0 and sigma > 0:
        return math.log(alpha / sigma)
    return math.inf if sigma == 0 else -math.inf


class GridNodes(NamedTuple):
    """Per-grid-point floats of a multistep run: times, alpha, sigma and lambda (+inf where sigma = 0,
    -inf where alpha = 0)."""

    t: list[float]
    alpha: list[float]
    sigma: list[float]
    lam: list[float]


def grid_nodes(name: str, grid, schedule, parameterization: str) -> GridNodes:
    """The :class:`GridNodes` of ``grid``, refusing what a log-SNR multistep solver ``name`` cannot
    start from: sigma = 0 (infinite log-SNR) and, for the noise parameterisation, alpha = 0."""
    ts = [float(t) for t in grid]
    alpha, sigma = [], []
    for t in ts:
        a, s = alpha_sigma(schedule, t)
        alpha.append(a)
        sigma.append(max(s, 0.0))
    if parameterization == "noise" and alpha[0] <= 0:
        raise ValueError(
            f"{name}: parameterization='noise' cannot start where alpha = 0 (t = 1 of rectified flow); "
            "use another parameterization (such as 'data'), or a grid with t_max < 1"
        )
    if sigma[0] == 0.0:
        raise ValueError(
            f"{name} cannot step away from sigma = 0 (its log-SNR is infinite): to invert, start from t_min > 0"
        )
    return GridNodes(ts, alpha, sigma, [half_log_snr(a, s) for a, s in zip(alpha, sigma)])


def at_log_snr(schedule, lam: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(t, alpha_t, sigma_t) at half log-SNR ``lam`` (per row)."""
    t = schedule.t_of_log_snr(lam)
    return t, schedule.alpha(t), schedule.sigma(t)


def velocity_angle(alpha: float, sigma: float) -> float:
    """phi = atan(sigma / alpha), the velocity form's time (atan2: phi = pi/2 at alpha = 0)."""
    return math.atan2(sigma, alpha)


def angle_of_log_snr(lam: Tensor) -> Tensor:
    """phi = atan(sigma / alpha) = atan(e^{-lambda}) at half log-SNR ``lam``."""
    return torch.atan(torch.exp(-lam))


def velocity_radius(alpha: Scalar, sigma: Scalar) -> Scalar:
    """r = sqrt(alpha^2 + sigma^2), the velocity form's scale (math.hypot on floats)."""
    if isinstance(alpha, Tensor) or isinstance(sigma, Tensor):
        return (alpha * alpha + sigma * sigma) ** 0.5
    return math.hypot(alpha, sigma)


# ----------------------------------------------------------------------------- first-order factors
def vc_factors(param: str, a_t: Scalar, s_t: Scalar, a_s: Scalar, s_s: Scalar) -> tuple[Scalar, Scalar]:
    """(A, C) of the variation-of-constants formula y_t = A y_s + C int K q: (sigma_t / sigma_s,
    alpha_t) for data, (alpha_t / alpha_s, -sigma_t) for noise, (r_t / r_s, r_t) for velocity."""
    if param == "data":
        return s_t / s_s, a_t
    if param == "noise":
        return a_t / a_s, -s_t
    r_t = velocity_radius(a_t, s_t)
    return r_t / velocity_radius(a_s, s_s), r_t


def kernel_sign(param: str) -> float:
    """kappa of the kernel e^{kappa (h - tau)}: -1 for data, +1 for noise."""
    return -1.0 if param == "data" else 1.0


class Weights(NamedTuple):
    """One exponential-integrator step y_t = decay y_s + w0 q_s + w1 D1 + w2 D2 (module docstring);
    ``w2`` is None where a form gives no third-order term."""

    decay: Scalar
    w0: Scalar
    w1: Scalar
    w2: Scalar = None


def ode_weights(param: str, a_t: float, s_t: float, a_s: float, s_s: float, h: float) -> Weights:
    """The ODE step's weights (data or noise) from the ratio e^{-h} = alpha_s sigma_t / (alpha_t sigma_s):

        data:  w0 = -alpha_t phi1,  alpha_t phi1 = alpha_s sigma_t / sigma_s - alpha_t,
               w1 = alpha_t phi2 = alpha_t phi1 / h + alpha_t,  w2 = -2 alpha_t phi3 = -(2 w1 / h - alpha_t)
        noise: w0 = -sigma_t phi1,  sigma_t phi1 = alpha_t sigma_s / alpha_s - sigma_t,
               w1 = -sigma_t phi2 = -(sigma_t phi1 / h - sigma_t),  w2 = -(2 sigma_t phi2 / h - sigma_t)

    (DPM-Solver++ / DPM-Solver, Lu et al. 2022/2023). Finite at sigma_t = 0 (h = inf: the data form
    is the jump y_t = alpha_t q_s); the mrs-ode / dpmpp-*m weights."""
    decay, _ = vc_factors(param, a_t, s_t, a_s, s_s)
    if param == "data":
        c1 = a_s * s_t / s_s - a_t  # alpha_t phi1
        c2 = c1 / h + a_t  # alpha_t phi2
        return Weights(decay, -c1, c2, -(2.0 * c2 / h - a_t))
    c1 = a_t * s_s / a_s - s_t  # sigma_t phi1
    c2 = c1 / h - s_t  # sigma_t phi2
    return Weights(decay, -c1, -c2, -(2.0 * c2 / h - s_t))


def ode_weights_expm1(param: str, a_t: Tensor, s_t: Tensor, a_s: Tensor, s_s: Tensor, h: Tensor) -> Weights:
    """The ODE step's (decay, w0, w1) (data or noise, per row) from expm1:

        data:  phi1 = expm1(-h),  w0 = -alpha_t phi1,  w1 = alpha_t (phi1 / h + 1)
        noise: e1 = expm1(h),     w0 = -sigma_t e1,    w1 = -sigma_t (e1 / h - 1)

    the same weights as :func:`ode_weights`, accurate at small h; the singlestep pairs' (w2 = None)."""
    decay, _ = vc_factors(param, a_t, s_t, a_s, s_s)
    if param == "data":  # phi1 = e^{-h} - 1, phi2 = phi1 / h + 1
        phi1 = torch.expm1(-h)
        return Weights(decay, -a_t * phi1, a_t * (phi1 / h + 1.0))
    e1 = torch.expm1(h)  # noise: e^h - 1
    return Weights(decay, -s_t * e1, -s_t * (e1 / h - 1.0))


def midpoint_weight(w0: Scalar) -> Scalar:
    """w1 of the second-order "midpoint" rule: w0 / 2 (the ODE's -alpha_t phi1 D1 / 2 and
    -sigma_t phi1 D1 / 2, the SDE's alpha_t p1 D1 / 2 and -sigma_t phi1 D1): k-diffusion's and
    diffusers' default DPM-Solver++(2M)."""
    return 0.5 * w0


def _exp(z: Scalar) -> Scalar:
    return torch.exp(z) if isinstance(z, Tensor) else math.exp(z)


def _expm1(z: Scalar) -> Scalar:
    return torch.expm1(z) if isinstance(z, Tensor) else math.expm1(z)


def _sqrt(z: Scalar) -> Scalar:
    return z.sqrt() if isinstance(z, Tensor) else math.sqrt(z)


def fresh_variance(h: Scalar) -> Scalar:
    """p1(h) = 1 - e^{-2h}: the fraction of sigma_t^2 that the data-form SDE step (and DDPM's
    posterior) draws afresh."""
    return -_expm1(-2.0 * h)


def posterior_std(scale: Scalar, h: Scalar) -> Scalar:
    """scale sqrt(1 - e^{-2h}): the data-form SDE step's noise std for scale = sigma_t, DDIM's
    eta-noise for scale = eta sigma_t."""
    return scale * _sqrt(fresh_variance(h))


def sde_weights(param: str, a_t: Scalar, s_t: Scalar, a_s: Scalar, s_s: Scalar, h: Scalar, order: int = 2) -> Weights:
    """The reverse-SDE step's (decay, w0, w1) (module docstring; w1 only for ``order`` 2, else None):

        data:  decay = (sigma_t / sigma_s) e^{-h},  w0 = alpha_t p1,  w1 = alpha_t (1 - p1 / (2h))
        noise: decay = alpha_t / alpha_s,  w0 = -2 sigma_t phi1,  w1 = -2 sigma_t phi2

    with p1 = 1 - e^{-2h} and (noise) sigma_t phi1 = alpha_t sigma_s / alpha_s - sigma_t,
    sigma_t phi2 = sigma_t phi1 / h - sigma_t (SDE-DPM-Solver++ / SDE-DPM-Solver, Lu et al. 2023)."""
    decay, _ = vc_factors(param, a_t, s_t, a_s, s_s)
    if param == "data":
        p1 = fresh_variance(h)
        w1 = a_t * (1.0 - p1 / (2.0 * h)) if order >= 2 else None
        return Weights(decay * _exp(-h), a_t * p1, w1)
    c1 = a_t * s_s / a_s - s_t  # sigma_t phi1
    return Weights(decay, -(2.0 * c1), -(2.0 * (c1 / h - s_t)) if order >= 2 else None)


def sde_noise_std(param: str, a_t: float, s_t: float, a_s: float, s_s: float, h: float) -> float:
    """The reverse-SDE step's noise std: sigma_t sqrt(1 - e^{-2h}) (data), sigma_t sqrt(e^{2h} - 1)
    = sqrt((alpha_t sigma_s / alpha_s)^2 - sigma_t^2) (noise)."""
    if param == "data":
        return posterior_std(s_t, h)
    return math.sqrt(max((a_t * s_s / a_s) ** 2 - s_t**2, 0.0))


def eta_sde_weights(a_t: float, s_t: float, s_s: float, h: float, eta: float) -> Weights:
    """The data-form step of the reverse-time SDE family with noise fraction ``eta`` (0: the
    probability-flow ODE, 1: the reverse SDE; k-diffusion's ``sample_dpmpp_2m_sde`` and
    ``sample_dpmpp_3m_sde``), to third order. In lambda the drift of y has the kernel
    e^{-(1 + eta)(h - tau)} with weight (1 + eta) alpha_t, so with H = (1 + eta) h the Taylor term of
    q^(k) integrates to alpha_t h^k H phi_{k+1}(-H) q^(k), and with D1 = h q', D2 = h^2 q'' / 2:

        decay = (sigma_t / sigma_s) e^{-eta h},   w0 = alpha_t (1 - e^{-H}),
        w1 = alpha_t H phi_2(-H),                  w2 = 2 alpha_t H phi_3(-H)

    (k-diffusion's phi_2 = H phi_2(-H) and phi_3 = -H phi_3(-H); its 3M SDE weighs D2 by -phi_3, half
    of w2). The noise std is ``posterior_std(sigma_t, eta h)``. eta = 0 gives :func:`ode_weights`'
    data weights, eta = 1 :func:`sde_weights`'. Needs sigma_t > 0 (h finite)."""
    big = (1.0 + eta) * h
    if math.isinf(big):  # from alpha_s = 0 (lambda_s = -inf): the limits H phi_2(-H), 2 H phi_3(-H) -> 1
        return Weights(s_t / s_s if eta == 0 else 0.0, a_t, a_t, a_t)
    phi = phi_functions(torch.tensor([-big], dtype=torch.float64), 3)
    decay = s_t / s_s * math.exp(-eta * h)
    return Weights(decay, -a_t * math.expm1(-big), a_t * big * float(phi[1][0]), 2.0 * a_t * big * float(phi[2][0]))


# ----------------------------------------------------------------------------- phi functions, polynomial weights
def phi_functions(z: Tensor, n: int) -> list[Tensor]:
    """phi_1(z) .. phi_n(z) (per row, float64): the closed-form recursion phi_{k+1} = (phi_k - 1/k!) / z
    from phi_1 = expm1(z) / z where |z| >= 1/2, the power series sum_m z^m / (m + k)! below."""
    closed, p = [], torch.expm1(z) / z
    for j in range(n):
        closed.append(p)
        p = (p - 1.0 / math.factorial(j + 1)) / z
    out = []
    for j in range(n):
        s, term = torch.zeros_like(z), torch.full_like(z, 1.0 / math.factorial(j + 1))
        for m in range(16):  # |z| < 1/2: the 16th term is below 1e-19 of the first
            s = s + term
            term = term * z / (m + j + 2)
        out.append(torch.where(z.abs() < 0.5, s, closed[j]))
    return out


def phi_integrals(h: Tensor, n: int, sign: float) -> list[Tensor]:
    """J_j = int_0^h e^{sign (h - tau)} (tau / h)^j dtau = h j! phi_{j+1}(sign h), j = 0 .. n - 1
    (per row, float64); ``sign`` is the kernel's kappa (:func:`kernel_sign`), or any real rate."""
    return [h * math.factorial(j) * phi for j, phi in enumerate(phi_functions(sign * h, n))]


def lagrange_weights(nodes: list[Tensor], big_j: list[Tensor]) -> list[Tensor]:
    """Weights sum_j c_ij J_j of the Lagrange basis polynomials l_i(theta) = sum_j c_ij theta^j of the
    (per-row) ``nodes``: element-wise only, so a row's weights do not depend on its batch."""
    out = []
    for i, ni in enumerate(nodes):
        coef: list[Tensor | float] = [torch.ones_like(ni)]
        den = torch.ones_like(ni)
        for j, nj in enumerate(nodes):
            if j == i:
                continue
            coef = [
                (coef[k - 1] if k else 0.0) - (nj * coef[k] if k < len(coef) else 0.0) for k in range(len(coef) + 1)
            ]
            den = den * (ni - nj)
        out.append(sum(c * jj for c, jj in zip(coef, big_j)) / den)
    return out


def ab_weights(nodes: list[float], a: float, b: float) -> list[float]:
    """Integrals over [a, b] of the Lagrange basis polynomials on ``nodes`` (Adams-Bashforth weights
    on nonuniform nodes: :func:`lagrange_weights` with J_j = (b - a) / (j + 1))."""
    width = b - a
    theta = [torch.tensor((x - a) / width, dtype=torch.float64) for x in nodes]
    plain = [torch.tensor(width / (j + 1), dtype=torch.float64) for j in range(len(nodes))]  # int_a^b theta^j
    return [float(w) for w in lagrange_weights(theta, plain)]


def adams_to_zero(y: Tensor, alpha_s: float, sigma_s: float, nodes: list[tuple[float, Tensor]]) -> Tensor:
    """A final step from s to sigma = 0 (alpha = 1) of order ``len(nodes)``: in the noise-to-signal
    ratio r = sigma/alpha the probability-flow ODE reads d(y/alpha)/dr = eps, so

        y_0 = y_s / alpha_s - int_0^{r_s} P(r) dr,

    P the polynomial through the last model outputs (r_j, eps_j), ``nodes`` newest first (r_s first):
    Adams-Bashforth in r, k-diffusion's lms rule for its last step. One node gives DDIM's step to the
    data prediction, y_s / alpha_s - r_s eps_s."""
    r_s = sigma_s / alpha_s
    w = ab_weights([r for r, _ in nodes], r_s, 0.0)
    out = y / alpha_s
    for wj, (_, eps) in zip(w, nodes):
        out = out + wj * eps
    return out


class AdamsToZero:
    """The history of a high-order last step into sigma = 0 (:func:`adams_to_zero`) for a multistep
    solver with the option ``final_order``: the last ``final_order`` (sigma/alpha, eps) pairs, kept
    only when the grid ends at sigma = 0 and ``final_order`` > 1."""

    def __init__(self, final_order: int, g: GridNodes):
        self.order = final_order if g.sigma[-1] == 0.0 else 1
        self.nodes: list[tuple[float, Tensor]] = []  # newest first

    def record(self, g: GridNodes, i: int, eps: Tensor) -> None:
        """Keep step i's noise prediction (none at alpha = 0, where sigma/alpha is infinite)."""
        if self.order > 1 and g.alpha[i] > 0:
            self.nodes = [(g.sigma[i] / g.alpha[i], eps), *self.nodes][: self.order]

    def takes(self, i: int, n: int) -> bool:
        """Whether step i of n is the last one and is taken here (two outputs or more kept)."""
        return i == n - 1 and len(self.nodes) > 1

    def step(self, y: Tensor, g: GridNodes, i: int) -> Tensor:
        return adams_to_zero(y, g.alpha[i], g.sigma[i], self.nodes) * g.alpha[i + 1]


def pc_weights(lam_hist: Tensor, count: Tensor, ls: Tensor, h: Tensor, slots: int, param: str):
    """Per-row weights of one predictor-corrector step from ``ls`` by ``h`` (UniPC-type, Zhao et al. 2023).

    ``lam_hist`` [R, slots]: the history's log-SNRs, newest (= ls) first; ``count`` [R]: how many are
    filled (k = min(count, slots) are used). Returns (w_pred [R, slots], w_new [R], w_corr [R, slots]),
    zero beyond k, to be multiplied by the step's C (:func:`vc_factors`)."""
    if param == "velocity":  # nodes and step in phi = atan(e^{-lambda}), plain integrals
        phi_s = angle_of_log_snr(ls)
        step = angle_of_log_snr(ls + h) - phi_s
        big_j = [step / (j + 1) for j in range(slots + 1)]
        theta = [(angle_of_log_snr(lam_hist[:, i]) - phi_s) / step for i in range(slots)]
    else:
        big_j = phi_integrals(h, slots + 1, kernel_sign(param))
        theta = [(lam_hist[:, i] - ls) / h for i in range(slots)]
    k_row = count.clamp_max(slots)
    zero = torch.zeros_like(h)
    w_pred = [zero] * slots
    w_corr = [zero] * slots
    w_new = zero
    for k in range(1, slots + 1):
        use = k_row == k
        wp = lagrange_weights(theta[:k], big_j[:k])
        wc = lagrange_weights([torch.ones_like(h)] + theta[:k], big_j[: k + 1])
        w_new = torch.where(use, wc[0], w_new)
        for i in range(k):
            w_pred[i] = torch.where(use, wp[i], w_pred[i])
            w_corr[i] = torch.where(use, wc[i + 1], w_corr[i])
    return torch.stack(w_pred, 1), w_new, torch.stack(w_corr, 1)


# ----------------------------------------------------------------------------- UniPC's B(h) and rho
#: UniPC's choices of B(h) (Zhao et al. 2023, section 3.3): "bh1" B(h) = hh, "bh2" B(h) = e^{hh} - 1
UNIPC_VARIANTS = ("bh1", "bh2")


def unipc_b(hh: float, variant: str) -> float:
    """UniPC's B(h) at the signed step hh = kappa h (-h for data, +h for noise, :func:`kernel_sign`):
    hh for ``"bh1"``, expm1(hh) for ``"bh2"``; any B(h) = O(h) with B(h) != 0 keeps the order."""
    if variant == "bh1":
        return hh
    if variant == "bh2":
        return math.expm1(hh)
    raise ValueError(f"variant must be one of {', '.join(UNIPC_VARIANTS)}, got {variant!r}")


def unipc_rhos(hh: float, rks: list[float], variant: str) -> list[float]:
    """UniPC's coefficients rho_1 .. rho_p of the differences D1_k = (q_k - q_s) / r_k at the nodes
    r_k = (lambda_k - lambda_s) / h (Zhao et al. 2023, eq. (8)): the solution of

        sum_k rho_k r_k^{i-1} = b_i = i! hh phi_{i+1}(hh) / B(h),   i = 1 .. p,

    i.e. the weights that integrate the polynomial through the nodes exactly against the kernel (so
    B(h) rho_k does not depend on B and the rule is the Lagrange one of :func:`lagrange_weights`).
    With a single node (UniP-2's predictor, UniC-1's corrector) rho = 1/2, as the paper and diffusers
    take it: then B(h) matters (b_1 = 1/2 + O(h) for both variants, so the order is kept)."""
    if len(rks) == 1:
        return [0.5]
    b_h = unipc_b(hh, variant)
    phis = phi_functions(torch.tensor([hh], dtype=torch.float64), len(rks) + 1)
    b = torch.tensor(
        [math.factorial(i) * hh * float(phis[i][0]) / b_h for i in range(1, len(rks) + 1)], dtype=torch.float64
    )
    r = torch.tensor(rks, dtype=torch.float64)
    mat = torch.stack([r**i for i in range(len(rks))])
    return [float(v) for v in torch.linalg.solve(mat, b)]
