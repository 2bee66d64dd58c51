"""Measured convergence orders of the deterministic fixed-grid solvers on a closed-form oracle.

The oracle is a Gaussian in 4-D (:class:`diffsolve.models.GaussianMixture` with one component), whose
probability-flow map is exact. A solver runs from the same x_T with 20, 40, 80, 160 and 320 steps on the
log-SNR grid; its order is log2 of the ratio of the max errors at the last doubling (160 -> 320),
reported with the earlier ones.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from .. import schedules as S
from ..core.driver import sample
from ..core.options import declared
from ..core.registry import registered
from ..models import GaussianMixture

STEPS = (20, 40, 80, 160, 320)
GAUSS = GaussianMixture([[0.5, -1.0, 2.0, 0.0]], [[0.5, 1.0, 0.2, 2.0]])
MIXTURE = GaussianMixture([[1.0, -0.5, 0.3, 0.0], [-1.0, 0.5, 0.0, 0.8]], [[0.5, 1.0, 0.2, 0.7], [0.8, 0.3, 0.6, 1.0]])
#: the mixture's reference: torchdiffeq's dopri8 at this tolerance (1e-10 and 1e-12 differ by 9e-11)
REFERENCE_TOL = 1e-12
SCHEDULES = {
    "vp": lambda: S.VPLinear(),
    "ve": lambda: S.VE(),
    "flow": lambda: S.RectifiedFlow(t_min=1e-3, t_max=1 - 1e-3),
}
#: options that make an entry deterministic (its stated order is that of its deterministic limit)
DETERMINISTIC = {"ddim": {"eta": 0.0}}
#: options that make an entry convergent (its stated order is theirs; its defaults give an error floor)
CONVERGENT = {"ud10-ab": {"uncond_history_weight": 0.0}}


def top_order_options(name: str) -> dict:
    """The options an entry's stated order refers to: its deterministic limit, its convergent
    setting (``CONVERGENT``), the highest setting of an ``order`` option (``mrs-ode`` states 3, its
    default is 2), and no lowered order at the last steps (UniPC lowers it at every step count, as
    diffusers; its last step is then DDIM's, whose local error O(h^2) makes the global order 2 below
    errors of about 1e-7)."""
    opts = {**DETERMINISTIC.get(name, {}), **CONVERGENT.get(name, {})}
    info = {i.name: i for i in registered()}[name]
    spec = declared(info.cls).get("order")
    if spec is not None and spec.choices and "order" not in info.fixed:
        opts["order"] = max(spec.choices)
    if "lower_order_final" in declared(info.cls) and "lower_order_final" not in info.fixed:
        opts["lower_order_final"] = False  # a first-order last step caps the global order at 2
    return opts


_REFERENCES: dict = {}


def _problem(oracle: str, schedule: str):
    """(model, x_T, exact end state) of ``oracle`` ('gaussian': closed form; 'mixture': dopri8)."""
    key = (oracle, schedule)
    if key not in _REFERENCES:
        sched = SCHEDULES[schedule]()
        data = GAUSS if oracle == "gaussian" else MIXTURE
        model = data.model(sched)
        x_T = GAUSS.marginal(sched.t_max, sched).sample(64, torch.Generator().manual_seed(0))
        if oracle == "gaussian":
            exact = GAUSS.flow_map(x_T, sched.t_max, sched.t_min, sched)
        else:
            tol = REFERENCE_TOL
            exact = sample(model, "ode-dopri5", 1, x_T=x_T, rtol=tol, atol=tol, method="dopri8", progress=False).samples
        _REFERENCES[key] = (model, x_T, exact)
    return _REFERENCES[key]


def errors(
    solver: str, schedule: str = "vp", steps: Iterable[int] = STEPS, oracle: str = "gaussian", **options
) -> list[float]:
    """Max abs error against the exact flow map at each step count."""
    model, x_T, exact = _problem(oracle, schedule)
    out = []
    for n in steps:
        res = sample(model, solver, n, x_T=x_T, grid="log-snr", progress=False, **options)
        out.append(float((res.samples - exact).abs().max()))
    return out


def orders(errs: list[float]) -> list[float]:
    """log2 of the error ratio at each doubling."""
    return [math.log2(a / b) if a > 0 and b > 0 else math.nan for a, b in zip(errs, errs[1:])]


#: deterministic fixed-grid entries that do not converge to the ODE's solution as the steps shrink
NOT_CONVERGENT = {
    "edict": "error floor: order 2 down to about 3e-4, then the mixing (p = 0.93) stops convergence",
}


def measurable() -> list[str]:
    """The entries whose order a fixed-grid refinement measures: deterministic, fixed grid, convergent."""
    return [
        i.name
        for i in registered()
        if (i.deterministic or i.name in DETERMINISTIC) and i.fixed_grid and i.name not in NOT_CONVERGENT
    ]


def measure(names: Iterable[str] | None = None, schedule: str = "vp", oracle: str = "gaussian") -> dict[str, dict]:
    """{name: {"errors": [...], "orders": [...], "order": last doubling's order, "stated": registered order}}."""
    info = {i.name: i for i in registered()}
    out = {}
    for name in names if names is not None else measurable():
        errs = errors(name, schedule, oracle=oracle, **top_order_options(name))
        o = orders(errs)
        out[name] = {"errors": errs, "orders": o, "order": o[-1], "stated": info[name].order}
    return out
