"""Ancestral samplers of k-diffusion: Euler-ancestral and DPM-2-ancestral (diffusers'
EulerAncestralDiscrete and KDPM2AncestralDiscrete schedulers), and ComfyUI's RES multistep ancestral, in y = (x - mu)/alpha against
s = sigma/alpha as :mod:`diffsolve.solvers.ode.dpm2` (whose notation this module uses).
"""

from __future__ import annotations

import math

from ...core.options import Option
from ...core.protocol import Query, Solver
from ...core.registry import register
from ..exponential.maths import alpha_sigma, model_output
from ..ode.dpm2 import ScaledVariables, dpm2_step
from ..ode.res import res_step

ETA = Option(
    1.0,
    "the fraction of the ancestral noise: 1 draws from the DDPM posterior, 0 is the deterministic sampler",
    low=0.0,
)
S_NOISE = Option(1.0, "k-diffusion's s_noise, a scale on the drawn noise", low=0.0)
FORM = Option(
    "scaled",
    "scaled: step x/alpha against sigma/alpha (the DDPM posterior at eta = 1); rf: ComfyUI's "
    "rectified-flow form (x against sigma, only on schedules with alpha = 1 - sigma)",
    choices=("scaled", "rf"),
)


def ancestral_split(s: float, s_next: float, eta: float) -> tuple[float, float]:
    """(sigma_down, sigma_up) of k-diffusion's ``get_ancestral_step``:

        sigma_up   = min(s', eta sqrt(s'^2 (s^2 - s'^2) / s^2)),    sigma_down = sqrt(s'^2 - sigma_up^2).

    A deterministic step to sigma_down plus sigma_up z reaches noise level s'; eta = 1 is the DDPM
    posterior q(y' | y, x0) of the variance-exploding process y = x0 + s eps."""
    if eta == 0 or s_next <= 0 or s <= 0:
        return s_next, 0.0
    up = min(s_next, eta * math.sqrt(max(s_next**2 * (s**2 - s_next**2) / s**2, 0.0)))
    return math.sqrt(max(s_next**2 - up**2, 0.0)), up


def rf_split(sigma: float, sigma_next: float, eta: float) -> tuple[float, float, float]:
    """(sigma_down, scale, renoise) of ComfyUI's rectified-flow ancestral step (``_RF`` samplers),
    on a schedule with alpha = 1 - sigma:

        sigma_down = sigma' (1 + (sigma'/sigma - 1) eta)
        scale      = (1 - sigma') / (1 - sigma_down)
        renoise    = sqrt(sigma'^2 - sigma_down^2 scale^2)

    A deterministic step to sigma_down, x scaled by ``scale`` and renoise z added reaches the
    marginal at sigma' (scale (1 - sigma_down) = 1 - sigma' and the noise variances add to
    sigma'^2). At eta = 0 or sigma' = 0 it is (sigma', 1, 0)."""
    if sigma_next <= 0:
        return 0.0, 1.0, 0.0
    if eta == 0:
        return sigma_next, 1.0, 0.0
    down = sigma_next * (1.0 + (sigma_next / sigma - 1.0) * eta)
    scale = (1.0 - sigma_next) / (1.0 - down)
    return down, scale, math.sqrt(max(sigma_next**2 - down**2 * scale**2, 0.0))


class FlowVariables:
    """x - mu against the schedule's own sigma, on a schedule with alpha = 1 - sigma (rectified
    flow, ComfyUI's CONST model sampling): the variables of the ``form="rf"`` steps."""

    def __init__(self, schedule, mu, solver: str):
        self.schedule, self.mu, self.solver = schedule, mu, solver

    def sigma(self, t: float) -> float:
        a, sig = alpha_sigma(self.schedule, t)
        if abs(a + sig - 1.0) > 1e-9:
            raise ValueError(
                f"{self.solver} with form='rf' is ComfyUI's rectified-flow form: it needs a schedule with "
                f"alpha = 1 - sigma, got alpha = {a:.6g}, sigma = {sig:.6g} at t = {t:.6g} (use form='scaled')"
            )
        return sig

    def steps(self, grid):
        """(i, t_i, t_{i+1}, sigma_i, sigma_{i+1}) for each step of ``grid``."""
        for i in range(len(grid) - 1):
            t, t_next = float(grid[i]), float(grid[i + 1])
            yield i, t, t_next, self.sigma(t), self.sigma(t_next)

    def t(self, sigma: float) -> float:
        """The schedule time at noise level 0 < sigma < 1."""
        return float(self.schedule.t_of_log_snr(math.log1p(-sigma) - math.log(sigma)))

    def centred(self, x):
        return x if self.mu is None else x - self.mu

    def renoise(self, x, t: float, t_next: float, scale: float, renoise: float, s_noise: float, noise):
        """ComfyUI's scale and renoise after the step to sigma_down."""
        if scale != 1.0:
            x = x if self.mu is None else x - self.mu
            x = scale * x
            x = x if self.mu is None else x + self.mu
        if renoise > 0 and s_noise > 0:
            x = x + (s_noise * renoise) * noise.step(t, t_next)
        return x


@register(
    "euler-ancestral",
    family="sde",
    order=1,
    calls_per_step=1,
    deterministic=False,
    description="Euler ancestral (k-diffusion sample_euler_ancestral, diffusers EulerAncestralDiscrete)",
    reference="Karras et al. 2022 (EDM variables); Ho et al. 2020, Denoising Diffusion Probabilistic Models",
)
class EulerAncestral(Solver):
    """Euler ancestral (k-diffusion's ``sample_euler_ancestral``; diffusers'
    EulerAncestralDiscreteScheduler): an Euler step of the probability-flow ODE in Karras et al.'s
    (2022) variables to a lower noise level sigma_down, then fresh noise back up to s' (ancestral
    sampling, Ho et al. 2020). In y = (x - mu)/alpha against s = sigma/alpha, for each step:

        sigma_up   = min(s', eta sqrt(s'^2 (s^2 - s'^2) / s^2))
        sigma_down = sqrt(s'^2 - sigma_up^2)
        y_{i+1}    = y_i + (sigma_down - s) eps(x_i, t_i) + s_noise sigma_up z,    x_{i+1} = mu + alpha_{i+1} y_{i+1}

    With eta = s_noise = 1 this is the DDPM posterior step (ddim with eta = 1, ``ddpm``); eta = 0 is
    DDIM. One model call per step; weak order 1.

    Flow models (alpha != 1): the step is the same in the scaled variables y = x/alpha against
    s = sigma/alpha, so the added noise is the posterior's. ComfyUI's ``sample_euler_ancestral_RF``
    steps rectified flow's x against its own sigma = t instead (alpha = 1 - t): Euler in t to
    t_down = t'(1 + (t'/t - 1) eta), x scaled by (1 - t')/(1 - t_down), then
    sqrt(t'^2 - t_down^2 (1 - t')^2/(1 - t_down)^2) z added. Both reach the marginal noise level at
    t' and both are DDIM at eta = 0 (rectified-flow Euler in t is the DDIM step), but
    the amount of fresh noise a given eta names differs: ours at eta = 1 is the DDPM posterior.
    ``form="scaled"`` (the default) is our form; ``form="rf"`` is ComfyUI's (and diffusers'
    LTXEulerAncestralRFScheduler, which mimics it), on schedules with alpha = 1 - sigma (refused on
    others): with sigma the schedule's sigma, x0 the model's data prediction and
    ``rf_split`` giving sigma_down, scale and renoise,

        x_down  = (sigma_down/sigma) x_i + (1 - sigma_down/sigma) x0 = x0 + sigma_down v,  v = (x_i - x0)/sigma
        x_{i+1} = scale x_down + s_noise renoise z            (x_{i+1} = x0 where sigma' = 0)

    (x - mu in place of x, x0 - mu for x0, with a mean-reverting mu). It starts from sigma = 1
    (t = 1) with this step, which is finite there; as in ComfyUI the scale is applied for eta > 0
    whatever s_noise is (diffusers skips it when s_noise = 0). In the pair terms the rf step is
    x_down = (1 - sigma_down) x0 + sigma_down eps (so with CFG++ it takes the guided x0 and the
    unconditional eps, our combination: ComfyUI's CFG++ samplers take the scaled form).

    The step takes x0 and eps as separate terms (``steps_with_pair``): y_i is that of the state
    the pair composes (``Prediction.pair_x``), so y_{i+1} = (x0 - mu) + sigma_down eps +
    s_noise sigma_up z. Under :class:`~diffsolve.guidance.CFGPlusPlus` (the name
    ``euler-ancestral-cfg-pp``) that is ComfyUI's ``sample_euler_ancestral_cfg_pp`` (which takes
    this scaled form for flow models too): guided x0, renoised with the unconditional eps (CFG++,
    Chung et al. 2024, arXiv 2406.08070).
    """

    eta = ETA
    s_noise = S_NOISE
    form = FORM
    steps_with_pair = True

    def run(self, x, grid, noise, *, schedule, mu=None):
        if self.form == "rf":
            return (yield from self.run_rf(x, grid, noise, schedule, mu))
        maps = ScaledVariables(schedule, mu)
        x, grid = yield from maps.enter(x, grid)
        for i, t, t_next, s, s_next in maps.steps(grid):
            pred = yield Query(x, t, step=maps.first + i + 1)
            down, up = ancestral_split(s, s_next, self.eta)
            y = maps.y(pred.pair_x, t) + (down - s) * pred.eps
            if up > 0 and self.s_noise > 0:
                y = y + (self.s_noise * up) * noise.step(t, t_next)
            x = maps.x(y, t_next)
        return x

    def run_rf(self, x, grid, noise, schedule, mu):
        maps = FlowVariables(schedule, mu, "euler-ancestral")
        for i, t, t_next, sig, sig_next in maps.steps(grid):
            pred = yield Query(x, t, step=i + 1)
            down, scale, renoise = rf_split(sig, sig_next, self.eta)
            x = (1.0 - down) * pred.x0 + down * (pred.eps if mu is None else pred.eps + mu)
            x = maps.renoise(x, t, t_next, scale, renoise, self.s_noise, noise)
        return x


@register(
    "dpm-2-ancestral",
    family="sde",
    order=1,
    calls_per_step=2,
    deterministic=False,
    description="DPM-2 ancestral (k-diffusion sample_dpm_2_ancestral, diffusers KDPM2AncestralDiscrete)",
    reference="Lu et al. 2022, DPM-Solver; Karras et al. 2022; Ho et al. 2020 (ancestral sampling)",
)
class DPM2Ancestral(Solver):
    """DPM-2 ancestral (k-diffusion's ``sample_dpm_2_ancestral``; diffusers'
    KDPM2AncestralDiscreteScheduler): a DPM-2 step (Lu et al. 2022, as Karras et al. 2022 step it)
    to the lower level sigma_down, then fresh noise back up to s' (ancestral sampling, Ho et al.
    2020). In y = (x - mu)/alpha against s = sigma/alpha, for each step:

        sigma_up, sigma_down as ``euler-ancestral``
        s_mid   = exp((log s + log sigma_down) / 2)
        y_mid   = y_i + (s_mid - s) eps(x_i, t_i)
        y_{i+1} = y_i + (sigma_down - s) eps(x_mid, t_mid) + s_noise sigma_up z

    When sigma_down = 0 (the step to s' = 0) the step is Euler (one call, no noise). Two model calls
    per step; weak order 1 (the noise split is first order).

    ``form="scaled"`` (the default) is the step above, also on flow models (in x/alpha against
    sigma/alpha, the DDPM posterior at eta = 1). ``form="rf"`` is ComfyUI's
    ``sample_dpm_2_ancestral_RF`` (what ComfyUI runs for flow models), on schedules with
    alpha = 1 - sigma (refused on others): x against the schedule's sigma, with sigma_down, scale and
    renoise of ``rf_split`` (see ``euler-ancestral``) and v(x, sigma) = (x - x0_hat)/sigma,

        sigma_mid = sqrt(sigma sigma_down)
        x_mid     = x_i + (sigma_mid - sigma) v(x_i, sigma)
        x_down    = x_i + (sigma_down - sigma) v(x_mid, sigma_mid)
        x_{i+1}   = scale x_down + s_noise renoise z

    (Euler to x0_hat, one call, where sigma_down = 0). It starts from sigma = 1 (t = 1) with this
    step, finite there.
    """

    eta = ETA
    s_noise = S_NOISE
    form = FORM

    def run(self, x, grid, noise, *, schedule, mu=None):
        if self.form == "rf":
            return (yield from self.run_rf(x, grid, noise, schedule, mu))
        maps = ScaledVariables(schedule, mu)
        x, grid = yield from maps.enter(x, grid)
        for i, t, t_next, s, s_next in maps.steps(grid):
            pred = yield Query(x, t, step=maps.first + i + 1)
            down, up = ancestral_split(s, s_next, self.eta)
            y = yield from dpm2_step(maps, pred.x, t, s, down, pred.eps, maps.first + i + 1)
            if up > 0 and self.s_noise > 0:
                y = y + (self.s_noise * up) * noise.step(t, t_next)
            x = maps.x(y, t_next)
        return x

    def run_rf(self, x, grid, noise, schedule, mu):
        maps = FlowVariables(schedule, mu, "dpm-2-ancestral")
        for i, t, t_next, sig, sig_next in maps.steps(grid):
            pred = yield Query(x, t, step=i + 1)
            down, scale, renoise = rf_split(sig, sig_next, self.eta)
            v = (x - pred.x0) / sig
            if down <= 0:
                x = x - sig * v
                continue
            sig_mid = math.sqrt(sig * down)
            t_mid = maps.t(sig_mid)
            x_mid = x + (sig_mid - sig) * v
            pred_mid = yield Query(x_mid, t_mid, step=i + 1)
            x = x + (down - sig) * ((x_mid - pred_mid.x0) / sig_mid)
            x = maps.renoise(x, t, t_next, scale, renoise, self.s_noise, noise)
        return x


@register(
    "res-multistep-ancestral",
    family="sde",
    order=1,
    calls_per_step=1,
    deterministic=False,
    description="RES multistep ancestral (ComfyUI sample_res_multistep_ancestral): RES to sigma_down, then noise",
    reference="Zhang, Song & Chen 2023, RES (arXiv 2308.02157); Ho et al. 2020 (ancestral sampling)",
)
class ResMultistepAncestral(Solver):
    """RES multistep ancestral (ComfyUI's ``sample_res_multistep_ancestral``): a ``res-multistep``
    step (Zhang, Song & Chen 2023, RES) to the lower level sigma_down, then fresh noise back up to s'
    (ancestral sampling, Ho et al. 2020). In y = (x - mu)/alpha against s = sigma/alpha, with
    t = -log s and D the model's x0_hat - mu, for each step:

        sigma_up, sigma_down as ``euler-ancestral``;    h = log(s / sigma_down)
        c2      = -h_prev / h,    b2 = phi_2(-h) / c2,    b1 = phi_1(-h) - b2
        y_{i+1} = (sigma_down / s) y_i + h (b1 D_i + b2 D_{i-1}) + s_noise sigma_up z

    where h_prev is the previous step's h, log(s_{i-1} / sigma_down_{i-1}), as ComfyUI takes it (not
    the distance log(s_{i-1} / s_i) to the node D_{i-1} was evaluated at; the two agree at eta = 0,
    which is ``res-multistep``). The first step and the step to sigma_down = 0 are Euler,
    y_i + (sigma_down - s) eps_i. One model call per step; weak order 1 (the noise split is first
    order).

    The step takes x0 and eps as separate terms (``steps_with_pair``) as ``res-multistep`` does
    (y_i from the state the pair composes, D from eps), so under
    :class:`~diffsolve.guidance.CFGPlusPlus` (the name ``res-multistep-ancestral-cfg-pp``) it is
    ComfyUI's ``sample_res_multistep_ancestral_cfg_pp``.
    """

    eta = ETA
    s_noise = S_NOISE
    steps_with_pair = True

    def run(self, x, grid, noise, *, schedule, mu=None):
        maps = ScaledVariables(schedule, mu)
        x, grid = yield from maps.enter(x, grid)
        d_prev, h_prev = None, None
        for i, t, t_next, s, s_next in maps.steps(grid):
            pred = yield Query(x, t, step=maps.first + i + 1)
            down, up = ancestral_split(s, s_next, self.eta)
            d = model_output(pred.eps_prediction(), mu, "data")
            y = res_step(maps.y(pred.pair_x, t), pred.eps, d, d_prev, s, down, h_prev)
            if up > 0 and self.s_noise > 0:
                y = y + (self.s_noise * up) * noise.step(t, t_next)
            x = maps.x(y, t_next)
            d_prev = d
            h_prev = math.log(s) - math.log(down) if down > 0 else None
        return x
