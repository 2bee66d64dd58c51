"""k-diffusion's stochastic DPM-Solver++ family: ``dpmpp-2s-ancestral`` (sample_dpmpp_2s_ancestral),
``dpmpp-sde`` (sample_dpmpp_sde; diffusers' DPMSolverSDEScheduler) and ``dpmpp-3m-sde``
(sample_dpmpp_3m_sde).

The first two are ancestral samplers and step, as :mod:`.ancestral` does, in y = (x - mu)/alpha
against s = sigma/alpha = e^{-lambda}, where y = (x0 - mu) + s eps is variance exploding (k-diffusion's
variables for diffusion schedules; on flow models the scaled form, see ``euler-ancestral``). Their
building block is DPM-Solver++'s first-order step (Lu et al. 2022b, DDIM in these variables) from s to
a level s_to with the data prediction D = x0_hat - mu:

    P(y, D; s -> s_to) = (s_to / s) y + (1 - s_to / s) D            (= D at s_to = 0)

(:func:`~diffsolve.solvers.exponential.maths.ode_weights` with alpha = 1). ``dpmpp-3m-sde`` is a
multistep method in x - mu against lambda = log(alpha / sigma) (the form ComfyUI's version takes,
which also covers flow models), with the weights of
:func:`~diffsolve.solvers.exponential.maths.eta_sde_weights`.

Noise: ``dpmpp-sde`` and ``dpmpp-3m-sde`` default to Brownian-tree noise, as k-diffusion does
(its BrownianTreeNoiseSampler), on the same clock: the normal of a step from level s to s_to is
z = (W(s_to) - W(s)) / sqrt(s - s_to) for a Brownian motion W in s = sigma/alpha (one path per sample,
keyed by its seed: :meth:`~diffsolve.core.noise.NoiseSource.time_changed`, here in u = log s with the
clock v(u) = e^u), so a sample stays close to itself at other step counts. With ``noise="gaussian"``
the draws are fresh normals with the same joint law.
"""

from __future__ import annotations

import math

import torch

from ...core.options import Option
from ...core.protocol import Query, Solver
from ...core.registry import register
from ..exponential.maths import (
    alpha_sigma,
    eta_sde_weights,
    grid_nodes,
    model_output,
    ode_weights,
    posterior_std,
)
from ..exponential.multistep import _Multistep
from ..ode.dpm2 import ScaledVariables
from .ancestral import ETA, S_NOISE, ancestral_split


def dpmpp_first_order(y, d, s: float, s_to: float):
    """DPM-Solver++(1) in y against s: (s_to / s) y + (1 - s_to / s) D (= D at s_to = 0)."""
    h = math.log(s / s_to) if s_to > 0 else math.inf
    w = ode_weights("data", 1.0, s_to, 1.0, s, h)
    return w.decay * y + w.w0 * d


class LevelNoise:
    """The normals of steps between noise levels s = sigma/alpha: Brownian increments of one path in s
    per sample (k-diffusion's BrownianTreeNoiseSampler) for ``noise.kind == "brownian"``, else fresh
    draws from ``noise.step`` with the same joint law (:meth:`pair`)."""

    def __init__(self, noise, grid, schedule):
        self.noise = noise
        levels = [sg / a for a, sg in (alpha_sigma(schedule, float(t)) for t in grid) if a > 0]
        positive = [s for s in levels if s > 0]
        self.path = None
        if getattr(noise, "kind", "gaussian") == "brownian" and positive and max(positive) > min(positive):
            lo, hi = math.log(min(positive)), math.log(max(positive))
            self.path = noise.time_changed(lo, hi, torch.exp)

    def _increment(self, like, s: float, s_to: float):
        path = self.path
        assert path is not None
        u, u_to = min(max(math.log(s), path.t0), path.t1), min(max(math.log(s_to), path.t0), path.t1)
        return ((path(u_to) - path(u)) / math.sqrt(s - s_to)).to(like)

    def one(self, like, t: float, t_to: float, s: float, s_to: float):
        """The normal of the step from level s at t to s_to < s at t_to."""
        if self.path is None or not math.isfinite(s):  # no path above alpha = 0: a fresh normal
            return self.noise.step(t, t_to).to(like)
        return self._increment(like, s, s_to)

    def pair(self, like, t: float, t_mid: float, t_to: float, s: float, s_mid: float, s_to: float):
        """The normals of the steps s -> s_mid and s -> s_to (s > s_mid > s_to > 0) on one path:
        correlated with coefficient c = sqrt((s - s_mid) / (s - s_to))."""
        if self.path is None:
            z1 = self.noise.step(t, t_mid).to(like)
            c = math.sqrt((s - s_mid) / (s - s_to))
            return z1, c * z1 + math.sqrt(max(1.0 - c * c, 0.0)) * self.noise.step(t, t_to).to(like)
        return self._increment(like, s, s_mid), self._increment(like, s, s_to)


@register(
    "dpmpp-2s-ancestral",
    family="sde",
    order=2,
    calls_per_step=2,
    deterministic=False,
    description="DPM-Solver++(2S) ancestral (k-diffusion sample_dpmpp_2s_ancestral); order 2 at eta=0",
    reference="Lu et al. 2022b, DPM-Solver++ (arXiv 2211.01095); Ho et al. 2020 (ancestral sampling)",
)
class DPMPP2SAncestral(Solver):
    """DPM-Solver++(2S) ancestral (k-diffusion's ``sample_dpmpp_2s_ancestral``): the singlestep
    second-order DPM-Solver++(2S) (Lu et al. 2022b) with its midpoint in log s, taken to the lower
    level sigma_down, then fresh noise back up to s' (ancestral sampling, Ho et al. 2020). In
    y = (x - mu)/alpha against s = sigma/alpha, with D = x0_hat - mu and P the first-order step of the
    module docstring, for each step:

        sigma_up, sigma_down as ``euler-ancestral`` (eta);   s_mid = sqrt(s sigma_down)
        y_mid   = P(y_i, D(x_i, t_i); s -> s_mid)
        y_{i+1} = P(y_i, D(x_mid, t_mid); s -> sigma_down) + s_noise sigma_up z

    When sigma_down = 0 (the step to s' = 0) the step is Euler, y_{i+1} = D (one call). Two model
    calls per step. At eta = 0 this is the deterministic DPM-Solver++(2S), order 2 (the registered
    order); with noise the ancestral split is weakly first order.

    Flow models: the step is taken in the scaled variables, as ``euler-ancestral`` does (at eta = 1
    the added noise is the DDPM posterior's). ComfyUI's ``sample_dpmpp_2s_ancestral_RF`` instead
    splits rectified flow's own sigma = t (sigma_down = t'(1 + (t'/t - 1) eta), x rescaled by
    (1 - t')/(1 - sigma_down)): the same at eta = 0, a different amount of fresh noise for a given eta.
    Noise: fresh draws per step (k-diffusion's default noise sampler).

    Under :class:`~diffsolve.guidance.CFGPlusPlus` (``dpmpp-2s-ancestral-cfg-pp``, ComfyUI's
    ``sample_dpmpp_2s_ancestral_cfg_pp``) both P steps take the unconditional prediction U (at x_i,
    then at x_mid) and the step's guidance D_guided - U at x_i is added once:
    y_{i+1} = P(y_i, U(x_mid); s -> sigma_down) + (D_guided - U)(x_i) + s_noise sigma_up z.
    """

    eta = ETA
    s_noise = S_NOISE
    steps_with_pair = True

    def run(self, x, grid, noise, *, schedule, mu=None):
        maps = ScaledVariables(schedule, mu)
        x, grid = yield from maps.enter(x, grid)
        for i, t, t_next, s, s_next in maps.steps(grid):
            pred = yield Query(x, t, step=maps.first + i + 1)
            down, up = ancestral_split(s, s_next, self.eta)
            d = model_output(pred, mu, "data")
            plain = pred.eps_prediction() is pred  # else CFG++: d guided, u unconditional
            u = d if plain else model_output(pred.eps_prediction(), mu, "data")
            y = maps.y(pred.x, t)
            if down <= 0:
                y = d
            else:
                s_mid = math.sqrt(s * down)
                t_mid = maps.t(s_mid)
                y_mid = dpmpp_first_order(y, u, s, s_mid)
                pred_mid = yield Query(maps.x(y_mid, t_mid), t_mid, step=maps.first + i + 1)
                y = dpmpp_first_order(y, model_output(pred_mid.eps_prediction(), mu, "data"), s, down)
                if not plain:
                    y = y + (d - u)  # CFG++: the guidance of the step's start, added once
            if up > 0 and self.s_noise > 0:
                y = y + (self.s_noise * up) * noise.step(t, t_next)
            x = maps.x(y, t_next)
        return x


@register(
    "dpmpp-sde",
    family="sde",
    order=2,
    calls_per_step=2,
    deterministic=False,
    description="stochastic DPM-Solver++ (k-diffusion sample_dpmpp_sde, diffusers DPMSolverSDE); Brownian noise",
    reference="Lu et al. 2022b, DPM-Solver++ (arXiv 2211.01095); Crowson, k-diffusion (stochastic form)",
)
class DPMPPSDE(Solver):
    """Stochastic DPM-Solver++ (k-diffusion's ``sample_dpmpp_sde``; diffusers'
    DPMSolverSDEScheduler, which has r = 1/2 and eta = 1): a singlestep DPM-Solver++ (Lu et al.
    2022b) whose stage and full step are both ancestral steps. In y = (x - mu)/alpha against
    s = sigma/alpha = e^{-lambda}, with D = x0_hat - mu, h = log(s / s') and P the first-order step of
    the module docstring, for each step:

        s_r = s^{1-r} s'^r  (lambda + r h);     fac = 1 / (2 r)
        (sd_1, su_1) = split(s -> s_r, eta);      y_r = P(y_i, D_i; s -> sd_1) + s_noise su_1 z_1
        (sd, su) = split(s -> s', eta);          D_d = (1 - fac) D_i + fac D(x_r, t_r)
        y_{i+1} = P(y_i, D_d; s -> sd) + s_noise su z_2

    with split the ancestral split of ``euler-ancestral`` and z_1, z_2 the normals of the steps s -> s_r
    and s -> s' on one Brownian path in s (module docstring): correlated, as in k-diffusion. The step
    to s' = 0 is Euler, y_{i+1} = D_i (one call). Two model calls per step. At eta = 0 this is
    DPM-Solver++(2S) with its stage at r (order 2, the registered order); with noise the ancestral
    split is weakly first order.

    Options: ``eta`` (1), ``s_noise`` (1), ``r`` (1/2). Noise defaults to ``"brownian"``. Flow models:
    the step is taken in the scaled variables, as ``euler-ancestral`` does; ComfyUI's version splits
    in lambda with alpha factors, a different amount of fresh noise for a given eta.
    """

    default_noise = "brownian"

    eta = ETA
    s_noise = S_NOISE
    r = Option(0.5, "the stage's position in log sigma, 0 < r <= 1 (k-diffusion's r; diffusers: 1/2)", low=0.0)

    def check_options(self) -> None:
        if not 0.0 < self.r <= 1.0:
            raise ValueError(f"r must be in (0, 1] for {self.name}, got {self.r!r}")

    def run(self, x, grid, noise, *, schedule, mu=None):
        maps = ScaledVariables(schedule, mu)
        x, grid = yield from maps.enter(x, grid)
        levels = LevelNoise(noise, grid, schedule)
        fac = 1.0 / (2.0 * self.r)
        for i, t, t_next, s, s_next in maps.steps(grid):
            pred = yield Query(x, t, step=maps.first + i + 1)
            d = model_output(pred, mu, "data")
            y = maps.y(pred.x, t)
            if s_next <= 0:
                x = maps.x(d, t_next)
                continue
            s_r = math.exp((1.0 - self.r) * math.log(s) + self.r * math.log(s_next))
            t_r = maps.t(s_r)
            down_r, up_r = ancestral_split(s, s_r, self.eta)
            down, up = ancestral_split(s, s_next, self.eta)
            noisy = self.s_noise > 0 and (up_r > 0 or up > 0)
            z1, z2 = levels.pair(y, t, t_r, t_next, s, s_r, s_next) if noisy else (None, None)
            y_r = dpmpp_first_order(y, d, s, down_r)
            if z1 is not None and up_r > 0:
                y_r = y_r + (self.s_noise * up_r) * z1
            pred_r = yield Query(maps.x(y_r, t_r), t_r, step=maps.first + i + 1)
            d_r = model_output(pred_r, mu, "data")
            d_d = d_r if fac == 1.0 else (1.0 - fac) * d + fac * d_r
            y = dpmpp_first_order(y, d_d, s, down)
            if z2 is not None and up > 0:
                y = y + (self.s_noise * up) * z2
            x = maps.x(y, t_next)
        return x


@register(
    "dpmpp-3m-sde",
    family="sde",
    order=3,
    calls_per_step=1,
    deterministic=False,
    description="DPM-Solver++(3M) SDE (k-diffusion sample_dpmpp_3m_sde); order 3 at eta=0; Brownian noise",
    reference="Lu et al. 2022b, DPM-Solver++ (arXiv 2211.01095); Crowson, k-diffusion (3M SDE)",
)
class DPMPP3MSDE(Solver):
    """DPM-Solver++(3M) SDE (k-diffusion's ``sample_dpmpp_3m_sde``): the multistep DPM-Solver++
    (Lu et al. 2022b) on the reverse-time SDE family with noise fraction eta, corrected with the
    divided differences of the last three data predictions. In y = x - mu against
    lambda = log(alpha / sigma), with q = x0_hat - mu, h = lambda_{i+1} - lambda_i, H = (1 + eta) h and
    the weights of :func:`~diffsolve.solvers.exponential.maths.eta_sde_weights`:

        y_{i+1} = (sigma_{i+1}/sigma_i) e^{-eta h} y_i + alpha_{i+1} [(1 - e^{-H}) q_i + H phi_2(-H) D1
                  + 2 H phi_3(-H) D2] + s_noise sigma_{i+1} sqrt(1 - e^{-2 eta h}) z

    with D1, D2 the differences of :mod:`diffsolve.solvers.exponential.multistep` (r0 = h_{i-1}/h,
    r1 = h_{i-2}/h): order 1 at the first step, 2 (D2 = 0) at the second, 3 after. The step to
    sigma = 0 is y = alpha q_i (k-diffusion's x = denoised). One model call per step; at eta = 0 the
    deterministic DPM-Solver++(3M), order 3 (the registered order).

    The D2 weight: k-diffusion (and diffusers' sde-dpmsolver++ at solver_order=3) take H phi_3(-H) D2,
    half the Taylor-exact one (the same published coefficient as ``dpmpp-3m``'s ``published_d2``),
    which leaves a local error O(h^3) and a globally second-order method at eta = 0.
    ``published_d2=True`` takes it, for parity with k-diffusion. Options: ``eta`` (1), ``s_noise`` (1),
    ``published_d2`` (False). Noise defaults to ``"brownian"`` (k-diffusion's BrownianTreeNoiseSampler,
    module docstring).
    """

    default_noise = "brownian"

    eta = Option(1.0, "the noise fraction: 1 the reverse SDE, 0 the probability-flow ODE (DPM-Solver++(3M))", low=0.0)
    s_noise = S_NOISE
    published_d2 = Option(
        False,
        "the published D2 coefficient (k-diffusion, diffusers): half the Taylor-exact one, second order at eta=0",
    )

    def run(self, x, grid, noise, *, schedule, mu=None):
        n = len(grid) - 1
        ts, alpha, sigma, lam = grid_nodes(self.name, grid, schedule, "data")
        levels = LevelNoise(noise, grid, schedule) if self.eta > 0 and self.s_noise > 0 else None
        hist: list[torch.Tensor] = []
        for i in range(n):
            pred = yield Query(x, ts[i], step=i + 1)
            y = pred.x if mu is None else pred.x - mu
            hist = (hist + [model_output(pred, mu, "data")])[-3:]
            if sigma[i + 1] == 0.0:
                y = alpha[i + 1] * hist[-1]
            else:
                h = lam[i + 1] - lam[i]
                w = eta_sde_weights(alpha[i + 1], sigma[i + 1], sigma[i], h, self.eta)
                q, d1, d2 = _Multistep._differences(hist, i, min(3, i + 1), lam)
                y = w.decay * y + w.w0 * q
                if d1 is not None:
                    y = y + w.w1 * d1
                if d2 is not None:
                    y = y + (0.5 * w.w2 if self.published_d2 else w.w2) * d2
                if levels is not None:
                    std = posterior_std(sigma[i + 1], self.eta * h)
                    s_i = sigma[i] / alpha[i] if alpha[i] > 0 else math.inf  # inf: a fresh normal
                    s_to = sigma[i + 1] / alpha[i + 1]
                    y = y + (self.s_noise * std) * levels.one(y, ts[i], ts[i + 1], s_i, s_to)
            x = y if mu is None else y + mu
        return x
