"""DPM-Solver (Lu et al. 2022, "DPM-Solver: A Fast ODE Solver for Diffusion Probabilistic Model
Sampling in Around 10 Steps", NeurIPS) as k-diffusion's ``sample_dpm_fast`` and
``sample_dpm_adaptive`` run it: ``dpm-fast`` and ``dpm-adaptive``.

Both step the noise-prediction (not ++) singlestep rules of :func:`.singlestep.singlestep_pair` with
``param="noise"`` in the half log-SNR lambda = log(alpha / sigma) (k-diffusion's t = -log sigma for
its variance-exploding x): with y = x - mu, eps_hat the model's noise, h = lambda_t - lambda_s,

    DPM-Solver-1:  y_t = (alpha_t/alpha_s) y_s - sigma_t (e^h - 1) eps_s
    DPM-Solver-2:  u = (alpha_r/alpha_s) y_s - sigma_r (e^{r h} - 1) eps_s  (r = 1/2),   eps_r = eps_hat(u, lambda_s + r h)
                   y_t = DPM-Solver-1 - sigma_t (e^h - 1) (eps_r - eps_s) / (2 r)
    DPM-Solver-3:  r1 = 1/3, r2 = 2/3;  u1 as u with r1, eps_1 = eps_hat(u1, lambda_s + r1 h)
                   u2 = (alpha_2/alpha_s) y_s - sigma_2 (e^{r2 h} - 1) eps_s - sigma_2 (r2/r1) ((e^{r2 h} - 1)/(r2 h) - 1) (eps_1 - eps_s)
                   y_t = DPM-Solver-1 - sigma_t ((e^h - 1)/h - 1) (eps_2 - eps_s) / r2,   eps_2 = eps_hat(u2, lambda_s + r2 h)

(Lu et al. 2022, Algorithms 1 and 2 / eq. (3.7)-(3.9) with the paper's r1 = 1/3, r2 = 2/3).

Ancestral noise (``eta`` > 0, both solvers, as k-diffusion's): with k-diffusion's noise levels
s = sigma/alpha = e^{-lambda}, a step from s to s' goes deterministically to sigma_down of
:func:`~diffsolve.solvers.sde.ancestral.ancestral_split` (no lower than the run's end) and adds
s_noise sqrt(s'^2 - sigma_down^2) z to y / alpha, reaching noise level s' again.

Ends. Both take only the grid's ends and ignore its interior points (k-diffusion's samplers take
sigma_min and sigma_max). Where an end has sigma = 0 (infinite log-SNR: a ComfyUI sigma list ending at
0) the run ends at the grid point before it, as ComfyUI's ``dpm_fast`` / ``dpm_adaptive`` take
``sigmas[-2]``: the result is then the state at that small noise level, not denoised further.
"""

from __future__ import annotations

import math

import torch

from ...core.adaptive import AdaptiveSolver, Clock, Try
from ...core.control import StepSizeController
from ...core.options import Option
from ...core.protocol import Outcome, Solver, per_row, take_rows
from ...core.registry import register
from .adaptive import _ATOL, _H_INIT, _RTOL, _SinglestepTries
from .maths import at_log_snr
from .singlestep import singlestep_pair

Tensor = torch.Tensor

ETA = Option(
    0.0,
    "k-diffusion's eta: the fraction of ancestral noise (0: the deterministic probability-flow ODE solver)",
    low=0.0,
)
S_NOISE = Option(1.0, "k-diffusion's s_noise, a scale on the drawn noise", low=0.0)


def log_snr_ends(schedule, grid, name: str) -> tuple[float, float, float, float]:
    """(t_start, t_end, lambda_start, lambda_end) of a run on ``grid``: its first and last points, an
    end with sigma = 0 (lambda = +inf) replaced by its neighbour (ComfyUI's ``sigmas[-2]``); an end
    with alpha = 0 (lambda = -inf) is an error."""
    ts = [float(t) for t in grid]
    if len(ts) < 2:
        raise ValueError(f"{name} needs a grid of at least two times, got {len(ts)}")
    ends = [0, len(ts) - 1]
    for k, inner in ((0, 1), (1, len(ts) - 2)):
        lam = float(schedule.log_snr(ts[ends[k]]))
        if lam == math.inf and len(ts) > 2:
            ends[k] = inner
        elif lam == -math.inf:
            raise ValueError(
                f"{name} steps in log-SNR, finite only where alpha > 0: t = {ts[ends[k]]:.6g} has alpha = 0; "
                "start below the schedule's end (e.g. t_max=0.999)"
            )
    t0, t1 = ts[ends[0]], ts[ends[1]]
    lam0, lam1 = float(schedule.log_snr(t0)), float(schedule.log_snr(t1))
    if not (math.isfinite(lam0) and math.isfinite(lam1)) or lam0 == lam1:
        raise ValueError(
            f"{name} needs two ends with finite, different log-SNRs, got t = {t0:.6g} and {t1:.6g}: use "
            "t_min with sigma > 0 (e.g. 1e-3) and, for rectified flow, t_max < 1 (or a grid with a point "
            "before its sigma = 0 end)"
        )
    return t0, t1, lam0, lam1


def fast_orders(nfe: int) -> list[int]:
    """dpm-fast's orders for ``nfe`` model calls: floor(nfe/3) + 1 steps, DPM-Solver-3 but for the end:
    (..., 3, 2, 1) when 3 divides nfe, else (..., 3, nfe mod 3); they sum to nfe."""
    m = nfe // 3 + 1
    return [3] * (m - 2) + [2, 1] if nfe % 3 == 0 else [3] * (m - 1) + [nfe % 3]


def _down(s: float, s_next: float, eta: float, lam_end: float) -> tuple[float, float]:
    """(the log-SNR the deterministic part steps to, the ancestral noise's std in y / alpha) of a step
    from noise level s to s' (k-diffusion's: sigma_down no lower than the run's end)."""
    from ..sde.ancestral import ancestral_split  # here: the sde package imports this one's maths

    down, _ = ancestral_split(s, s_next, eta)
    lam_to = min(lam_end, -math.log(down)) if down > 0 else lam_end
    return lam_to, math.sqrt(max(s_next**2 - math.exp(-2.0 * lam_to), 0.0))


def _scaled(v: Tensor, m, a: Tensor) -> Tensor:
    """(v - mu) / alpha, per row: k-diffusion's variance-exploding variable."""
    return (v if m is None else v - m) / per_row(a, v)


@register(
    "dpm-fast",
    family="ode",
    order=3,
    calls_per_step=1,
    deterministic=True,
    description="DPM-Solver-3 singlestep (2, 1 at the end) uniform in log-SNR between the grid's ends; NFE = steps "
    "(k-diffusion sample_dpm_fast)",
    reference="Lu et al. 2022, DPM-Solver (NeurIPS); k-diffusion sample_dpm_fast",
)
class DPMFast(Solver):
    """DPM-Solver-fast (Lu et al. 2022, section 3.4; k-diffusion's ``sample_dpm_fast``).

    A grid of n steps buys n model calls: m = floor(n/3) + 1 steps uniform in lambda from the grid's
    first point to its last (a sigma = 0 end is replaced by its neighbour: module docstring), the
    **interior points of the grid are ignored** (only its ends and its length count). The steps are
    DPM-Solver-3 (3 calls) but for the last ones: (..., 3, 2, 1) when 3 divides n, else
    (..., 3, n mod 3) (:func:`fast_orders`), so the calls add up to n exactly. The update rules are the
    module docstring's (noise prediction, DPM-Solver, not ++). Order 3 when n = 2 (mod 3), where the
    run ends with DPM-Solver-2; otherwise its last step is DPM-Solver-1, whose O(h^2) local error makes
    the run second order as h -> 0 (measured on the closed-form Gaussian: tests/test_catalog_dpm_fast.py).

    ``eta`` > 0 adds k-diffusion's ancestral noise after each step (module docstring; sampling only),
    ``s_noise`` scales it. Runs backwards in time (inversion) with eta = 0.
    """

    eta = ETA
    s_noise = S_NOISE

    def noise_options(self):
        return {"eta": self.eta} if self.eta > 0 else {}

    def run(self, x, grid, noise, *, schedule, mu=None):
        _, _, lam0, lam1 = log_snr_ends(schedule, grid, self.name)
        if self.eta > 0 and lam1 < lam0:
            raise ValueError(f"{self.name}: eta must be 0 to run backwards in time (inversion), got {self.eta}")
        orders = fast_orders(len(grid) - 1)
        lams = torch.linspace(lam0, lam1, len(orders) + 1, dtype=torch.float64).tolist()
        b, dev, f64 = x.shape[0], x.device, torch.float64
        for i, order in enumerate(orders):
            lam_s, lam_t = lams[i], lams[i + 1]
            lam_to, up = (lam_t, 0.0) if self.eta == 0 else _down(math.exp(-lam_s), math.exp(-lam_t), self.eta, lam1)
            ls = torch.full((b,), lam_s, dtype=f64, device=dev)
            hr = torch.full((b,), lam_to - lam_s, dtype=f64, device=dev)
            _, _, _, high, t_to = yield from singlestep_pair(x, ls, hr, mu, schedule, order, None, i + 1, "noise")
            if up > 0 and self.s_noise > 0:
                a_to = schedule.alpha(t_to)
                t_s, t_n = (float(schedule.t_of_log_snr(torch.tensor(v, dtype=f64))) for v in (lam_s, lam_t))
                y = high / per_row(a_to, high) + (self.s_noise * up) * noise.step(t_s, t_n).to(high)
                high = float(schedule.alpha(torch.tensor(t_n, dtype=f64))) * y
            x = high if mu is None else high + mu
        return x


class _ScaledTries(_SinglestepTries):
    """dpm-adaptive's tries: mrs-adaptive's singlestep pairs (noise form) on the state u = (x - mu)/alpha,
    k-diffusion's variable, so that the error norm and its reference are k-diffusion's; with eta > 0 each
    try's higher solution carries the ancestral noise of its step (the error estimate does not)."""

    def __init__(self, solver: DPMAdaptive, noise, lam_end: float, b: int, dev, schedule, mu):
        super().__init__(self._pair, None, b, dev, schedule, mu)
        self.order, self.eta, self.s_noise = solver.order, solver.eta, solver.s_noise
        self.noise, self.lam_end = noise, lam_end

    def _pair(self, x, ls, hr, m, schedule, rows, it, path, cached):
        return (yield from singlestep_pair(x, ls, hr, m, schedule, self.order, rows, it, "noise", cached))

    def attempt(self, u, ls, hr, rows, it):
        m = take_rows(self.mu, rows)
        _, a_s, _ = at_log_snr(self.schedule, ls)
        lt = ls + hr
        up = None
        if self.eta > 0:
            split = [
                _down(math.exp(-a), math.exp(-b), self.eta, self.lam_end) for a, b in zip(ls.tolist(), lt.tolist())
            ]
            lt_to = torch.tensor([d for d, _ in split], dtype=ls.dtype, device=ls.device)
            up = torch.tensor([s for _, s in split], dtype=ls.dtype, device=ls.device)
        else:
            lt_to = lt
        x = per_row(a_s, u) * u
        step = yield from super().attempt(x if m is None else x + m, ls, lt_to - ls, rows, it)
        a_to = self.schedule.alpha(step.end)
        high = _scaled(step.high, m, a_to)
        if up is not None and self.s_noise > 0:
            high = high + per_row(self.s_noise * up, high) * self.noise.randn(rows).to(high)
        error = step.error / per_row(a_to, step.error)
        return Try(_scaled(step.x, m, a_s), _scaled(step.low, m, a_to), high, self.schedule.t_of_log_snr(lt), error)


@register(
    "dpm-adaptive",
    family="adaptive",
    order=3,
    calls_per_step=3,
    deterministic=True,
    fixed_grid=False,
    description="adaptive DPM-Solver-12 / 23 embedded pairs with k-diffusion's PID control, between the grid's ends "
    "(k-diffusion sample_dpm_adaptive)",
    reference="Lu et al. 2022, DPM-Solver (NeurIPS), DPM-Solver-12 / 23; k-diffusion sample_dpm_adaptive",
)
class DPMAdaptive(AdaptiveSolver):
    """Adaptive DPM-Solver (Lu et al. 2022, section 3.4 / appendix; k-diffusion's ``sample_dpm_adaptive``).

    Embedded pairs of the module docstring's rules, sharing their calls: ``order=3`` (default)
    DPM-Solver-2 with r = 1/3 against DPM-Solver-3 (3 calls per try), ``order=2`` DPM-Solver-1 against
    DPM-Solver-2 (2 calls); the step continues from the higher one. A retry after a rejection
    reuses its first call (k-diffusion calls it again, with the same result): NFE = calls x accepted +
    (calls - 1) x rejected. It runs in the shared loop (:func:`~diffsolve.core.adaptive.adaptive_loop`)
    from the grid's first point up in lambda to its last (the grid's interior is ignored; a sigma = 0
    end is replaced by its neighbour: module docstring), on k-diffusion's variable u = (x - mu)/alpha:

        E = u_high - u_low,   delta = max(atol, rtol max(|u_low|, |u_prev|))    (u_prev: the last accepted u_low)
        err = RMS(E / delta)
        f = 1 + atan(e^-b1 e_prev^-b2 e_prev2^-b3 - 1),   e = err + 1e-8,   b1 = (p + i + d)/k, b2 = -(p + 2d)/k, b3 = d/k
        accept when f >= accept_safety;  h <- h f  (accepted or not; the step taken is min(h, what is left))

    with k = ``order`` (1.5 when eta > 0) and e_prev, e_prev2 from the norms of the last two accepted
    steps (the first try's before there are any): :meth:`StepSizeController.pid
    <diffsolve.core.control.StepSizeController.pid>` with safety 1, ``limiter="atan"``,
    ``accept_factor=accept_safety``, ``start="first"`` and ``offset=1e-8`` (:meth:`default_controller`).

    Options (k-diffusion's defaults): ``order`` 3, ``rtol`` 0.05, ``atol`` 0.0078, ``h_init`` 0.05 (in
    lambda), ``pcoeff`` 0, ``icoeff`` 1, ``dcoeff`` 0, ``accept_safety`` 0.81, ``eta`` 0 and ``s_noise`` 1
    (ancestral noise on each accepted step, fresh normals per try), ``mode`` (``"per_sample"``,
    default: a step size per sample; ``"batch"``: one for the batch, from the RMS norm of the whole batch,
    k-diffusion's, which for one sample is the same run), ``controller``.
    """

    # the loop steps up in log-SNR until it reaches the grid's last time (not backwards: invert refuses it)
    runs_backward = False

    rtol = _RTOL
    atol = _ATOL
    h_init = _H_INIT
    order = Option(3, "the higher order of the embedded pair: 3 (DPM-Solver-23) or 2 (DPM-Solver-12)", choices=(2, 3))
    pcoeff = Option(0.0, "the PID controller's proportional coefficient (k-diffusion's pcoeff)", low=0.0)
    icoeff = Option(1.0, "the PID controller's integral coefficient (k-diffusion's icoeff)", low=0.0)
    dcoeff = Option(0.0, "the PID controller's derivative coefficient (k-diffusion's dcoeff)", low=0.0)
    accept_safety = Option(
        0.81, "a try is accepted when the step-size factor is at least this", low=0.0, low_open=True, high=1.0
    )
    eta = ETA
    s_noise = S_NOISE

    def noise_options(self):
        return {"eta": self.eta} if self.eta > 0 else {}

    def default_controller(self) -> StepSizeController:
        return StepSizeController.pid(
            1.5 if self.eta > 0 else self.order,
            self.pcoeff,
            self.icoeff,
            self.dcoeff,
            safety=1.0,
            limiter="atan",
            accept_factor=self.accept_safety,
            start="first",
            offset=1e-8,
            batch_norm="rms",
        )

    def run(self, x, grid, noise, *, schedule, mu=None):
        t0, t1, lam0, lam1 = log_snr_ends(schedule, grid, self.name)
        b, dev = x.shape[0], x.device
        tries = _ScaledTries(self, noise, lam1, b, dev, schedule, mu)
        f64 = torch.float64
        a0, a1 = (float(schedule.alpha(torch.tensor(t, dtype=f64))) for t in (t0, t1))
        u = (x if mu is None else x - mu) / a0
        clock = Clock(lam0, lam1, label="log-SNR", times=(t0, t1))
        out = yield from self._loop(tries, u, clock, snap=1e-12, reference="low", cap=False)
        x = a1 * out.x
        stats = {"grids": out.grids}
        if self.mode == "batch":
            stats["grid"] = torch.tensor(out.grids[0], dtype=f64)
        return Outcome(x if mu is None else x + mu, accepted=out.accepted, rejected=out.rejected, stats=stats)
