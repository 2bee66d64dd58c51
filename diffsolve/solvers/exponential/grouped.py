"""Singlestep DPM-Solver(++) whose intermediate nodes are grid points: ``dpmpp-singlestep``, as
diffusers' DPMSolverSinglestepScheduler steps it (Lu et al. 2022, DPM-Solver; Lu et al. 2023,
DPM-Solver++, singlestep orders 1-3).

Notation as :mod:`.maths`: y = x - mu, lambda = log(alpha/sigma), q the model output integrated (x0_hat - mu
for 'data', eps_hat for 'noise'), and a step from s to t is y_t = decay y_s + w0 q_s + w1 D1 + w2 D2
with the weights of :func:`.maths.ode_weights`.
"""

from __future__ import annotations

import math

from ...core.options import Option
from ...core.protocol import Query, Solver
from ...core.registry import register
from .maths import alpha_sigma, half_log_snr, midpoint_weight, model_output, ode_weights


def group_orders(order: int, n: int, lower_order_final: bool, final_zero: bool) -> list[int]:
    """The order of each of n steps: the grid is cut into groups of ``order`` steps (1, 2, ..., order),
    a singlestep step of that order per group. With ``lower_order_final`` (needed unless n is a
    multiple of the order and the last sigma is > 0) the last group is shortened so that it ends with
    one first-order step (order 3: the last groups are (1, 2), (1) when n = 0 mod 3; order 2: (1, 1)
    when n is even); a final step to sigma = 0 is first order. diffusers' ``get_order_list``."""
    lower = lower_order_final or n % order != 0 or final_zero
    if order == 1:
        orders = [1] * n
    elif not lower:
        orders = list(range(1, order + 1)) * (n // order)
    elif order == 3:
        tail = {0: [1, 2, 1], 1: [1], 2: [1, 2]}[n % 3]
        orders = [1, 2, 3] * ((n - len(tail)) // 3) + tail
    else:
        tail = [1, 1] if n % 2 == 0 else [1]
        orders = [1, 2] * ((n - len(tail)) // 2) + tail
    if final_zero:
        orders[-1] = 1
    return orders[:n]


@register(
    "dpmpp-singlestep",
    family="ode",
    order=3,
    calls_per_step=1,
    deterministic=True,
    description="singlestep DPM-Solver++ (orders 1-3) with grid points as its stages (diffusers DPMSolverSinglestep)",
    reference="Lu et al. 2022, DPM-Solver (NeurIPS); Lu et al. 2023, DPM-Solver++ (arXiv 2211.01095)",
)
class GroupedSinglestep(Solver):
    """Singlestep DPM-Solver++ (Lu et al. 2023; ``parameterization='noise'``: DPM-Solver, Lu et al.
    2022) as diffusers' DPMSolverSinglestepScheduler runs it: the grid is cut into groups of k
    consecutive steps (:func:`group_orders`) and a group from s = t_j over the nodes t_j, ..., t_{j+k}
    is one singlestep step of order k whose stages are the grid points inside it. With
    h = lambda_{j+k} - lambda_j, theta_m = (lambda_{j+m} - lambda_j)/h and q_m the output at node m
    (evaluated at the state the previous stage gave), the m-th step of the group (order m) gives the
    state at t_{j+m} from y_s:

        order 1:  y = decay y_s + w0 q_0                                            (DPM-Solver++(1), DDIM)
        order 2:  E1 = (q_1 - q_0)/theta_1;     y = decay y_s + w0 q_0 + c E1
                  c = w0/2 ('midpoint') or w1 ('heun': the Taylor coefficient alpha_t phi_2)
        order 3:  E2 = (q_2 - q_0)/theta_2;    midpoint: y = decay y_s + w0 q_0 + w1 E2
                  heun: D1 = (theta_2 E1 - theta_1 E2)/(theta_2 - theta_1),
                        D2 = (E2 - E1)/(theta_2 - theta_1),  y = decay y_s + w0 q_0 + w1 D1 + w2 D2

    where (decay, w0, w1, w2) are the step's exponential-integrator weights from s to the node reached
    (:func:`.maths.ode_weights`). One model call per grid step (the stages are the grid's own points);
    order ``order`` per group. A group that would start where alpha = 0 (lambda = -inf, rectified flow's
    t = 1) has no log-SNR for its stages: its first step is taken alone and the group starts at the next point.
    """

    order = Option(2, "the singlestep order (steps per group)", choices=(1, 2, 3))
    parameterization = Option(
        "data", "the model output integrated: 'data' (DPM-Solver++) or 'noise' (DPM-Solver)", choices=("data", "noise")
    )
    solver_type = Option(
        "midpoint",
        "the higher-order coefficients: 'midpoint' (diffusers' default) or 'heun'",
        choices=("midpoint", "heun"),
    )
    lower_order_final = Option(
        False,
        "end with a shortened group (as diffusers, forced where n is no multiple of the order or sigma ends at 0)",
    )

    def run(self, x, grid, noise, *, schedule, mu=None):
        n = len(grid) - 1
        ts = [float(t) for t in grid]
        ab = [alpha_sigma(schedule, t) for t in ts]
        lam = [half_log_snr(a, max(s, 0.0)) for a, s in ab]
        if ab[0][1] <= 0 or (self.parameterization == "noise" and ab[0][0] <= 0):
            raise ValueError(f"{self.name} cannot step from sigma = 0 (or, for 'noise', from alpha = 0)")
        orders = group_orders(self.order, n, self.lower_order_final, ab[-1][1] <= 0)
        q: list = []
        start, y_s = 0, None
        for i in range(n):
            pred = yield Query(x, ts[i], step=i + 1)
            y = pred.x if mu is None else pred.x - mu
            k = orders[i]
            if k > 1 and not math.isfinite(lam[start]):  # a group from alpha = 0 (t = 1 of rectified flow):
                k = 1  # no log-SNR to place its stages in, so this step starts a new group
            k = min(k, i - start + 1)  # (so a later step of that group has fewer stages)
            if k == 1:
                start, y_s, q = i, y, []
            q.append(model_output(pred, mu, self.parameterization))
            (a_s, s_s), (a_t, s_t) = ab[start], ab[i + 1]
            h = lam[i + 1] - lam[start]
            w = ode_weights(self.parameterization, a_t, s_t, a_s, s_s, h)
            y = w.decay * y_s + w.w0 * q[0]
            if k >= 2:
                th = [(lam[start + m] - lam[start]) / h for m in range(k)]
                e = [(q[m] - q[0]) / th[m] for m in range(1, k)]
                if k == 2:
                    y = y + (midpoint_weight(w.w0) if self.solver_type == "midpoint" else w.w1) * e[0]
                elif self.solver_type == "midpoint":
                    y = y + w.w1 * e[1]
                else:
                    d1 = (th[2] * e[0] - th[1] * e[1]) / (th[2] - th[1])
                    d2 = (e[1] - e[0]) / (th[2] - th[1])
                    y = y + w.w1 * d1 + w.w2 * d2
            x = y if mu is None else y + mu
        return x
