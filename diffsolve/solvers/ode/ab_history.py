"""ComfyUI's Euler with an Adams-Bashforth history (``_sample_cfgpp_history``), the sampler behind its
``cfgpp_ud10_ab``: in k-diffusion's variables y = (x - mu)/alpha against s = sigma/alpha, as
:mod:`diffsolve.solvers.ode.dpm2` (whose notation this module uses).
"""

from __future__ import annotations

from ...core.options import Option
from ...core.protocol import Query, Solver
from ...core.registry import register
from ..exponential.maths import model_output
from .dpm2 import ScaledVariables


def ab2_weights(h: float, h_prev: float) -> tuple[float, float]:
    """(c0, c1): the variable-step second-order Adams-Bashforth step h d_i-weights, the integral
    over [s_i, s_i + h] of the line through (s_{i-1}, d_{i-1}) and (s_i, d_i), h_prev = s_i - s_{i-1}:

        c0 = h + h^2 / (2 h_prev),    c1 = -h^2 / (2 h_prev)      (step = c0 d_i + c1 d_{i-1})"""
    c1 = -h * h / (2.0 * h_prev)
    return h - c1, c1


def zero_extrapolation(d, history: list, s: list[float], order: int):
    """The data prediction extrapolated to s = 0 from the last ones (``history`` the earlier ones,
    oldest first, at levels ``s`` = [..., s_{i-1}, s_i]): the line through the last two, or with
    ``order`` 2 and two earlier ones the parabola through the last three (Lagrange at 0)."""
    if order == 2 and len(history) > 1:
        s0, s1, s2 = s[-3:]
        w0 = s1 * s2 / ((s0 - s1) * (s0 - s2))
        w1 = s0 * s2 / ((s1 - s0) * (s1 - s2))
        w2 = s0 * s1 / ((s2 - s0) * (s2 - s1))
        return w0 * history[-2] + w1 * history[-1] + w2 * d
    s1, s2 = s[-2:]
    return d - s2 * (d - history[-1]) / (s2 - s1)


@register(
    "ud10-ab",
    family="ode",
    order=1,
    calls_per_step=1,
    deterministic=True,
    description="Euler blended with a variable-step AB2 history, eps extrapolated, x0 extrapolated to sigma = 0 "
    "(ComfyUI cfgpp_ud10_ab under CFG++)",
    reference="ComfyUI's _sample_cfgpp_history (PR #15951, 2026); CFG++: Chung et al. 2024, arXiv 2406.08070",
    cfg_pp_aliases=("cfgpp_ud10_ab",),
)
class UD10AB(Solver):
    """Euler with an Adams-Bashforth history: ComfyUI's ``_sample_cfgpp_history``, whose defaults
    here are those of its ``cfgpp_ud10_ab`` (ComfyUI's name for it under CFG++; that name gives
    ``ud10-ab-cfg-pp``). In y = (x - mu)/alpha against s = sigma/alpha, with D_i the data prediction
    x0_hat - mu and e_i the noise prediction at step i (under :class:`~diffsolve.guidance.CFGPlusPlus`
    the guided D and the unconditional e), for a step s -> s' (h = s' - s, h_p = s - s_prev):

        u_i   = e_i + w_u (h / h_p) (e_i - e_{i-1})              (w_u = ``uncond_history_weight``)
        E_i   = D_i + s' u_i - y_i,    d_i = E_i / h             (the CFG++ Euler step, and its slope)
        y'    = y_i + E_i + w_h (c0 d_i + c1 d_{i-1} - E_i)     (w_h = ``history_weight``)

    with the variable-step AB2 weights c0 = h + h^2/(2 h_p), c1 = -h^2/(2 h_p); the first step is
    y_1 = y_0 + E_0 (DDIM). On a step to s' = 0 the result is then moved toward D extrapolated to
    s = 0 by weight ``zero_weight``: y' <- y' + w_0 (D_0 - y'), with D_0 = D_i - s_i (D_i - D_{i-1}) /
    (s_i - s_{i-1}), or with ``zero_order`` 2 the parabola through the last three D. One model call
    per step. With w_u = w_h = w_0 = 0 it is DDIM. ComfyUI takes the same formulas in x/alpha against
    sigma/alpha for diffusion models, so there this is its sampler (the tests check three steps and
    the step to sigma = 0 against it written out by hand); for rectified flow it takes them in x
    against its own sigma = t, a different discretisation.

    Accuracy: ``history_weight`` blends in a quarter of AB2's correction, so the method stays first
    order. ``uncond_history_weight`` > 0 makes it inconsistent: u_i -> e + w_u h de/ds, so the slope
    d_i tends to e + w_u s' de/ds, not the ODE's dy/ds = e, and refining the grid converges to
    another trajectory (on the mixture of :mod:`diffsolve.bench.orders` the error stalls at 0.15 from
    160 steps on). It is a guidance heuristic, not an ODE solver; ``uncond_history_weight=0`` gives a
    convergent first-order one (measured order 1.01), the setting the order table states.
    """

    history_weight = Option(
        0.25, "w_h: the weight of the AB2 step against the Euler step (0 is Euler)", low=0.0, high=1.0
    )
    zero_weight = Option(
        1.0, "w_0: the weight of D extrapolated to sigma = 0 on a step to sigma = 0 (0: off)", low=0.0, high=1.0
    )
    zero_order = Option(
        1, "the extrapolation to sigma = 0: 1 linear (last two D), 2 quadratic (last three)", choices=(1, 2)
    )
    uncond_history_weight = Option(0.1, "w_u: extrapolates e by w_u (h / h_prev)(e_i - e_{i-1}) (0: off)", low=0.0)
    steps_with_pair = True

    def run(self, x, grid, noise, *, schedule, mu=None):
        maps = ScaledVariables(schedule, mu)
        x, grid = yield from maps.enter(x, grid)
        e_prev = d_prev = None
        ds_hist: list = []  # the last two D
        s_hist: list[float] = []  # the levels they were at
        for i, t, t_next, s, s_next in maps.steps(grid):
            pred = yield Query(x, t, step=maps.first + i + 1)
            dat, e = model_output(pred, mu, "data"), pred.eps
            y = maps.y(x, t)
            h = s_next - s
            u = e
            if e_prev is not None and self.uncond_history_weight:
                u = e + (self.uncond_history_weight * h / (s - s_hist[-1])) * (e - e_prev)
            euler = dat + s_next * u - y
            step = euler
            if d_prev is not None and h != 0:
                c0, c1 = ab2_weights(h, s - s_hist[-1])
                step = euler + self.history_weight * (c0 * (euler / h) + c1 * d_prev - euler)
            y = y + step
            if s_next == 0 and self.zero_weight and ds_hist:
                y = y + self.zero_weight * (zero_extrapolation(dat, ds_hist, [*s_hist, s], self.zero_order) - y)
            x = maps.x(y, t_next)
            d_prev = euler / h if h != 0 else None
            e_prev = e
            ds_hist, s_hist = [*ds_hist, dat][-2:], [*s_hist, s][-2:]
        return x
