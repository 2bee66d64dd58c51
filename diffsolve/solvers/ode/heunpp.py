"""Heun++ (ComfyUI's ``sample_heunpp2``, from the sd-webui-samplers-scheduler extension): Euler
predictions one and two grid points ahead, and a slope that blends the three derivatives with
weights proportional to the noise level. Stepped in y = (x - mu)/alpha against s = sigma/alpha as
:mod:`diffsolve.solvers.ode.dpm2` (whose notation this module uses).
"""

from __future__ import annotations

from ...core.protocol import Query, Solver
from ...core.registry import register
from .dpm2 import ScaledVariables


@register(
    "heunpp2",
    family="ode",
    order=1,
    calls_per_step=3,
    deterministic=True,
    description="Heun++ (ComfyUI sample_heunpp2): Euler lookahead to the next two grid points, slopes blended by s",
    reference="Carzit, sd-webui-samplers-scheduler (Heun++); Karras et al. 2022 (Heun's method in sigma)",
)
class HeunPP2(Solver):
    """Heun++ (ComfyUI's ``sample_heunpp2``; no paper: a heuristic from the sd-webui-samplers-scheduler
    extension). In y = (x - mu)/alpha against s = sigma/alpha, with d = eps_hat (dy/ds) and s_0 the
    grid's first level, step i from s_i with s' = s_{i+1}, s'' = s_{i+2}:

        y_2 = y_i + (s' - s_i) d_1,          d_1 = d(y_i, s_i),    d_2 = d(y_2, s')
        y_3 = y_2 + (s'' - s') d_2,                                d_3 = d(y_3, s'')
        y_{i+1} = y_i + (s' - s_i) (w_1 d_1 + w_2 d_2 + w_3 d_3),  w_2 = s'/(3 s_0), w_3 = s''/(3 s_0),
                                                                   w_1 = 1 - w_2 - w_3

    The step before the last (s'' the grid's end) blends two slopes, w_2 = s'/(2 s_0),
    w_1 = 1 - w_2 (Heun's lookahead), and the last step is Euler. Three model calls per step (two on
    the step before the last, one on the last: 3N - 3 in all). The weights fall with the noise level,
    so away from the start it is Euler with a small correction: it converges with order 1 (the
    registered order; it is meant for few steps, not for convergence). Its lookahead extrapolates
    against the flow when run backwards (digits-vp round trip at 20 steps: 3.9e4), so it does not
    invert.
    """

    runs_backward = False
    backward_refusal = (
        "its lookahead to the next two grid points extrapolates against the flow when run backwards "
        "(a round trip on digits-vp is off by 3.9e4 at 20 steps)"
    )

    def run(self, x, grid, noise, *, schedule, mu=None):
        maps = ScaledVariables(schedule, mu)
        x, grid = yield from maps.enter(x, grid)
        steps = list(maps.steps(grid))
        if not steps:
            return x
        levels = [s for _, _, _, s, _ in steps] + [steps[-1][4]]  # s at every grid point
        s0, n = levels[0], len(steps)
        for i, t, t_next, s, s_next in steps:
            step = maps.first + i + 1
            pred = yield Query(x, t, step=step)
            y, d = maps.y(pred.x, t), pred.eps
            if i == n - 1:  # the last step: Euler
                x = maps.x(y + (s_next - s) * d, t_next)
                continue
            y2 = y + (s_next - s) * d
            d2 = (yield Query(maps.x(y2, t_next), t_next, step=step)).eps
            if i == n - 2:  # the step before the last: two slopes
                w2 = s_next / (2 * s0)
                slope = (1 - w2) * d + w2 * d2
            else:
                t3, s3 = float(grid[i + 2]), levels[i + 2]
                y3 = y2 + (s3 - s_next) * d2
                d3 = (yield Query(maps.x(y3, t3), t3, step=step)).eps
                w2, w3 = s_next / (3 * s0), s3 / (3 * s0)
                slope = (1 - w2 - w3) * d + w2 * d2 + w3 * d3
            x = maps.x(y + (s_next - s) * slope, t_next)
        return x
