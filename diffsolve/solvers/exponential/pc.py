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
The weights (:func:`.maths.phi_integrals`, :func:`.maths.lagrange_weights`, :func:`.maths.pc_weights`)
and the factors A, c (:func:`.maths.vc_factors`) live in :mod:`.maths`.
"""

from __future__ import annotations

import torch

from ...core.options import Option
from ...core.protocol import Query, Solver, per_row
from ...core.registry import register
from .maths import PARAMETERIZATIONS, model_output, pc_weights, vc_factors

Tensor = torch.Tensor


def combine(a: Tensor, y: Tensor, c: Tensor, w: Tensor, hist: Tensor) -> Tensor:
    """A y + c sum_i w_i hist_i (per row), as a fixed sequence of element-wise operations."""
    out = per_row(a, y) * y
    for i in range(w.shape[1]):
        out = out + per_row(c * w[:, i], y) * hist[i]
    return out


def pc_step(x: Tensor, m, hist: Tensor, lam_hist: Tensor, count: Tensor, ls: Tensor, h: Tensor, coefs, param: str, ask):
    """One predictor-corrector step of x (at ``ls``, per row) by ``h``: ``coefs`` = (alpha_t, sigma_t,
    alpha_s, sigma_s); ``ask(x_pred)`` is the query at the predicted point, which this generator
    yields. Returns (y_pred, y_corr, q_new), with y = x - m."""
    w_pred, w_new, w_corr = pc_weights(lam_hist, count, ls, h, hist.shape[0], param)
    a, c = vc_factors(param, *coefs)
    y = x if m is None else x - m
    y_pred = combine(a, y, c, w_pred, hist)
    q_new = model_output((yield ask(y_pred if m is None else y_pred + m)), m, param)
    return y_pred, combine(a, y, c, w_corr, hist) + per_row(c * w_new, y) * q_new, q_new


@register(
    "mrs-pc",
    family="ode",
    order=4,
    calls_per_step=1,
    deterministic=True,
    description="multistep MRS / DPM-Solver++ predictor-corrector (UniPC-type, PEC) on any grid; "
    "replays mrs-adaptive's pilot grid",
    reference="Zhao et al. 2023 (UniPC); Lu et al. 2023 (DPM-Solver++); Li et al. 2025 (MR Sampler)",
)
class MultistepPC(Solver):
    """The predictor-corrector steps of :mod:`.pc` (module docstring) on a fixed grid of
    any spacing: the predictor uses the last ``order - 1`` model outputs, the corrector adds the
    output at the predicted point, which the next step reuses, so N steps cost N + 1 calls. The
    first steps ramp up from DDIM. ``order`` 2, 3 or 4 (default; the corrector's order);
    ``parameterization`` ``"data"`` (default), ``"noise"`` or ``"velocity"``. A step to sigma = 0 is the
    first-order jump x = alpha x0_hat from a fresh call at the last state; a step from alpha = 0 (t = 1 of
    rectified flow) is a DDIM step, x = alpha_t x0_hat + sigma_t eps_hat, and the multistep history
    starts after it.
    """

    order = Option(4, "the order of the predictor-corrector pair (history length + 1)", choices=(2, 3, 4))
    parameterization = Option(
        "data", "the model output integrated: 'data' (x0), 'noise' (eps) or 'velocity'", choices=PARAMETERIZATIONS
    )

    def run(self, x, grid, noise, *, schedule, mu=None):
        b, dev, f64 = x.shape[0], x.device, torch.float64
        slots = self.order - 1
        lam_hist = torch.zeros(b, slots, dtype=f64, device=dev)
        count = torch.zeros(b, dtype=torch.long, device=dev)
        hist = None
        if schedule.at(float(grid[0]))[1] <= 0:  # as mrs-ode: inversion from the clean end
            raise ValueError(
                f"{self.name} cannot step away from sigma = 0 (its log-SNR is infinite): "
                "to invert, start from t_min > 0"
            )
        for i in range(len(grid) - 1):
            t, t_next = float(grid[i]), float(grid[i + 1])
            lam_s, lam_t = float(schedule.log_snr(t)), float(schedule.log_snr(t_next))
            if lam_t == float("inf"):  # to the clean end: the first-order jump from a fresh call
                pred = yield Query(x, t, step=i + 1)
                return pred.state_at(float(schedule.alpha(t_next)), 0.0)
            if lam_s == -float("inf"):  # from alpha = 0: a DDIM step (the history needs finite log-SNRs)
                pred = yield Query(x, t, step=i + 1)
                x = pred.state_at(*schedule.at(t_next))
                continue
            if hist is None:
                pred = yield Query(x, t, step=i + 1)
                x = pred.x
                hist = torch.zeros(slots, *x.shape, dtype=x.dtype, device=dev)
                hist[0] = model_output(pred, mu, self.parameterization)
                lam_hist[:, 0], count[:] = lam_s, 1
            ls = torch.full((b,), lam_s, dtype=f64, device=dev)
            hr = torch.full((b,), lam_t - lam_s, dtype=f64, device=dev)
            coefs = (schedule.alpha(t_next), schedule.sigma(t_next), schedule.alpha(t), schedule.sigma(t))
            _, y, q_new = yield from pc_step(
                x,
                mu,
                hist,
                lam_hist,
                count,
                ls,
                hr,
                coefs,
                self.parameterization,
                lambda xp, t=t_next, i=i: Query(xp, t, step=i + 1),
            )
            x = y if mu is None else y + mu
            hist = torch.cat([q_new[None], hist[:-1]])
            lam_hist = torch.cat([torch.full((b, 1), lam_t, dtype=f64, device=dev), lam_hist[:, :-1]], 1)
            count += 1
        return x
