"""SA-Solver: the stochastic Adams predictor-corrector (Xue et al. 2023, SA-Solver: Stochastic Adams
Solver for Fast Sampling of Diffusion Models, NeurIPS, arXiv 2309.05019), as diffusers'
``SASolverScheduler`` (``sa-solver``) and with ComfyUI's PECE mode (``sa-solver-pece``).

Notation as :mod:`.maths`: y = x - mu, the model output q (x0_hat - mu for ``"data"``, eps_hat for
``"noise"``), lambda the half log-SNR, a step from s to t by h = lambda_t - lambda_s, and tau >= 0
the step's stochasticity (below). The reverse SDE with noise scale tau (tau = 0: the
probability-flow ODE, tau = 1: the reverse diffusion SDE) has the variation-of-constants solution
(Xue et al. 2023, section 4; the predictor's and corrector's coefficients are its eqs. (15) and
(18)); with c = 1 + tau^2 and z ~ N(0, I):

    data:  y_t = (sigma_t/sigma_s) e^{-tau^2 h} y_s + c alpha_t int_0^h e^{-c (h - u)} q(lambda_s + u) du
                 + sigma_t sqrt(1 - e^{-2 tau^2 h}) z
    noise: y_t = (alpha_t/alpha_s) y_s - c sigma_t int_0^h e^{(h - u)} q(lambda_s + u) du
                 + tau sigma_t sqrt(e^{2h} - 1) z

Adams steps replace q by the polynomial through k stored outputs at the nodes theta_i =
(lambda_i - lambda_s)/h (Lagrange basis), integrated exactly against the kernel: the weights
w_i = sum_j c_ij J_j of :func:`.maths.lagrange_weights` with J_j = int_0^h e^{kappa (h - u)} (u/h)^j du
(:func:`.maths.phi_integrals`, kappa = -c for data and +1 for noise), so that
y_t = decay y_s + C sum_i w_i q_i + std z with (decay, C, std) from the lines above.

SA-Predictor (k = predictor order): nodes s, s_{-1}, .., s_{-k+1} (the newest outputs). After the
model call at the predicted y_t gives q_t, the SA-Corrector (k = corrector order) repeats the step
from the same y_s with the same z and the nodes t, s, s_{-1}, .., s_{-k+2}. One model call per step:
the corrected y_t continues and q_t (from the predicted point) joins the history, as diffusers does;
``sa-solver-pece`` (PECE, ComfyUI's ``sa_solver_pece``) calls the model again at the corrected y_t
and that output replaces q_t (two calls per step). The last step is not corrected (no model call
after it).

``simple_order_2`` (Xue et al. 2023, App. D; diffusers always, in the data form; ComfyUI's
``simple_order_2``): a step with two nodes takes the plain first moment J_1 = h/2 in place of the
exponential one, which changes the step by O(h^3) and keeps the order.

tau: ``tau`` (the paper's tau, ComfyUI's eta) on the steps whose time lies in ``tau_window``
[lo, hi] (the schedule's t), 0 elsewhere; ``tau_at`` says which time: ``"start"`` (the step's
start, diffusers: tau = 1 for timesteps 200 <= k <= 800, i.e. t in [0.201, 0.801] on a 1000-step
discrete schedule, where t = (k + 1)/1000) or ``"end"`` (the step's end, ComfyUI: tau = eta while
sigma_next lies between the model's 20 % and 80 % points, t in about [0.2, 0.8]). The predictor
and the corrector of a step use the same tau. ``s_noise`` scales z.

Orders (diffusers, ``lower_order_final``): step i of n predicts with order min(P, i + 1, n - i)
and its corrector has order min(C, i + 2, n - i + 1) (warm-up and lowering at the end); where the
grid ends at sigma = 0, n counts the steps before that last one, which is the jump
y = alpha_t q_s (data; DDIM's last step for noise: the first-order step of :func:`.maths.ode_weights`)
without noise. A step with h = inf that starts at alpha = 0 (rectified flow's t = 1, data form) is
the limit of the first-order step on its newest node; a node at alpha = 0 (lambda = -inf) drops
out of the later steps. One normal draw per step even where tau = 0 (as diffusers draws it), so that
a replayed generator gives diffusers' noise; the predictor's draw is reused by the corrector.

Order: at tau = 0 (the ODE) the predictor alone (``corrector_order=0``) has order P and with the
corrector order min(P + 1, C), without ``lower_order_final`` (measured: (1, 0) 1, (2, 0) 2, (1, 2) 2,
(2, 3) 3, (3, 4) about 3.8 on fine grids). With it the last step is a first-order predictor step that
nothing corrects, which holds any (P, C) to order 2: both entries register order 2 (measured 2.2 at
their defaults). With tau > 0 the sampler is a weak first-order SDE scheme where the noise is on.

Peers. ``sa-solver`` is diffusers' SASolverScheduler (same noise, weights and orders; diffusers
builds its weights from monomials in the absolute log-SNR in float32, which drifts by up to 2e-4 at
orders 3-4). ComfyUI's ``sa_solver`` / ``sa_solver_pece`` (comfy/k_diffusion/sa_solver.py) take
predictor_order=3, corrector_order=4, tau_at="end", simple_order_2=False (``sa-solver-pece``'s
defaults) and differ from these steps in three details we do not copy: its window is the model's
20 % and 80 % points in sigma (t within a grid step of [0.2, 0.8]), it lowers the corrector's order
at the end one step earlier (min(C, n - j) at grid point j, where the grid ends at sigma = 0; on
other grids it lowers nothing, our lower_order_final=False), and it draws noise only on the steps
with tau > 0.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ...core.options import Option
from ...core.protocol import Query, Solver
from ...core.registry import register
from .maths import grid_nodes, lagrange_weights, model_output, ode_weights, phi_integrals

_F64 = torch.float64


def _window(value):
    """``tau_window``: None (tau everywhere) or a pair lo <= hi of times."""
    if value is None:
        return None
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"tau_window must be None or a pair (lo, hi) of times, got {value!r}") from None
    if not lo <= hi or math.isnan(lo) or math.isnan(hi):
        raise ValueError(f"tau_window must have lo <= hi, got {value!r}")
    return (lo, hi)


def _parameterization(value):
    """'data' / 'noise', also diffusers' algorithm_type spellings 'data_prediction' / 'noise_prediction'."""
    return value.split("_")[0]


def sa_step(
    param: str,
    y: torch.Tensor,
    outs: list[torch.Tensor],
    thetas: list[float],
    coefs: tuple[float, float, float, float],
    h: float,
    tau: float,
    z: torch.Tensor | None,
    simple_order_2: bool = False,
) -> torch.Tensor:
    """One SA-Solver step (predictor or corrector, module docstring) from y at s to t.

    ``outs``: the outputs at the nodes ``thetas`` = (lambda_i - lambda_s)/h, newest first;
    ``coefs``: (alpha_t, sigma_t, alpha_s, sigma_s); ``z``: the step's normal draw times s_noise
    (None: no noise). A step with h = inf (to sigma = 0, or from alpha = 0) is its limit on the
    first node."""
    a_t, s_t, a_s, s_s = coefs
    data = param == "data"
    if not math.isfinite(h):
        if s_t == 0.0 or not data:  # the jump to sigma = 0 (DDIM's last step), no noise
            w = ode_weights(param, a_t, s_t, a_s, s_s, h)
            return torch.mul(y, w.decay).add_(outs[0], alpha=w.w0)
        keep = 1.0 if tau == 0 else 0.0  # from alpha = 0: e^{-tau^2 h} -> 1 or 0, J_0 -> 1/c
        out = torch.mul(y, keep * s_t / s_s).add_(outs[0], alpha=a_t)
        return out if z is None or tau == 0 else out.add_(z, alpha=s_t)
    c = 1.0 + tau * tau
    hh = torch.tensor([h], dtype=_F64)
    big_j = phi_integrals(hh, len(outs), -c if data else 1.0)
    if simple_order_2 and data and len(outs) == 2:
        big_j[1] = hh / 2  # the plain first moment (Xue et al. 2023, App. D)
    weights = lagrange_weights([torch.tensor([th], dtype=_F64) for th in thetas], big_j)
    if data:
        decay, scale = (s_t / s_s) * math.exp(-tau * tau * h), c * a_t
        std = s_t * math.sqrt(-math.expm1(-2.0 * tau * tau * h))
    else:
        decay, scale = a_t / a_s, -c * s_t
        std = tau * s_t * math.sqrt(math.expm1(2.0 * h))
    out = torch.mul(y, decay)
    for wi, q in zip(weights, outs):
        out.add_(q, alpha=scale * float(wi))
    if z is not None and std > 0:
        out.add_(z, alpha=std)
    return out


@register(
    "sa-solver",
    family="sde",
    order=2,
    calls_per_step=1,
    deterministic=False,
    description="SA-Solver stochastic Adams predictor-corrector (diffusers SASolverScheduler, ComfyUI sa_solver)",
    reference="Xue et al. 2023, SA-Solver: Stochastic Adams Solver for Fast Sampling of Diffusion Models "
    "(NeurIPS, arXiv 2309.05019)",
)
class SASolver(Solver):
    """SA-Solver (module docstring). Defaults as diffusers' SASolverScheduler: predictor and corrector
    order 2, tau = 1 for step starts t in [0.2, 0.8], the simple order-2 steps, data form, one model
    call per step. ComfyUI's ``sa_solver``: ``predictor_order=3, corrector_order=4, tau_at="end",
    simple_order_2=False``."""

    predictor_order = Option(2, "the predictor's number of nodes (its order)", choices=(1, 2, 3, 4))
    corrector_order = Option(
        2, "the corrector's number of nodes, the new output included (0: no corrector)", choices=(0, 1, 2, 3, 4)
    )
    tau = Option(1.0, "the SDE's noise scale inside tau_window (0: the ODE; ComfyUI's eta)", low=0.0)
    eta: Option[Any] = Option(None, alias_of="tau")
    tau_window = Option(
        (0.2, 0.8), "times (lo, hi) of the steps that get tau, others 0 (None: all)", kind=object, convert=_window
    )
    tau_at = Option(
        "start",
        "which time of a step tau_window tests: 'start' (diffusers) or 'end' (ComfyUI)",
        choices=("start", "end"),
    )
    s_noise = Option(1.0, "a scale on the drawn noise (k-diffusion's s_noise)", low=0.0)
    parameterization = Option(
        "data",
        "the model output integrated: 'data' (x0, diffusers' data_prediction) or 'noise' (eps)",
        choices=("data", "noise", "data_prediction", "noise_prediction"),
        convert=_parameterization,
    )
    algorithm: Option[Any] = Option(None, alias_of="parameterization")
    simple_order_2 = Option(True, "two-node steps take the plain first moment h/2 (paper App. D; diffusers)")
    lower_order_final = Option(True, "lower the orders at the last steps (as diffusers)")
    #: call the model again at the corrected point (PECE: two calls per step); ``sa-solver-pece``
    pece = False

    def _tau(self, t: float, t_next: float) -> float:
        at = t if self.tau_at == "start" else t_next
        win = self.tau_window
        return self.tau if win is None or win[0] <= at <= win[1] else 0.0

    def run(self, x, grid, noise, *, schedule, mu=None):
        n = len(grid) - 1
        param = self.parameterization
        ts, alpha, sigma, lam = grid_nodes(self.name, grid, schedule, param)
        big_p, big_c = self.predictor_order, self.corrector_order
        n_eff = n - 1 if sigma[-1] == 0.0 and n > 1 else n  # the jump to sigma = 0 is not counted
        lof = self.lower_order_final

        def p_order(i: int) -> int:
            return max(1, min(big_p, i + 1, n_eff - i if lof else big_p))

        def c_order(i: int) -> int:
            return max(1, min(big_c, i + 2, n_eff - i + 1 if lof else big_c))

        def step(i: int, y, outs: list, nodes: list[int], z):
            """The step i -> i + 1 on the outputs ``outs`` at grid ``nodes`` (newest first)."""
            h = lam[i + 1] - lam[i]
            use = [(q, j) for q, j in zip(outs, nodes) if math.isfinite(lam[j])] if math.isfinite(h) else []
            if use:
                outs, nodes = [q for q, _ in use], [j for _, j in use]
            thetas = [(lam[j] - lam[i]) / h for j in nodes] if math.isfinite(h) else []
            coefs = (alpha[i + 1], sigma[i + 1], alpha[i], sigma[i])
            return sa_step(param, y, outs, thetas, coefs, h, taus[i], z, self.simple_order_2)

        taus = [self._tau(ts[i], ts[i + 1]) for i in range(n)]
        keep = max(big_p, big_c - 1)
        hist: list[torch.Tensor] = []  # outputs at grid points i, i - 1, ... (newest first)
        y_last, z_last = None, None
        for i in range(n):
            pred = yield Query(x, ts[i], step=i + 1)
            q = model_output(pred, mu, param)
            y = x if mu is None else x - mu
            if i > 0 and big_c > 0:  # correct the step i - 1 -> i with the new output
                k = c_order(i - 1)
                y = step(i - 1, y_last, [q, *hist[: k - 1]], list(range(i, i - k, -1)), z_last)
                if self.pece:
                    x = y if mu is None else y + mu
                    pred = yield Query(x, ts[i], step=i + 1)
                    q = model_output(pred, mu, param)
            hist = [q, *hist[: keep - 1]]
            z = noise.step(ts[i], ts[i + 1])
            z = z * self.s_noise if taus[i] > 0 and self.s_noise > 0 else None
            y_last, z_last = y, z
            k = p_order(i)
            y = step(i, y, hist[:k], list(range(i, i - k, -1)), z)
            x = y if mu is None else y + mu
        return x


@register(
    "sa-solver-pece",
    family="sde",
    order=2,
    calls_per_step=2,
    deterministic=False,
    description="SA-Solver in PECE mode (ComfyUI sa_solver_pece): the model called again after the corrector",
    reference="Xue et al. 2023, SA-Solver (NeurIPS, arXiv 2309.05019)",
)
class SASolverPECE(SASolver):
    """SA-Solver in PECE mode (module docstring) with ComfyUI's ``sa_solver_pece`` defaults: predictor
    order 3, corrector order 4, tau = eta = 1 where the step's end t lies in [0.2, 0.8], no simple
    order-2 steps; two model calls per step."""

    predictor_order = Option(3, "the predictor's number of nodes (its order)", choices=(1, 2, 3, 4))
    corrector_order = Option(
        4, "the corrector's number of nodes, the new output included (0: no corrector)", choices=(0, 1, 2, 3, 4)
    )
    tau_at = Option(
        "end", "which time of a step tau_window tests: 'start' (diffusers) or 'end' (ComfyUI)", choices=("start", "end")
    )
    simple_order_2 = Option(False, "two-node steps take the plain first moment h/2 (paper App. D; diffusers)")
    pece = True
