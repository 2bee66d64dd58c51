"""Black-box adaptive solvers of the probability-flow ODE dx/dt = v(x, t) (``pred.velocity``).

The integrators (torchdiffeq's ``odeint``, scipy's ``solve_ivp``) call the drift themselves, so they
run in a worker thread and each drift call becomes a model query of the solver's generator: the
driver still makes every model call, counts it and checks it. They integrate from the grid's first
time to its last; the grid's inner points are ignored (NFE is whatever the error control needs).
"""

from __future__ import annotations

import queue
import threading

import numpy as np
import torch

from ...core.options import Option
from ...core.protocol import Outcome, Solver
from ...core.registry import register
from ...models.model import all_finite

_STOP = object()


class _Stopped(Exception):
    pass


class _BlackBox(Solver):
    """Runs ``self._integrate(drift, x, t0, t1) -> (x1, accepted, rejected)`` in a thread; drift calls
    become model queries. The step counts are the batch's (one error norm for the batch)."""

    METHODS: tuple[str, ...] = ()

    rtol = Option(1e-5, "the relative tolerance", low=0.0, low_open=True)
    atol = Option(1e-5, "the absolute tolerance", low=0.0, low_open=True)

    def run(self, x, grid, noise, *, schedule, mu=None):
        requests: queue.Queue = queue.Queue(maxsize=1)
        replies: queue.Queue = queue.Queue(maxsize=1)

        lo, hi = sorted((float(grid[0]), float(grid[-1])))

        def drift(t: float, y: torch.Tensor) -> torch.Tensor:
            # an integrator's probe for its first step size may lie outside the interval (t < 0 for a
            # short VP run): it is answered at the nearest end, inside the schedule's range
            requests.put(("query", y, min(max(float(t), lo), hi)))
            v = replies.get()
            if v is _STOP:
                raise _Stopped
            return v

        def work():
            try:
                requests.put(("done", self._integrate(drift, x, float(grid[0]), float(grid[-1])), None))
            except _Stopped:
                pass
            except BaseException as e:  # handed to the caller's thread
                requests.put(("error", e, None))

        t_end = float(grid[-1])
        threading.Thread(target=work, daemon=True, name=f"diffsolve-{self.name}").start()
        try:
            while True:
                kind, a, b = requests.get()
                if kind == "done":
                    y, acc, rej = a
                    counts = (
                        torch.full((x.shape[0],), acc, dtype=torch.long),
                        torch.full((x.shape[0],), rej, dtype=torch.long),
                    )
                    return Outcome(y, *counts)
                if kind == "error":
                    raise a
                if abs(b - t_end) <= 1e-12 * max(1.0, abs(t_end)):
                    b = t_end  # torchdiffeq looks just past the last step's end (step_t): the drift there is t_end's
                pred = yield a, b
                v = pred.velocity
                if not bool(all_finite(v)) and bool(all_finite(pred.output)):
                    raise ValueError(
                        f"{self.name}: the probability-flow drift is not finite at t={b:.6g}: a "
                        f"{pred.kind} prediction gives no velocity where sigma is (nearly) 0, and the "
                        "integrator evaluates it at t_min; integrate to t_min > 0 (e.g. t_min=1e-3)"
                    )
                replies.put(v)
        finally:
            if kind == "query":  # stopped early (an error in the driver): release the worker
                replies.put(_STOP)


@register(
    "ode-dopri5",
    family="adaptive",
    order=5,
    calls_per_step=6,
    deterministic=True,
    fixed_grid=False,
    description="adaptive probability-flow ODE with torchdiffeq (dopri5 or any adaptive method)",
    reference="Dormand & Prince 1980; Chen et al. 2018 (torchdiffeq); Song et al. 2021 (probability flow)",
    aliases=("dopri5",),
)
class TorchdiffeqODE(_BlackBox):
    """torchdiffeq ``odeint`` on the probability-flow ODE from t_max to t_min.

    Options: ``rtol``, ``atol`` (1e-5, Score-SDE's), ``method`` (torchdiffeq's adaptive methods:
    dopri5, dopri8, bosh3, fehlberg2, adaptive_heun, tsit5). Its error norm is the RMS over the whole
    batch, so the step sizes are shared by the batch.
    """

    METHODS = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun", "tsit5")

    method = Option("dopri5", "torchdiffeq's adaptive method", choices=METHODS)

    def _integrate(self, drift, x, t0, t1):
        from torchdiffeq import odeint

        ts = torch.tensor([t0, t1], dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
        f = _CountingDrift(drift)
        # step_t makes the last step land on t_min instead of stepping past it and interpolating
        # (a stage beyond t_min may leave the schedule's range, e.g. t < 0 for VP)
        y = odeint(f, x, ts, rtol=self.rtol, atol=self.atol, method=self.method, options={"step_t": ts[1:]})[-1]
        return y, f.accepted, f.rejected


@register(
    "ode-rk45",
    family="adaptive",
    order=5,
    calls_per_step=6,
    deterministic=True,
    fixed_grid=False,
    description="adaptive probability-flow ODE with scipy solve_ivp RK45 (Score-SDE's ODE sampler)",
    reference="Song et al. 2021, Score-Based Generative Modeling through SDEs (get_ode_sampler)",
    aliases=("rk45",),
)
class ScipyODE(_BlackBox):
    """scipy ``solve_ivp`` (RK45 by default) on the flattened float64 batch, as Score-SDE's ODE sampler.

    Options: ``rtol``, ``atol`` (1e-5), ``method`` (RK45, RK23, DOP853). One error norm for the batch.
    (The same loop as ``solve_ivp``, driven step by step so that accepted and rejected steps are counted.)
    """

    METHODS = ("RK45", "RK23", "DOP853")

    method = Option("RK45", "scipy's solve_ivp method", choices=METHODS)

    def _integrate(self, drift, x, t0, t1):
        import scipy.integrate

        shape, dtype, device = x.shape, x.dtype, x.device

        def f(t, y):
            v = drift(t, torch.from_numpy(y).reshape(shape).to(device=device, dtype=dtype))
            return v.detach().to("cpu", torch.float64).reshape(-1).numpy()

        y0 = x.detach().to("cpu", torch.float64).reshape(-1).numpy()
        # solve_ivp's own loop, step by step, to count the attempts: every attempt of an explicit
        # Runge-Kutta pair costs n_stages calls (first-same-as-last), so a step's calls tell its rejections
        solver = getattr(scipy.integrate, self.method)(f, t0, y0, t1, rtol=self.rtol, atol=self.atol)
        accepted = rejected = 0
        while solver.status == "running":
            before = solver.nfev
            message = solver.step()
            if solver.status == "failed":
                raise RuntimeError(f"scipy {self.method} failed at t = {solver.t:.6g}: {message}")
            accepted += 1
            rejected += max(0, round((solver.nfev - before) / solver.n_stages) - 1)
        y = torch.from_numpy(np.ascontiguousarray(solver.y)).reshape(shape).to(device=device, dtype=dtype)
        return y, accepted, rejected


class _CountingDrift:
    """The drift for torchdiffeq, counting accepted and rejected steps through its callbacks."""

    def __init__(self, drift):
        self.drift, self.accepted, self.rejected = drift, 0, 0

    def __call__(self, t, y):
        return self.drift(float(t.detach()) if isinstance(t, torch.Tensor) else float(t), y)

    def callback_accept_step(self, t0, y0, dt):
        self.accepted += 1

    def callback_reject_step(self, t0, y0, dt):
        self.rejected += 1
