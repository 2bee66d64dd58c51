"""Euler and Heun on the probability-flow ODE, as k-diffusion and diffusers step them (in sigma / alpha),
or in the schedule's own time.

Notation: alpha_i, sigma_i at grid time t_i (t_0 = t_max > ... > t_N = t_min); v(x, t) is the
probability-flow drift dx/dt (``pred.velocity``); x0 and eps are the model's predictions
(``pred.x0``, ``pred.eps``); mu is the mean-reverting condition (0 otherwise).
"""

from __future__ import annotations

import math

from ...core.options import Option
from ...core.protocol import Query, Solver
from ...core.registry import register
from ...schedules.base import Schedule
from ..exponential.maths import alpha_sigma, model_output

SPACES = ("t", "sigma")
#: the ``space`` option of Euler and Heun
SPACE = Option(
    "sigma",
    "the variables stepped in: k-diffusion's y = (x - mu)/c against sigma/c ('sigma'), or "
    "the schedule's own time ('t')",
    choices=SPACES,
)


def _sigma_step(x, t: float, t_next: float, d, schedule: Schedule, mu):
    """Euler in k-diffusion's variables y = (x - mu)/c against s = sigma/c (c = the schedule's
    ``sampling_scale``: alpha, or 1 for rectified flow): y' = y + (s' - s) d, with d = dy/ds from
    :func:`_sigma_derivative`. For diffusion schedules this is the DDIM step."""
    c, c1 = schedule.sampling_scale(t), schedule.sampling_scale(t_next)
    if c <= 0 or c1 <= 0:
        raise ValueError("space='sigma' needs alpha > 0 on the grid; use space='t', or t_max below the schedule's end")
    s, s1 = alpha_sigma(schedule, t)[1] / c, alpha_sigma(schedule, t_next)[1] / c1
    y = x if mu is None else x - mu
    x1 = (c1 / c) * y + (c1 * (s1 - s)) * d
    return x1 if mu is None else x1 + mu


def _sigma_derivative(pred, t: float, schedule: Schedule):
    """dy/ds of k-diffusion's variables at a prediction: with x - mu = alpha (x0 - mu) + sigma eps,
    d = eps + ((alpha/c - 1)/s) (x0 - mu); eps for diffusion schedules (c = alpha), eps - x0 (the
    flow velocity) for rectified flow (c = 1, s = t)."""
    c = schedule.sampling_scale(t)
    a, sig = alpha_sigma(schedule, t)
    if a == c:
        return pred.eps
    # at sigma = 0 (an inversion's start) the limit, for a constant scale (rectified flow): alpha'/sigma'
    k = (a / c - 1.0) / (sig / c) if sig > 0 else float(schedule.alpha_dot(t)) / float(schedule.sigma_dot(t))
    return pred.eps + k * model_output(pred, pred.mu, "data")


S_CHURN = Option(0.0, "EDM's churn S_churn (0: the deterministic sampler)", low=0.0)
S_TMIN = Option(0.0, "the lowest noise level sigma/alpha that is churned", low=0.0)
S_TMAX = Option(float("inf"), "the highest noise level sigma/alpha that is churned")
S_NOISE = Option(1.0, "EDM's S_noise, the scale of the churn noise", low=0.0)


def _check_churn(self) -> None:
    if not self.s_tmax >= self.s_tmin:
        raise ValueError(f"s_tmax must be >= s_tmin, got s_tmin={self.s_tmin}, s_tmax={self.s_tmax}")


def _churn_noise(self) -> dict:
    return {"s_churn": self.s_churn} if self.s_churn > 0 else {}


def _churn(solver, x, t: float, gamma_max: float, schedule: Schedule, mu, noise):
    """EDM's churn (Karras et al. 2022, Algorithm 2, lines 4-6) at (x, t), with the solver's s_tmin,
    s_tmax and s_noise: where s_tmin <= s <= s_tmax (s = sigma/alpha, finite), the noise level is
    raised to s_hat = (1 + gamma_max) s in y = (x - mu)/alpha,

        y_hat = y + sqrt(s_hat^2 - s^2) s_noise z,    x_hat = mu + alpha(t_hat) y_hat.

    Returns (x_hat, t_hat); (x, t) unchanged elsewhere or with gamma_max = 0."""
    a_t, s_t = alpha_sigma(schedule, t)
    s = s_t / a_t if a_t > 0 else math.inf  # EDM sigma
    if not (gamma_max > 0 and math.isfinite(s) and solver.s_tmin <= s <= solver.s_tmax):  # no churn at alpha = 0
        return x, t
    t_hat = float(schedule.t_of_log_snr(-math.log(s) - math.log1p(gamma_max)))
    s_hat = s * (1.0 + gamma_max)
    a, a_hat = float(schedule.alpha(t)), float(schedule.alpha(t_hat))
    y = x if mu is None else x - mu
    y = (a_hat / a) * y + (a_hat * math.sqrt(s_hat**2 - s**2) * solver.s_noise) * noise.randn()
    return (y if mu is None else y + mu), t_hat


@register(
    "euler",
    family="ode",
    order=1,
    calls_per_step=1,
    deterministic=True,
    description="Euler (k-diffusion / diffusers: x/alpha against sigma/alpha; space='t': in t); EDM churn with s_churn > 0",
    reference="Song et al. 2021, Score-Based Generative Modeling through SDEs (probability flow); Karras et al. 2022 (EDM), Alg. 2",
    aliases=("edm-euler",),
)
class Euler(Solver):
    """Euler, as diffusers' EulerDiscreteScheduler, k-diffusion's sample_euler and EDM step
    (``space="sigma"``, the default): in k-diffusion's variables y = (x - mu)/c against
    s = sigma/c, with c = alpha (c = 1 for rectified flow, as diffusers' FlowMatchEulerDiscrete),

        y_{i+1} = y_i + (s_{i+1} - s_i) d_i,    d = dy/ds (eps for diffusion schedules).

    For diffusion schedules this is the DDIM step. ``space="t"`` is explicit Euler on the
    probability-flow ODE in the schedule's own time instead:

        x_{i+1} = x_i + (t_{i+1} - t_i) v(x_i, t_i),    v = a' (x0 - mu) + s' eps = dx/dt.

    The two agree for rectified flow. One model call per step; global order 1.

    With ``space="sigma"`` the step takes x0 and eps as separate terms (``steps_with_pair``): it
    steps from the state the pair composes, x~ = alpha x0 + (1 - alpha) mu + sigma eps (x itself for
    a plain model), which makes it, in y = (x - mu)/alpha against s = sigma/alpha,

        y_{i+1} = (x0 - mu) + s_{i+1} eps        (x_{i+1} = alpha' x0 + sigma' eps for diffusion and flow)

    so under :class:`~diffsolve.guidance.CFGPlusPlus` (guided x0, unconditional eps; the name
    ``euler-cfg-pp``) it is ComfyUI's ``sample_euler_cfg_pp``, the CFG++ DDIM step of Chung et al.
    (2024, arXiv 2406.08070).

    With ``s_churn`` > 0 each step is first churned as EDM's stochastic sampler (Karras et al. 2022,
    Algorithm 2, with Euler for its Heun step; k-diffusion's ``sample_euler``): see ``heun``. The noise
    level s = sigma/alpha is raised to s_hat = (1 + gamma_i) s with gamma_i = min(s_churn/N, sqrt(2) - 1)
    where s_tmin <= s <= s_tmax, by adding alpha(t_hat) sqrt(s_hat^2 - s^2) s_noise z, and the Euler
    step is taken from t_hat with the model evaluated there. (diffusers' EulerDiscrete and EDMEuler
    schedulers instead combine the model output evaluated before the churn, at s, with the churned
    state at s_hat; with s_churn = 0 the three agree.)
    """

    s_churn = S_CHURN
    s_tmin = S_TMIN
    s_tmax = S_TMAX
    s_noise = S_NOISE
    space = SPACE

    check_options = _check_churn
    noise_options = _churn_noise

    @property
    def steps_with_pair(self) -> bool:  # type: ignore[override]
        return self.space == "sigma"

    def run(self, x, grid, noise, *, schedule, mu=None):
        n = len(grid) - 1
        gamma_max = min(self.s_churn / n, math.sqrt(2.0) - 1.0) if n > 0 else 0.0
        for i in range(n):
            t, t_next = float(grid[i]), float(grid[i + 1])
            x, t = _churn(self, x, t, gamma_max, schedule, mu, noise)
            pred = yield Query(x, t, step=i + 1)
            if self.space == "t":
                x = pred.x + (t_next - t) * pred.velocity
            else:
                x = _sigma_step(pred.pair_x, t, t_next, _sigma_derivative(pred, t, schedule), schedule, mu)
        return x


@register(
    "heun",
    family="ode",
    order=2,
    calls_per_step=2,
    deterministic=True,
    description="EDM Heun (Algorithm 1; Algorithm 2 with s_churn > 0), in k-diffusion's variables",
    reference="Karras et al. 2022, Elucidating the Design Space of Diffusion-Based Generative Models",
)
class Heun(Solver):
    """Heun's second-order method of EDM (Karras et al. 2022, Algorithms 1 and 2).

    By default (``space="sigma"``) both stages step in k-diffusion's variables y = (x - mu)/c against
    s = sigma/c (c = alpha; 1 for rectified flow), as diffusers' HeunDiscreteScheduler,
    FlowMatchHeunDiscreteScheduler and k-diffusion's sample_heun. ``space="t"`` steps in the
    schedule's own time t, which the formulas below write. With the EDM noise level s(t) = sigma/alpha = exp(-lambda), for each step t_i -> t_{i+1}:

        gamma_i = min(s_churn / N, sqrt(2) - 1)  if s_tmin <= s(t_i) <= s_tmax  else 0
        t_hat:  s(t_hat) = (1 + gamma_i) s(t_i)          (noise level raised, t_hat >= t_i)
        x_hat = mu + (alpha(t_hat)/alpha(t_i)) (x_i - mu)
                   + alpha(t_hat) sqrt(s(t_hat)^2 - s(t_i)^2) s_noise z                (churn)
        d     = v(x_hat, t_hat)
        x_{i+1} = x_hat + (t_{i+1} - t_hat) d                                          (Euler)
        x_{i+1} = x_hat + (t_{i+1} - t_hat) (d + v(x_{i+1}, t_{i+1})) / 2  if sigma(t_{i+1}) > 0

    For the EDM schedule (alpha = 1, sigma = t) this is EDM's sampler exactly; s_churn = 0 gives the
    deterministic Algorithm 1. s_tmin and s_tmax are EDM noise levels (sigma/alpha). A step ending
    at sigma = 0 is an Euler step (as in EDM). Two model calls per step; order 2.

    For EDM and rectified flow the two spaces coincide.
    """

    s_churn = S_CHURN
    s_tmin = S_TMIN
    s_tmax = S_TMAX
    s_noise = S_NOISE
    space = SPACE

    check_options = _check_churn
    noise_options = _churn_noise

    def run(self, x, grid, noise, *, schedule, mu=None):
        n = len(grid) - 1
        gamma_max = min(self.s_churn / n, math.sqrt(2.0) - 1.0)
        for i in range(n):
            t, t_next = float(grid[i]), float(grid[i + 1])
            x, t_hat = _churn(self, x, t, gamma_max, schedule, mu, noise)
            pred = yield Query(x, t_hat, step=i + 1)
            x_hat = pred.x
            if self.space == "t":
                d = pred.velocity
                x = x_hat + (t_next - t_hat) * d
            else:
                d = _sigma_derivative(pred, t_hat, schedule)
                x = _sigma_step(x_hat, t_hat, t_next, d, schedule, mu)
            if alpha_sigma(schedule, t_next)[1] > 0:
                pred2 = yield Query(x, t_next, step=i + 1)
                if self.space == "t":
                    x = x_hat + (0.5 * (t_next - t_hat)) * (d + pred2.velocity)
                else:
                    x = _sigma_step(
                        x_hat, t_hat, t_next, 0.5 * (d + _sigma_derivative(pred2, t_next, schedule)), schedule, mu
                    )
        return x
