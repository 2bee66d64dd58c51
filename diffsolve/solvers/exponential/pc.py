"""Multistep exponential predictor-corrector pairs in log-SNR, on variable steps.

With y = x - mu, q = x0_hat - mu (data parameterisation, as DPM-Solver++ / MRS) and lambda the
half log-SNR log(alpha / sigma), the exact flow from lambda_s by h is

    y_t = (sigma_t / sigma_s) y_s + alpha_t int_0^h e^{-(h - tau)} q(lambda_s + tau) dtau.

A multistep method replaces q by the polynomial P through its values at the last k accepted times
(lambda_s and the k - 1 before it) and integrates it exactly against the exponential weight:

    predictor (order k):     y_t^P = (sigma_t / sigma_s) y_s + alpha_t sum_i w_i q_i
    model call at y_t^P:     q_t = q(y_t^P, lambda_t)
    corrector (order k + 1): y_t^C = (sigma_t / sigma_s) y_s + alpha_t (w_t^C q_t + sum_i w_i^C q_i)

with w_i = int_0^h e^{-(h - tau)} l_i(tau) dtau for the Lagrange basis l_i of the nodes, i.e. in
theta = tau / h, sum_j c_ij J_j with J_j = h j! phi_{j+1}(-h) and phi_{j+1}(z) = sum_m z^m / (m + j + 1)!.
k = 1 gives DDIM and the second-order trapezoidal-type corrector; k = 2, 3 on a uniform grid are
DPM-Solver++(2M) / (3M)-type predictors and UniPC-type correctors (Zhao et al. 2023, UniPC; Lu et al.
2023, DPM-Solver++; Li et al. 2025, MRS for the mean-reverting form). The corrected y_t continues;
q_t (the value at the predicted point, PEC) joins the history, so a step costs one model call.
``noise`` (q = eps_hat) has the same structure with y_t = (alpha_t / alpha_s) y_s - sigma_t int_0^h
e^{(h - tau)} q dtau, i.e. phi_{j+1}(+h) and the weight -sigma_t. ``velocity`` (q = v_hat, as in
mrs-ode): u = y / r with r = sqrt(alpha^2 + sigma^2) has du/dphi = v in phi = atan(sigma / alpha) =
atan(e^{-lambda}), so y_t = (r_t / r_s) y_s + r_t int_{phi_s}^{phi_t} P(phi) dphi: the same
Lagrange weights with nodes in phi and plain integrals J_j = H / (j + 1), H = phi_t - phi_s (the
Adams-Bashforth-Moulton pair in phi).

The difference y^C - y^P = O(h^{k+1}) is the predictor's local error estimate, which the adaptive
``mrs-adaptive`` controls; ``mrs-pc`` runs the same steps on a fixed grid (it replays a pilot grid).
"""

from __future__ import annotations

import math

import torch

from ...core.protocol import Query, Solver, col
from ...core.registry import register

Tensor = torch.Tensor

PARAMS = ("data", "noise", "velocity")


def phi_integrals(h: Tensor, n: int, sign: float) -> list[Tensor]:
    """J_j = int_0^h e^{sign (h - tau)} (tau / h)^j dtau = h j! phi_{j+1}(sign h), j = 0 .. n - 1
    (per row, float64): the closed-form recursion for |h| >= 1/2, the power series below."""
    z = sign * h
    closed, p = [], torch.expm1(z) / z
    for j in range(n):
        closed.append(p)
        p = (p - 1.0 / math.factorial(j + 1)) / z
    out = []
    for j in range(n):
        s, term = torch.zeros_like(h), torch.full_like(h, 1.0 / math.factorial(j + 1))
        for m in range(16):  # |z| < 1/2: the 16th term is below 1e-19 of the first
            s = s + term
            term = term * z / (m + j + 2)
        out.append(h * math.factorial(j) * torch.where(h.abs() < 0.5, s, closed[j]))
    return out


def lagrange_weights(nodes: list[Tensor], big_j: list[Tensor]) -> list[Tensor]:
    """Weights sum_j c_ij J_j of the Lagrange basis polynomials l_i(theta) = sum_j c_ij theta^j of the
    (per-row) ``nodes``: element-wise only, so a row's weights do not depend on its batch."""
    out = []
    for i, ni in enumerate(nodes):
        coef, den = [torch.ones_like(ni)], torch.ones_like(ni)
        for j, nj in enumerate(nodes):
            if j == i:
                continue
            coef = [(coef[k - 1] if k else 0.0) - (nj * coef[k] if k < len(coef) else 0.0)
                    for k in range(len(coef) + 1)]
            den = den * (ni - nj)
        out.append(sum(c * jj for c, jj in zip(coef, big_j)) / den)
    return out


def pc_weights(lam_hist: Tensor, count: Tensor, ls: Tensor, h: Tensor, slots: int, param: str):
    """Per-row weights of one predictor-corrector step from ``ls`` by ``h``.

    ``lam_hist`` [R, slots]: the history's log-SNRs, newest (= ls) first; ``count`` [R]: how many are
    filled (k = min(count, slots) are used). Returns (w_pred [R, slots], w_new [R], w_corr [R, slots]),
    zero beyond k, to be multiplied by the step's scale (alpha_t for data, -sigma_t for noise)."""
    if param == "velocity":  # nodes and step in phi = atan(e^{-lambda}), plain integrals
        phi_s = _phi(ls)
        step = _phi(ls + h) - phi_s
        big_j = [step / (j + 1) for j in range(slots + 1)]
        theta = [(_phi(lam_hist[:, i]) - phi_s) / step for i in range(slots)]
    else:
        big_j = phi_integrals(h, slots + 1, -1.0 if param == "data" else 1.0)
        theta = [(lam_hist[:, i] - ls) / h for i in range(slots)]
    k_row = count.clamp_max(slots)
    zero = torch.zeros_like(h)
    w_pred = [zero] * slots
    w_corr = [zero] * slots
    w_new = zero
    for k in range(1, slots + 1):
        use = k_row == k
        wp = lagrange_weights(theta[:k], big_j[:k])
        wc = lagrange_weights([torch.ones_like(h)] + theta[:k], big_j[:k + 1])
        w_new = torch.where(use, wc[0], w_new)
        for i in range(k):
            w_pred[i] = torch.where(use, wp[i], w_pred[i])
            w_corr[i] = torch.where(use, wc[i + 1], w_corr[i])
    return torch.stack(w_pred, 1), w_new, torch.stack(w_corr, 1)


def _phi(lam: Tensor) -> Tensor:
    """phi = atan(sigma / alpha) at half log-SNR ``lam``."""
    return torch.atan(torch.exp(-lam))


def pc_coefs(param: str, a_t, s_t, a_s, s_s):
    """(A, c) with y_t = A y_s + c sum_i w_i q_i."""
    if param == "data":
        return s_t / s_s, a_t
    if param == "noise":
        return a_t / a_s, -s_t
    r_t = (a_t * a_t + s_t * s_t) ** 0.5
    return r_t / (a_s * a_s + s_s * s_s) ** 0.5, r_t


def combine(a: Tensor, y: Tensor, c: Tensor, w: Tensor, hist: Tensor) -> Tensor:
    """A y + c sum_i w_i hist_i (per row), as a fixed sequence of element-wise operations."""
    out = col(a, y) * y
    for i in range(w.shape[1]):
        out = out + col(c * w[:, i], y) * hist[i]
    return out


def pc_step(x: Tensor, m, hist: Tensor, lam_hist: Tensor, count: Tensor, ls: Tensor, h: Tensor, coefs, param: str,
            ask):
    """One predictor-corrector step of x (at ``ls``, per row) by ``h``: ``coefs`` = (alpha_t, sigma_t,
    alpha_s, sigma_s); ``ask(x_pred)`` is the query at the predicted point, which this generator
    yields. Returns (y_pred, y_corr, q_new), with y = x - m."""
    w_pred, w_new, w_corr = pc_weights(lam_hist, count, ls, h, hist.shape[0], param)
    a, c = pc_coefs(param, *coefs)
    y = x if m is None else x - m
    y_pred = combine(a, y, c, w_pred, hist)
    q_new = pc_output((yield ask(y_pred if m is None else y_pred + m)), m, param)
    return y_pred, combine(a, y, c, w_corr, hist) + col(c * w_new, y) * q_new, q_new


@register("mrs-pc", family="ode", order=4, calls_per_step=1, deterministic=True,
          description="multistep MRS / DPM-Solver++ predictor-corrector (UniPC-type, PEC) on any grid; replays mrs-adaptive's pilot grid",
          reference="Zhao et al. 2023 (UniPC); Lu et al. 2023 (DPM-Solver++); Li et al. 2025 (MR Sampler)")
class MultistepPC(Solver):
    """The predictor-corrector steps of :mod:`.exponential_pc` (module docstring) on a fixed grid of
    any spacing: the predictor uses the last ``order - 1`` model outputs, the corrector adds the
    output at the predicted point, which the next step reuses, so N steps cost N + 1 calls. The
    first steps ramp up from DDIM. ``order`` 2, 3 or 4 (default; the corrector's order);
    ``parameterization`` ``"data"`` (default), ``"noise"`` or ``"velocity"``. A step to sigma = 0 is the first-order jump
    x = alpha x0_hat from a fresh call at the last state; a step from alpha = 0 (t = 1 of rectified flow)
    is a DDIM step, x = alpha_t x0_hat + sigma_t eps_hat, and the multistep history starts after it.
    """

    def __init__(self, order: int = 4, parameterization: str = "data"):
        if order not in (2, 3, 4):
            raise ValueError(f"order must be 2, 3 or 4, got {order!r}")
        if parameterization not in PARAMS:
            raise ValueError(f"parameterization must be one of {', '.join(PARAMS)}, got {parameterization!r}")
        self.order, self.parameterization = order, parameterization

    def run(self, x, grid, noise, *, schedule, mu=None):
        b, dev, f64 = x.shape[0], x.device, torch.float64
        slots = self.order - 1
        lam_hist = torch.zeros(b, slots, dtype=f64, device=dev)
        count = torch.zeros(b, dtype=torch.long, device=dev)
        hist = None
        if schedule.at(float(grid[0]))[1] <= 0:  # as mrs-ode: inversion from the clean end
            raise ValueError(f"{self.name} cannot step away from sigma = 0 (its log-SNR is infinite): "
                             "to invert, start from t_min > 0")
        for i in range(len(grid) - 1):
            t, t_next = float(grid[i]), float(grid[i + 1])
            lam_s, lam_t = float(schedule.log_snr(t)), float(schedule.log_snr(t_next))
            if lam_t == float("inf"):  # to the clean end: the first-order jump from a fresh call
                pred = yield Query(x, t, step=i + 1)
                return pred.point(float(schedule.alpha(t_next)), 0.0)
            if lam_s == -float("inf"):  # from alpha = 0: a DDIM step (the history needs finite log-SNRs)
                pred = yield Query(x, t, step=i + 1)
                x = pred.point(*schedule.at(t_next))
                continue
            if hist is None:
                pred = yield Query(x, t, step=i + 1)
                x = pred.x
                hist = torch.zeros(slots, *x.shape, dtype=x.dtype, device=dev)
                hist[0] = pc_output(pred, mu, self.parameterization)
                lam_hist[:, 0], count[:] = lam_s, 1
            ls = torch.full((b,), lam_s, dtype=f64, device=dev)
            hr = torch.full((b,), lam_t - lam_s, dtype=f64, device=dev)
            coefs = (schedule.alpha(t_next), schedule.sigma(t_next), schedule.alpha(t), schedule.sigma(t))
            _, y, q_new = yield from pc_step(x, mu, hist, lam_hist, count, ls, hr, coefs, self.parameterization,
                                             lambda xp, t=t_next, i=i: Query(xp, t, step=i + 1))
            x = y if mu is None else y + mu
            hist = torch.cat([q_new[None], hist[:-1]])
            lam_hist = torch.cat([torch.full((b, 1), lam_t, dtype=f64, device=dev), lam_hist[:, :-1]], 1)
            count += 1
        return x


def pc_output(pred, mu, param: str) -> Tensor:
    """The model output the steps integrate: x0_hat - mu (data), eps_hat (noise) or v_hat (velocity)."""
    if param == "noise":
        return pred.eps
    if param == "velocity":
        return pred.v
    return pred.x0 if mu is None else pred.x0 - mu
