"""Standard reverse-time SDE steps.

Reverse SDE of the forward process dx = f(t) (mu - x) dt + g(t) dw (Anderson 1982; Song et al. 2021):

    dx = [ f(t) (mu - x) - g(t)^2 grad log p_t(x) ] dt + g(t) dw_bar,    t running from t_max to t_min.
"""

from __future__ import annotations

import math

import torch

from ...core.options import Option
from ...core.protocol import Query, Solver
from ...core.registry import register


@register(
    "euler-maruyama",
    family="sde",
    order=1,
    calls_per_step=1,
    deterministic=False,
    description="Euler-Maruyama on the reverse-time SDE (Score-SDE's predictor)",
    reference="Song et al. 2021, Score-Based Generative Modeling through SDEs (Alg. 'euler_maruyama')",
)
@register(
    "irsde",
    family="sde",
    order=1,
    calls_per_step=1,
    deterministic=False,
    fixed={"denoise": False},
    description="IR-SDE's reverse-SDE step (Euler-Maruyama with noise at every step)",
    reference="Luo et al. 2023, Image Restoration with Mean-Reverting SDEs (reverse_sde_step)",
)
class EulerMaruyama(Solver):
    """Euler-Maruyama on the reverse-time SDE (Score-SDE's ``EulerMaruyamaPredictor``):

        dt      = t_{i+1} - t_i                          (< 0)
        x_mean  = x_i + [ -f(t_i) (x_i - mu) - g2(t_i) score(x_i, t_i) ] dt
        x_{i+1} = x_mean + sqrt(g2(t_i) |dt|) z

    Step size: we follow the paper and use the actual grid spacing dt = t_{i+1} - t_i. Score-SDE's
    code uses dt = -1/N on a grid linspace(1, eps, N) whose spacing is (1 - eps)/(N - 1); on such
    a grid the two differ by a factor (1 - eps) N/(N - 1) in the step length. With ``denoise=True``
    (Score-SDE's ``noise_removal``) the last step returns x_mean, adding no noise. Weak order 1
    (strong order 1/2); one model call per step. On a mean-reverting schedule (f = theta,
    g2 = 2 lam^2 theta) this is IR-SDE's ``reverse_sde_step``, registered as ``irsde`` (noise at
    every step, as IR-SDE does).
    """

    denoise = Option(True, "the last step is the noiseless mean (Tweedie's denoising step)")

    def run(self, x, grid, noise, *, schedule, mu=None):
        n = len(grid) - 1
        for i in range(n):
            t, t_next = float(grid[i]), float(grid[i + 1])
            pred = yield Query(x, t, step=i + 1)
            x, std = euler_maruyama_step(pred, t, t_next, schedule, mu)
            if not (self.denoise and i == n - 1):
                x = x + std * noise.step(t, t_next)
        return x


def euler_maruyama_step(pred, t: float, t_next: float, schedule, mu=None):
    """(x_mean, std) of one Euler-Maruyama step of the reverse SDE from t to t_next (docstring above)."""
    dt = t_next - t
    f, g2 = (float(v) for v in reverse_sde_coefs(schedule, t))
    y = pred.x if mu is None else pred.x - mu
    return pred.x + (-f * dt) * y + (-g2 * dt) * pred.score, math.sqrt(g2 * abs(dt))


def reverse_sde_coefs(schedule, t) -> tuple[torch.Tensor, torch.Tensor]:
    """(f(t), g2(t)) of the forward SDE, with a clear error where they are infinite (alpha(t) = 0, e.g.
    rectified flow at t = 1: the reverse SDE cannot start there)."""
    f, g2 = schedule.f(t), schedule.g2(t)
    if not (bool(torch.isfinite(f).all()) and bool(torch.isfinite(g2).all())):
        tt = torch.as_tensor(t)
        where = f"t = {float(tt.max()):.6g}" if tt.ndim else f"t = {float(tt):.6g}"
        raise ValueError(
            f"the reverse SDE of {type(schedule).__name__} has an infinite drift at {where} "
            f"(alpha = 0 there); start SDE solvers below it, e.g. t_max=0.999"
        )
    return f, g2
