"""Adaptive exponential integrators: error-controlled MRS / DPM-Solver++ steps in log-SNR, with a step
size per sample.

mrs-adaptive's default pair is multistep: the variable-step predictor (order k, from the last k
model outputs) against the corrector that adds the output at the predicted point (order k + 1), one
model call per try; the update rules are in :mod:`.pc`. ``method="singlestep"`` and the
SDE pair use the singlestep rules below, as k-diffusion's ``dpm_adaptive`` does.

With y = x - mu, q = x0_hat - mu (the data parameterisation of MRS, i.e. DPM-Solver++), a step from
lambda_s by h > 0 in log-SNR, with phi1(h) = e^{-h} - 1 and phi2(h) = phi1(h)/h + 1, uses

    first order (DDIM):  y1 = (sigma_t/sigma_s) y_s - alpha_t phi1(h) q_s
    2S, r:               u = (sigma_r/sigma_s) y_s - alpha_r phi1(r h) q_s,   q_r = q(u, lambda_s + r h)
                         y2 = y1 - alpha_t phi1(h) (q_r - q_s) / (2 r)
    3S (r1 = 1/3, r2 = 2/3):
                         u2 = (sigma_2/sigma_s) y_s - alpha_2 phi1(r2 h) q_s
                              + alpha_2 (r2/r1) phi2(r2 h) (q_1 - q_s),          q_2 = q(u2, lambda_s + r2 h)
                         y3 = y1 + alpha_t phi2(h) (q_2 - q_s) / r2

(Lu et al. 2023, DPM-Solver++ singlestep; Li et al. 2025, MRS, for the mean-reverting form).
``parameterization="noise"`` (q = eps; DPM-Solver's singlestep rules, Lu et al. 2022, which
dpm_adaptive uses) has the same structure with y1 = (alpha_t/alpha_s) y_s - sigma_t (e^h - 1) q_s,
the 2S correction -sigma_t (e^h - 1) (q_r - q_s) / (2 r) and the 3S weight -sigma_t ((e^h - 1)/h - 1)
in place of alpha_t phi2 (and likewise at the inner points). Embedded
pairs share their model evaluations, as k-diffusion's ``dpm_adaptive`` does:
``order=2``: y1 / 2S(r = 1/2), 2 calls per try; ``order=3`` (default): 2S(r = 1/3) / 3S, 3 calls.
A retry after a rejection starts from the same state, so it reuses that first model call (as
dpm_adaptive's eps cache does): NFE = calls per try x accepted + (calls - 1) x rejected.
The local error estimate E = y_high - y_low goes to the shared :class:`StepSizeController` in the
shared loop, :func:`diffsolve.core.adaptive.adaptive_loop` (scaled
RMS norm with delta = max(atol, rtol max(|x_prev|, |x_low|)), accept when <= 1 by default); the step continues
from the higher-order solution. Default controller: I-control, safety 0.9, exponent 1/order, factor
limits [0.2, 5] (``controller=`` replaces it, e.g. PI / PID with ``exponent_prev`` / ``exponent_prev2``).

SDE pair (``mrs-sde-adaptive``, SDE-DPM-Solver++ / MRS SDE in data form), with p1(h) = 1 - e^{-2h}
and one Brownian path shared by both members and by every retry:

    N(s -> t) = sigma_t e^{-lambda_t} (B(e^{2 lambda_t}) - B(e^{2 lambda_s}))        (~ sigma_t sqrt(p1(h)) z)
    first order:  y1 = (sigma_t/sigma_s) e^{-h} y_s + alpha_t p1(h) q_s + N(s -> t)
    2S, r = 1/2:  u = (sigma_r/sigma_s) e^{-rh} y_s + alpha_r p1(rh) q_s + N(s -> r),   q_r = q(u, lambda_s + r h)
                  y2 = y1 + alpha_t (1 - p1(h)/(2h)) (q_r - q_s) / r

N is the exact noise of the variation-of-constants solution: its integrand sigma_t sqrt(2)
e^{-(lambda_t - lambda)} dW_lambda is a Brownian motion run on the clock e^{2 lambda}, so the two
members' noises have their exact joint law and a retry on a shorter step sees the same path (the
time-changed Brownian tree, :mod:`.brownian`). With ``noise="gaussian"`` every try draws its two
normals afresh. A Tweedie step at t_min ends the run (``denoise``).

``mode="per_sample"``: each sample has its own lambda and h and leaves the batch when it reaches
lambda(t_min); ``"batch"``: one h for all (the largest error norm decides). The result's ``stats``
give each sample's accepted times (``"grids"``, and ``"grid"`` in batch mode).
"""

from __future__ import annotations

from functools import partial
from typing import Any, ClassVar

import torch

from ...core.adaptive import AdaptiveSolver, Clock, Try
from ...core.control import StepSizeController
from ...core.noise import NoiseSource
from ...core.options import Option
from ...core.protocol import Outcome, Query, per_row, take_rows
from ...core.registry import register
from .maths import (
    at_log_snr,
    check_parameterization,
    fresh_variance,
    model_output,
    raw_output,
    sde_weights,
    shift_output,
)
from .pc import pc_step
from .singlestep import first_call, singlestep_pair

Tensor = torch.Tensor


class _LogSNRAdaptive(AdaptiveSolver):
    """mrs-adaptive and mrs-sde-adaptive: the tries of an embedded pair in log-SNR (singlestep or
    multistep, below) in the shared accept / reject loop,
    :func:`diffsolve.core.adaptive.adaptive_loop`, which owns each row's lambda and h, the controller's
    accept / reject and next h, and finished rows leaving the batch. A subclass gives ``_tries``: the
    per-run object of its kind of pair, and may give ``_end`` (a final step at t_min)."""

    order: int
    # the loop steps up in log-SNR until it reaches the grid's last time: on an inversion's ascending
    # grid that end is already behind it (one model call, the data handed back as the latent)
    runs_backward = False

    def _end(self, x, t_min: float, it: int):
        return x
        yield  # a generator that makes no query

    def run(self, x, grid, noise, *, schedule, mu=None):
        t_max, t_min = float(grid[0]), float(grid[-1])
        lam_max, lam_end = float(schedule.log_snr(t_max)), float(schedule.log_snr(t_min))
        if not (abs(lam_max) < float("inf") and abs(lam_end) < float("inf")):
            raise ValueError(
                f"{self.name} steps in log-SNR, which must be finite at both ends: use t_min with "
                "sigma > 0 (e.g. 1e-3) and, for rectified flow, t_max < 1 (e.g. 0.999)"
            )
        b, dev = x.shape[0], x.device
        tries = self._tries(noise, lam_max, lam_end, b, dev, schedule, mu)
        x = yield from tries.start(x, torch.full((b,), lam_max, dtype=torch.float64, device=dev))
        clock = Clock(lam_max, lam_end, label="log-SNR", times=(t_max, t_min))
        out = yield from self._loop(tries, x, clock, snap=1e-12)
        x = yield from self._end(out.x, t_min, out.iterations)
        stats = {"grids": out.grids}
        if self.mode == "batch":
            stats["grid"] = torch.tensor(out.grids[0], dtype=torch.float64)
        return Outcome(x, accepted=out.accepted, rejected=out.rejected, stats=stats)


def _in_x(xr: Tensor, low: Tensor, high: Tensor, tt: Tensor, m) -> Try:
    """A pair's result in y = x - mu as the loop's :class:`Try` in x (the error estimate in y)."""
    return Try(xr, low if m is None else low + m, high if m is None else high + m, tt, error=high - low)


class _SinglestepTries:
    """Singlestep pairs (a solver's ``_pair``): each try starts with a model call at its start, which a
    retry after a rejection reuses (its state and time are unchanged)."""

    def __init__(self, pair, path, b: int, dev, schedule, mu):
        self.pair, self.path, self.q = pair, path, None
        self.schedule, self.mu = schedule, mu
        self.fresh = torch.ones(b, dtype=torch.bool, device=dev)

    def start(self, x, lam):
        return x
        yield  # no query before the first try

    def attempt(self, x, ls, hr, rows, it):
        m = take_rows(self.mu, rows)
        cached = None if self.q is None else (self.q[rows], self.fresh[rows])
        xr, raw, low, high, tt = yield from self.pair(x, ls, hr, m, self.schedule, rows, it, self.path, cached)
        if self.q is None:
            self.q = raw.new_zeros((len(self.fresh), *raw.shape[1:]))
        self.q = self.q.index_copy(0, rows, raw)
        return _in_x(xr, low, high, tt, m)

    def commit(self, rows, ok, lam_new):
        self.fresh[rows] = ok


class _MultistepTries:
    """Multistep predictor-corrector pairs (:mod:`.pc`): one model call before the first
    try, then one per try, at the predicted point; an accepted try adds it to the row's history of
    ``order - 1`` outputs."""

    def __init__(self, order: int, param: str, schedule, mu):
        self.slots, self.param = order - 1, param
        self.schedule, self.mu = schedule, mu

    def start(self, x, lam):
        pred = yield Query(x, self.schedule.t_of_log_snr(lam), step=0)
        self.hist = torch.zeros(self.slots, *x.shape, dtype=x.dtype, device=x.device)
        self.hist[0] = model_output(pred, self.mu, self.param)
        # column 0 holds lambda; the others are placeholders (distinct, weighted by zero) until filled
        self.lam = lam[:, None] - torch.arange(self.slots, dtype=lam.dtype, device=lam.device)
        self.count = torch.ones_like(lam, dtype=torch.long)
        return pred.x

    def attempt(self, x, ls, hr, rows, it):
        m = take_rows(self.mu, rows)
        _, a_s, s_s = at_log_snr(self.schedule, ls)
        tt, a_t, s_t = at_log_snr(self.schedule, ls + hr)
        every = len(rows) == len(self.count)  # all rows active: no gather of the history
        hist = self.hist if every else self.hist[:, rows]
        y_pred, y_corr, self.new = yield from pc_step(
            x,
            m,
            hist,
            self.lam[rows],
            self.count[rows],
            ls,
            hr,
            (a_t, s_t, a_s, s_s),
            self.param,
            lambda xp: Query(xp, tt, rows=rows, step=it),
        )
        return _in_x(x, y_pred, y_corr, tt, m)

    def commit(self, rows, ok, lam_new):
        idx = ok.nonzero().squeeze(1)
        if len(idx) == 0:
            return
        r = rows[idx]
        if len(r) == len(self.count):  # every row accepted: shift the whole history at once
            self.hist = torch.cat([self.new[None], self.hist[:-1]])
        else:
            self.hist[1:, r] = self.hist[:-1, r].clone()
            self.hist[0, r] = self.new[idx]
        self.lam[r, 1:] = self.lam[r, :-1].clone()
        self.lam[r, 0] = lam_new[idx]
        self.count[r] += 1


_RTOL = Option(0.05, "the relative tolerance of the error norm", low=0.0, low_open=True)
_ATOL = Option(0.0078, "the absolute tolerance of the error norm (for data in [-1, 1])", low=0.0, low_open=True)
_H_INIT = Option(0.05, "the first step size, in log-SNR", low=0.0, low_open=True)


@register(
    "mrs-adaptive",
    family="adaptive",
    order=4,
    calls_per_step=1,
    deterministic=True,
    fixed_grid=False,
    description="adaptive MRS / DPM-Solver++ in log-SNR: multistep predictor-corrector (or singlestep) pairs, per-sample steps",
    reference="Lu et al. 2023 (DPM-Solver++); Zhao et al. 2023 (UniPC); Li et al. 2025 (MR Sampler); "
    "k-diffusion dpm_adaptive",
)
class MRSAdaptive(_LogSNRAdaptive):
    """Adaptive probability-flow ODE solver in log-SNR.

    ``method="multistep"`` (default): the predictor-corrector pairs of :mod:`.pc`, one
    model call per try (NFE = 1 + accepted + rejected); ``order`` is the corrector's (2, 3 or 4,
    default 4: the third-order multistep predictor against the fourth-order corrector), and the
    corrected solution continues. Default controller: I-control, safety 0.7, exponent 1/order,
    factor limits [0.2, 2] (a multistep method wants no large jumps in step ratio).
    ``method="singlestep"``: the embedded singlestep pairs of the module docstring, ``order`` 3 (the
    2/3 pair, 3 calls per try, default) or 2 (1/2, 2 calls); a retry reuses its first call (NFE =
    calls x accepted + (calls - 1) x rejected). Default controller: I-control, safety 0.9, exponent
    1/order, limits [0.2, 5], as dpm_adaptive's.

    Other options: ``rtol`` (0.05) and ``atol`` (0.0078, for data in [-1, 1]), ``h_init`` (0.05,
    in log-SNR), ``mode`` (``"per_sample"`` or ``"batch"``), ``controller`` (a
    :class:`StepSizeController` in place of the default; explicit ``rtol`` / ``atol`` replace its
    tolerances, which otherwise replace the defaults: :class:`~diffsolve.core.adaptive.AdaptiveSolver`),
    ``parameterization`` (``"data"``, the
    default, ``"noise"``, or for the multistep method ``"velocity"``). :func:`pilot_grid` gives a grid for ``mrs-pc`` (multistep) or
    ``dpmpp-3s`` (singlestep) to replay.
    """

    rtol = _RTOL
    atol = _ATOL
    h_init = _H_INIT
    order: Option[Any] = Option(
        None, "the corrector's order (multistep: 2, 3 or 4, default 4; singlestep: 2 or 3, default 3)", kind=object
    )
    parameterization = Option(
        "data", "the model output integrated: 'data', 'noise', or for the multistep method 'velocity'", kind=str
    )
    method = Option(
        "multistep",
        "'multistep' (predictor-corrector pairs, one call per try) or 'singlestep' (embedded singlestep pairs)",
        choices=("multistep", "singlestep"),
    )

    ORDERS: ClassVar[dict[str, tuple[int, ...]]] = {"multistep": (2, 3, 4), "singlestep": (2, 3)}

    def check_options(self) -> None:
        orders = self.ORDERS[self.method]
        self.order = orders[-1] if self.order is None else self.order
        if self.order not in orders:
            raise ValueError(f"order must be one of {orders} for method={self.method!r}, got {self.order!r}")
        check_parameterization(
            self.parameterization, velocity=self.method == "multistep", where=f" for method={self.method!r}"
        )
        super().check_options()

    def default_controller(self) -> StepSizeController:
        if self.method == "multistep":
            return StepSizeController(safety=0.7, exponent=1.0 / self.order, factor_min=0.2, factor_max=2.0)
        return StepSizeController(safety=0.9, exponent=1.0 / self.order, factor_min=0.2, factor_max=5.0)

    def _tries(self, noise, lam_lo, lam_hi, b, dev, schedule, mu):
        if self.method == "multistep":
            return _MultistepTries(self.order, self.parameterization, schedule, mu)
        return _SinglestepTries(self._pair, None, b, dev, schedule, mu)

    def _pair(self, x, ls, hr, m, schedule, rows, it, path, cached):
        return (yield from singlestep_pair(x, ls, hr, m, schedule, self.order, rows, it, self.parameterization, cached))


@register(
    "mrs-sde-adaptive",
    family="adaptive",
    order=1,
    calls_per_step=2,
    deterministic=False,
    fixed_grid=False,
    description="adaptive SDE-DPM-Solver++ / MRS SDE in log-SNR: 1/2S pair on one Brownian path, per-sample steps",
    reference="Lu et al. 2023 (SDE-DPM-Solver++); Li et al. 2025 (MR Sampler); Jolicoeur-Martineau et al. 2021",
)
class MRSSDEAdaptive(_LogSNRAdaptive):
    """Adaptive reverse-SDE solver; the SDE pair is in the module docstring.

    The MRS SDE solvers have orders 1 and 2, so this is the 1/2 pair only (2 calls per try; its
    difference is O(h^1.5) in the strong sense). Options: ``rtol`` (0.05), ``atol`` (0.0078),
    ``h_init`` (0.05, in log-SNR), ``mode``, ``controller`` (default: I-control, safety 0.9,
    exponent 0.9 as in Gotta Go Fast, factor limits [0.2, 5]; its tolerances as mrs-adaptive's), ``denoise`` (True: a Tweedie step
    x0_hat(x, t_min) at the end, one more call). Noise defaults to ``"brownian"``.
    """

    default_noise = "brownian"

    rtol = _RTOL
    atol = _ATOL
    h_init = _H_INIT
    denoise = Option(True, "the final Tweedie step x0_hat(x, t_min) (one more model call)")
    order = 2  # the 1/2 pair (not an option)

    def default_controller(self) -> StepSizeController:
        return StepSizeController(safety=0.9, exponent=0.9, factor_min=0.2, factor_max=5.0)

    def _path(self, noise, lam_lo, lam_hi):
        """The noise of the run: the Brownian path on the clock e^{2 lambda}, or ``noise`` itself
        (fresh normals per try)."""
        if noise.kind == "gaussian":
            return noise
        return noise.time_changed(lam_lo, lam_hi, lambda lm: torch.exp(2.0 * (lm - lam_hi)))

    def _tries(self, noise, lam_lo, lam_hi, b, dev, schedule, mu):
        return _SinglestepTries(self._pair, self._path(noise, lam_lo, lam_hi), b, dev, schedule, mu)

    @staticmethod
    def _noises(path, ls, hr, r, rows, like):
        """N(s -> s + r h) and N(s -> s + h) scaled to unit sigma: e^{-lambda} (B(v) - B(v_s)) in the
        path's clock v = e^{2 (lambda - lambda_hi)}, i.e. with the factor e^{lambda_hi - lambda}."""
        if isinstance(path, NoiseSource):  # fresh normals per try, same joint law
            z1, z2 = path.randn(rows).to(like), path.randn(rows).to(like)
            a = per_row(fresh_variance(r * hr).sqrt(), like) * z1
            return a, per_row(torch.exp(-(1 - r) * hr), like) * a + per_row(
                fresh_variance((1 - r) * hr).sqrt(), like
            ) * z2
        lr, lt = (ls + r * hr).clamp_max(path.t1), (ls + hr).clamp_max(path.t1)
        b_s, b_r, b_t = path(ls, rows), path(lr, rows), path(lt, rows)
        return (
            per_row(torch.exp(path.t1 - lr), like) * (b_r - b_s).to(like),
            per_row(torch.exp(path.t1 - lt), like) * (b_t - b_s).to(like),
        )

    def _pair(self, x, ls, hr, m, schedule, rows, it, path, cached):
        coefs = partial(at_log_snr, schedule)
        r = 0.5
        ts, a_s, s_s = coefs(ls)
        xr, raw = yield from first_call(x, ts, rows, it, partial(raw_output, param="data"), cached)
        q_s = shift_output(raw, m, "data")
        y = xr if m is None else xr - m
        n_r, n_t = self._noises(path, ls, hr, r, rows, y)
        tt, a_t, s_t = coefs(ls + hr)
        tr, a_r, s_r = coefs(ls + r * hr)
        w = sde_weights("data", a_t, s_t, a_s, s_s, hr)
        v = sde_weights("data", a_r, s_r, a_s, s_s, r * hr, order=1)
        y1 = per_row(w.decay, y) * y + per_row(w.w0, y) * q_s + per_row(s_t, y) * n_t
        u = per_row(v.decay, y) * y + per_row(v.w0, y) * q_s + per_row(s_r, y) * n_r
        q_r = model_output((yield Query(u if m is None else u + m, tr, rows=rows, step=it)), m, "data")
        y2 = y1 + per_row(w.w1 / r, y) * (q_r - q_s)
        return xr, raw, y1, y2, tt

    def _end(self, x, t_min, it):
        if not self.denoise:
            return x
        pred = yield Query(x, t_min, step=it + 1)
        return pred.state_at(pred.coefs.alpha, 0.0)


def pilot_grid(
    model, shape, *, seed: int = 0, mu=None, cond=None, grid=None, t_max=None, t_min=None, **options
) -> Tensor:
    """Run mrs-adaptive once in batch mode on a small batch of ``shape`` and return the times it
    accepted: a grid for any fixed-grid solver and for the diffusers scheduler
    (``set_timesteps(timesteps=...)``). The same steps are ``mrs-pc`` with the same ``order`` and
    ``parameterization`` (the default multistep method) or ``dpmpp-3s`` (``method="singlestep"``)."""
    from ...core.driver import sample

    res = sample(
        model,
        "mrs-adaptive",
        shape=shape,
        seed=seed,
        mu=mu,
        cond=cond,
        grid=grid,
        t_max=t_max,
        t_min=t_min,
        **{**options, "mode": "batch"},
    )
    return res.stats["grid"]
