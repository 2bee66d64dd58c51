"""Multistep exponential integrators over the general schedule form: the MR Sampler (MRS) and the
DPM-Solver family it contains.

With y = x - mu every schedule reads y_t = alpha_t y_0 + sigma_t eps, and the probability-flow ODE and
the reverse SDE are the linear ones DPM-Solver integrates (Li et al. 2025, MRS, section 3; Lu et al.
2022, DPM-Solver; Lu et al. 2023, DPM-Solver++). Stepping from s = t_i to t = t_{i+1}, with
h = lambda_t - lambda_s > 0 and the model output q converted to the solver-side parameterisation:

ODE, data (q = x0 - mu; DPM-Solver++), with phi1 = e^{-h} - 1, phi2 = phi1/h + 1, phi3 = phi2/h - 1/2:
    y_t = (sigma_t/sigma_s) y_s - alpha_t phi1 q_s + alpha_t phi2 D1 - 2 alpha_t phi3 D2
ODE, noise (q = eps; DPM-Solver), with phi1 = e^{h} - 1, phi2 = phi1/h - 1, phi3 = phi2/h - 1/2:
    y_t = (alpha_t/alpha_s) y_s - sigma_t (phi1 q_s + phi2 D1 + 2 phi3 D2)

The factor 2 on the D2 terms: D2 below estimates h^2 q''/2, and integrating the Taylor term
q'' (lambda - lambda_s)^2 / 2 exactly gives 2 alpha_t phi3 D2 (resp. 2 sigma_t phi3 D2). DPM-Solver's
reference code, diffusers, k-diffusion and the MRS code use phi3 D2 without the 2, which leaves a
local error O(h^3) and so a globally second-order "3M" method; with the 2 the measured order is 3
(tests/test_exponential.py). Orders 1 and 2 are exactly the published rules.
The weights (decay, w0, w1, w2) of y_t = decay y_s + w0 q_s + w1 D1 + w2 D2 come from
:func:`.maths.ode_weights` and :func:`.maths.sde_weights`; the module docstring of :mod:`.maths`
derives them from the variation-of-constants formula.
ODE, velocity (q = v, our form): with r = sqrt(alpha^2 + sigma^2) and tan(phi) = sigma/alpha, the
    normalised state u = y/r = cos(phi) y_0 + sin(phi) eps has du/dphi = v, integrated by variable-step
    Adams-Bashforth in phi: u_t = u_s + sum_j w_j v_j (w_j integrate the Lagrange basis over [phi_s, phi_t]).
SDE, data (SDE-DPM-Solver++), with p1 = 1 - e^{-2h}:
    y_t = (sigma_t/sigma_s) e^{-h} y_s + alpha_t p1 q_s + alpha_t (1 - p1/(2h)) D1 + sigma_t sqrt(p1) z
SDE, noise (SDE-DPM-Solver):
    y_t = (alpha_t/alpha_s) y_s - 2 sigma_t (phi1 q_s + phi2 D1) + sigma_t sqrt(e^{2h} - 1) z

Differences over past steps (multistep, one model call per step), with r0 = h_{i-1}/h, r1 = h_{i-2}/h:
    order 2:  D1 = (q_s - q_{s-1}) / r0                      (D2 = 0)
    order 3:  D1_0 = (q_s - q_{s-1}) / r0,  D1_1 = (q_{s-1} - q_{s-2}) / r1,
              D1 = D1_0 + (D1_0 - D1_1) r0/(r0 + r1),  D2 = (D1_0 - D1_1)/(r0 + r1)
``solver_type="taylor"`` uses the phi2 terms above (MRS's and DPM-Solver's multistep rule, diffusers'
"heun"); ``"midpoint"`` replaces the order-2 term by -alpha_t phi1 D1 / 2 (data), -sigma_t phi1 D1 / 2
(noise), + alpha_t p1 D1 / 2 (SDE data), - sigma_t phi1 D1 (SDE noise): k-diffusion's and diffusers'
default DPM-Solver++(2M). Order 3 has one form.

Warm-up: step i uses order min(order, i + 1). With ``lower_order_final`` and fewer than 15 steps the
last step is first order and the one before at most second order (DPM-Solver, diffusers); a step
that ends at sigma = 0 is first order (diffusers' ``final_sigmas_type="zero"``) unless the ODE
solver's ``final_order`` is 2 or 3: that step then integrates the noise prediction over
r = sigma/alpha by Adams-Bashforth through the last ``final_order`` model outputs
(:func:`.maths.adams_to_zero`; k-diffusion's lms rule), where the exponential form has no finite
step (h = inf).
"""

from __future__ import annotations

import torch

from ...core.options import Option
from ...core.protocol import Query, Solver
from ...core.registry import register
from .maths import (
    PARAMETERIZATIONS,
    AdamsToZero,
    ab_weights,
    grid_nodes,
    midpoint_weight,
    model_output,
    ode_weights,
    sde_noise_std,
    sde_weights,
    velocity_angle,
    velocity_radius,
)

SOLVER_TYPES = ("taylor", "midpoint")


def _step_orders(order: int, n: int, lower_order_final: bool, final_zero: bool) -> list[int]:
    orders = [min(order, i + 1) for i in range(n)]
    if lower_order_final and n < 15:
        orders[-1] = 1
        if n >= 2:
            orders[-2] = min(orders[-2], 2)
    if final_zero:
        orders[-1] = 1
    return orders


class _Multistep(Solver):
    """Shared machinery of the multistep exponential integrators (see the module docstring)."""

    order = Option(2, "the order of the multistep update (history length)", choices=(1, 2, 3))
    parameterization = Option(
        "data",
        "the model output integrated: 'data' (x0, DPM-Solver++), 'noise' (eps, DPM-Solver) or 'velocity'",
        choices=PARAMETERIZATIONS,
    )
    lower_order_final = Option(True, "lower the order at the last steps (stabler at few steps, as diffusers)")
    solver_type = Option(
        "taylor",
        "the second-order term: 'taylor' (MR Sampler / DPM-Solver's Taylor "
        "coefficient) or 'midpoint' (DPM-Solver++(2M)'s)",
        choices=SOLVER_TYPES,
    )

    final_order = 1  # the ODE solver's option (MRSODE); an SDE's last step is always first order

    def run(self, x, grid, noise, *, schedule, mu=None):
        n = len(grid) - 1
        g = grid_nodes(self.name, grid, schedule, self.parameterization)
        ts, sigma = g.t, g.sigma
        orders = _step_orders(self.order, n, self.lower_order_final, sigma[-1] == 0.0)
        hist: list[torch.Tensor] = []  # converted outputs, newest last
        last = AdamsToZero(self.final_order, g)
        for i in range(n):
            pred = yield Query(x, ts[i], step=i + 1)
            y = pred.pair_x if mu is None else pred.pair_x - mu  # x itself unless the pair is not consistent
            hist = (hist + [model_output(pred, mu, self.parameterization)])[-3:]
            last.record(g, i, pred.eps)
            y = last.step(y, g, i) if last.takes(i, n) else self._step(y, hist, i, orders[i], g, noise)
            x = y if mu is None else y + mu
            own = pred.eps_prediction()
            if own is not pred:  # a (x0, eps) pair not consistent with x: the history keeps what eps says
                hist[-1] = model_output(own, mu, self.parameterization)
        return x

    @staticmethod
    def _differences(q, i, k, lam):
        """(q_s, D1, D2) for order k from the history q (oldest first)."""
        h = lam[i + 1] - lam[i]
        if k == 1:
            return q[-1], None, None
        r0 = (lam[i] - lam[i - 1]) / h
        d1_0 = (q[-1] - q[-2]) / r0
        if k == 2:
            return q[-1], d1_0, None
        r1 = (lam[i - 1] - lam[i - 2]) / h
        d1_1 = (q[-2] - q[-3]) / r1
        d1 = d1_0 + (d1_0 - d1_1) * (r0 / (r0 + r1))
        d2 = (d1_0 - d1_1) / (r0 + r1)
        return q[-1], d1, d2


@register(
    "mrs-ode",
    family="ode",
    order=3,
    calls_per_step=1,
    deterministic=True,
    description="MR Sampler ODE: multistep exponential integrator, orders 1-3, data/noise/velocity",
    reference="Li et al. 2025, MRS: A Fast Sampler for Mean Reverting Diffusion (ICLR); Lu et al. 2022/2023",
)
@register(
    "dpmpp-2m",
    family="ode",
    order=2,
    calls_per_step=1,
    deterministic=True,
    fixed={"order": 2, "parameterization": "data", "solver_type": "midpoint"},
    description="DPM-Solver++(2M) (mrs-ode order 2, data, midpoint)",
    reference="Lu et al. 2023, DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic Models",
)
@register(
    "dpmpp-3m",
    family="ode",
    order=3,
    calls_per_step=1,
    deterministic=True,
    fixed={"order": 3, "parameterization": "data", "solver_type": "midpoint"},
    description="DPM-Solver++(3M) (mrs-ode order 3, data; third-order term with its Taylor factor 2)",
    reference="Lu et al. 2023, DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic Models",
)
@register(
    "dpm-solver-2m",
    family="ode",
    order=2,
    calls_per_step=1,
    deterministic=True,
    fixed={"order": 2, "parameterization": "noise", "solver_type": "midpoint"},
    description="multistep DPM-Solver-2 in noise form (mrs-ode order 2, noise, midpoint)",
    reference="Lu et al. 2022, DPM-Solver: A Fast ODE Solver for Diffusion Probabilistic Model Sampling",
)
class MRSODE(_Multistep):
    """The MR Sampler's ODE solver (see the module docstring for the update rules).

    Options: ``order`` 1, 2 or 3; ``parameterization`` ``"data"`` (default, stable at few steps),
    ``"noise"`` or ``"velocity"``, whatever the network predicts; ``lower_order_final``;
    ``solver_type`` ``"taylor"`` (default, MRS) or ``"midpoint"``; ``final_order`` (module docstring: a
    high-order last step into sigma = 0). One model call per step. With mu = 0
    this is DPM-Solver++ (data) / DPM-Solver (noise); for mean-reverting schedules
    MRS(x; mu) = mu + DPM-Solver(x - mu).

    ``published_d2=True`` takes the published third-order coefficient, half the Taylor-exact one
    (module docstring): -alpha_t phi3 D2 (data) / -sigma_t phi3 D2 (noise), as DPM-Solver's reference
    code, diffusers' ``DPMSolverMultistepScheduler(solver_order=3)`` and k-diffusion do. The method is
    then second order; the option exists for parity with those peers.

    With ``parameterization`` "data" or "noise" the step takes x0 and eps as separate terms
    (``steps_with_pair``): it steps from the state the pair composes, alpha x0 + (1 - alpha) mu +
    sigma eps (``Prediction.pair_x``; x for a plain model), with the current step's q from the pair
    and the past ones from the prediction eps makes at their x (``Prediction.eps_prediction``).
    Under :class:`~diffsolve.guidance.CFGPlusPlus` (guided x0, unconditional eps) ``dpmpp-2m``
    (the name ``dpmpp-2m-cfg-pp``) is then, in y = (x - mu)/alpha against s = sigma/alpha,

        y_{i+1} = (x0 - mu) + s' eps_u + ((1 - e^{-h}) / (2 r)) ((x0 - mu) - D_u,prev)

    ComfyUI's ``sample_dpmpp_2m_cfg_pp`` (D_u,prev: the previous step's unconditional x0 - mu).
    """

    @property
    def steps_with_pair(self) -> bool:  # type: ignore[override]
        return self.parameterization in ("data", "noise")

    final_order = Option(
        1,
        "the order of a last step that ends at sigma = 0: 1 (DDIM's step to the data prediction, as "
        "diffusers) or 2, 3 (Adams-Bashforth in sigma/alpha through the last outputs, k-diffusion lms's rule)",
        choices=(1, 2, 3),
    )
    published_d2 = Option(
        False,
        "order 3 with the published D2 coefficient (DPM-Solver's code, diffusers, k-diffusion): half the "
        "Taylor-exact one, second order; for parity with those peers",
    )

    def _step(self, y, q, i, k, g, noise):
        if self.parameterization == "velocity":
            return self._velocity_step(y, q, i, k, g)
        h = g.lam[i + 1] - g.lam[i]
        w = ode_weights(self.parameterization, g.alpha[i + 1], g.sigma[i + 1], g.alpha[i], g.sigma[i], h)
        qs, d1, d2 = self._differences(q, i, k, g.lam)
        # y is rebuilt in place (fused multiply-adds: fewer passes over the state)
        y = torch.mul(y, w.decay).add_(qs, alpha=w.w0)
        if d1 is not None:
            y.add_(d1, alpha=midpoint_weight(w.w0) if (self.solver_type == "midpoint" and d2 is None) else w.w1)
        if d2 is not None:
            y.add_(d2, alpha=0.5 * w.w2 if self.published_d2 else w.w2)
        return y

    @staticmethod
    def _velocity_step(y, q, i, k, g):
        phi = [velocity_angle(g.alpha[j], g.sigma[j]) for j in range(i - k + 1, i + 2)]  # oldest .. t
        r_s = velocity_radius(g.alpha[i], g.sigma[i])
        r_t = velocity_radius(g.alpha[i + 1], g.sigma[i + 1])
        nodes = [phi[k - 1 - j] for j in range(k)]  # phi_s, phi_{s-1}, ... (newest first)
        w = ab_weights(nodes, phi[k - 1], phi[k])
        u = y / r_s
        for j in range(k):
            u = u + w[j] * q[-1 - j]
        return r_t * u


@register(
    "mrs-sde",
    family="sde",
    order=2,
    calls_per_step=1,
    deterministic=False,
    description="MR Sampler SDE: multistep exponential integrator, orders 1-2, data/noise",
    reference="Li et al. 2025, MRS: A Fast Sampler for Mean Reverting Diffusion (ICLR); Lu et al. 2023",
)
@register(
    "dpmpp-2m-sde",
    family="sde",
    order=2,
    calls_per_step=1,
    deterministic=False,
    fixed={"order": 2, "parameterization": "data", "solver_type": "midpoint"},
    description="SDE-DPM-Solver++(2M) (mrs-sde order 2, data, midpoint)",
    reference="Lu et al. 2023, DPM-Solver++ (SDE-DPM-Solver++(2M))",
)
class MRSSDE(_Multistep):
    """The MR Sampler's SDE solver (see the module docstring for the update rules).

    Options: ``order`` 1 or 2; ``parameterization`` ``"data"`` (default) or ``"noise"``;
    ``lower_order_final``; ``solver_type``. Noise is drawn at every step (none at a step ending at
    sigma = 0). Order 1 with data prediction is the jump-aware IR-SDE posterior step (DDPM on x - mu).
    """

    order = Option(2, "the order of the multistep update (history length)", choices=(1, 2))
    parameterization = Option(
        "data", "the model output integrated: 'data' (x0, SDE-DPM-Solver++) or 'noise' (eps)", choices=("data", "noise")
    )

    def _step(self, y, q, i, k, g, noise):
        coefs = (self.parameterization, g.alpha[i + 1], g.sigma[i + 1], g.alpha[i], g.sigma[i], g.lam[i + 1] - g.lam[i])
        qs, d1, _ = self._differences(q, i, k, g.lam)
        w = sde_weights(*coefs, order=1 if d1 is None else 2)
        y = w.decay * y + w.w0 * qs
        if d1 is not None:
            y = y + (midpoint_weight(w.w0) if self.solver_type == "midpoint" else w.w1) * d1
        std = sde_noise_std(*coefs)
        if std > 0:
            y = y + std * noise.step(g.t[i], g.t[i + 1])
        return y
