"""Step hooks for guidance and inverse problems: inpainting, thresholding, ensemble Kalman guidance.

The protocol (``before`` / ``after`` / ``finish`` with a :class:`HookContext`) is in
:mod:`diffsolve.core.hooks`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ..core.hooks import HookContext, StepHook
from ..core.protocol import check_batch, take_rows
from ..models.model import Prediction
from ..schedules.base import Schedule
from ..schedules.grids import make_grid
from .wrappers import noise_level

Tensor = torch.Tensor


def _scalar_t(t) -> float:
    if isinstance(t, Tensor) and t.ndim > 0:
        if not bool((t == t[0]).all()):
            raise ValueError("this hook needs one time for the whole batch (fixed-grid solvers)")
        return float(t[0])
    return float(t)


def _forward_noised(y: Tensor, t: float, schedule: Schedule, mu, z: Tensor) -> Tensor:
    """x_t = alpha y + (1 - alpha) mu + sigma z."""
    tt = torch.tensor(t, dtype=torch.float64)
    a, s = float(schedule.alpha(tt)), float(schedule.sigma(tt))
    return a * y + (0.0 if mu is None else (1 - a) * mu) + s * z


class Inpaint(StepHook):
    """Inpainting by replacement (RePaint's known-region step, Lugmayr et al. 2022): before every
    model call the known pixels (``mask`` = 1) are replaced by the observation ``y`` noised forward
    to the query time, x <- m (alpha_t y + (1 - alpha_t) mu + sigma_t z) + (1 - m) x; at the end they
    are set to y. ``mask`` and ``y`` hold one row per sample ([B, ...]) or broadcast to every row; a
    query on some rows of the batch (``ctx.index``) uses theirs.

    ``resample`` U > 1 adds RePaint's resampling: before each model call, U - 1 times, take a DDPM
    step to the next grid time (one extra model call), replace the known pixels there, and noise the
    state back with the forward transition x_t = (alpha_t / alpha_n) x_n + sqrt(sigma_t^2 - (alpha_t
    sigma_n / alpha_n)^2) z (mu = 0 schedules). It harmonises the unknown region with the known one.
    """

    def __init__(self, mask: Tensor, y: Tensor, *, resample: int = 1):
        if not isinstance(mask, Tensor) or not isinstance(y, Tensor):
            raise TypeError("mask and y must be tensors (mask: 1 where y is known)")
        if isinstance(resample, bool) or not isinstance(resample, int) or resample < 1:
            raise ValueError(f"resample must be an int >= 1, got {resample!r}")
        self.mask, self.y, self.resample = mask, y, resample

    def check(self, shape):
        """mask and y must have batch 1 or the run's, and broadcast to the samples' shape."""
        for name, v in (("mask", self.mask), ("y", self.y)):
            check_batch(f"Inpaint {name}", v, shape[0], shape)

    def _parts(self, x: Tensor, index: Tensor | None) -> tuple[Tensor, Tensor]:
        """(mask, y) on the rows ``index`` the query holds (either may be per sample or shared)."""
        return take_rows(self.mask, index, x.ndim).to(x), take_rows(self.y, index, x.ndim).to(x)

    def _known(self, x: Tensor, t: float, ctx: HookContext) -> Tensor:
        m, y = self._parts(x, ctx.index)
        return m * _forward_noised(y, t, ctx.schedule, ctx.mu, ctx.randn()) + (1 - m) * x

    def before(self, x, t, ctx):
        t = _scalar_t(t)
        x = self._known(x, t, ctx)
        t_next = ctx.t_next
        if self.resample > 1 and t_next < t:
            from ..solvers.ode.ddim import ddim_step

            s = ctx.schedule
            a, sg = (float(f(torch.tensor(t, dtype=torch.float64))) for f in (s.alpha, s.sigma))
            an, sn = (float(f(torch.tensor(t_next, dtype=torch.float64))) for f in (s.alpha, s.sigma))
            for _ in range(self.resample - 1):
                pred = ctx.call(x, t)
                x_next, c = ddim_step(pred, t, t_next, s, 1.0)
                x_next = self._known(x_next + c * ctx.randn(), t_next, ctx)
                r = a / an
                x = r * x_next + math.sqrt(max(sg * sg - (r * sn) ** 2, 0.0)) * ctx.randn()
                x = self._known(x, t, ctx)
        return x

    def finish(self, x, ctx):
        m, y = self._parts(x, ctx.index)
        return m * y + (1 - m) * x


class Threshold(StepHook):
    """Dynamic thresholding of x0 (Imagen, Saharia et al. 2022; diffusers' ``thresholding``): per
    sample s = clamp(quantile(|x0|, ``ratio``), 1, ``max_value``), x0 <- clamp(x0, -s, s) / s. The noise
    prediction is kept, as diffusers' DDIM does, so the step uses the thresholded x0 with the
    model's eps."""

    def __init__(self, ratio: float = 0.995, max_value: float = 1.0):
        if not 0 < ratio <= 1:
            raise ValueError(f"ratio must be in (0, 1], got {ratio!r}")
        if not max_value >= 1:
            raise ValueError(f"max_value must be >= 1, got {max_value!r}")
        self.ratio, self.max_value = float(ratio), float(max_value)

    def after(self, pred, ctx):
        return Prediction.from_pair(
            pred.x, pred.t, dynamic_threshold(pred.x0, self.ratio, self.max_value), pred.eps, ctx.schedule, pred.mu
        )


def dynamic_threshold(x0: torch.Tensor, ratio: float, max_value: float) -> torch.Tensor:
    """Imagen's dynamic thresholding of x0: per sample s = clamp(quantile(|x0|, ratio), 1, max_value),
    then clamp(x0, -s, s) / s (also what diffusers' ``thresholding`` does)."""
    flat = x0.reshape(x0.shape[0], -1).abs()
    flat = flat if flat.dtype in (torch.float32, torch.float64) else flat.float()  # quantile's dtypes
    s = torch.quantile(flat, ratio, dim=1).to(x0.dtype).clamp(1.0, max_value)
    s = s.reshape(-1, *([1] * (x0.ndim - 1)))
    return torch.maximum(torch.minimum(x0, s), -s) / s


class EnKG(StepHook):
    """Ensemble Kalman diffusion guidance (Zheng et al. 2024): derivative-free guidance for y = G(x0)
    with forward-model evaluations only. The batch is the ensemble of J particles x^(j) at time t.
    Before the model call at each step inside the noise-level ``window`` (sigma/alpha in
    (lo, hi]), ``num_updates`` times:

        x0^(j) = a deterministic DDIM solve from (x^(j), t) to t_min (``inner_steps`` model calls;
                 1 = Tweedie's x0_hat; default min(1 + (N - i) // 4, 20) as the official code)
        r^(j)  = G(x0^(j)) - y;    C_jk = (1/J) <r^(j), G(x0^(k)) - mean_k G(x0^(k))>
        x^(j) <- x^(j) - (eta / ||C||_F) sum_k C_jk (x^(k) - mean x)

    i.e. x <- x - (eta / ||C||_F) Cov_ens(x, G(x0)) r: a covariance-preconditioned gradient step
    without any Jacobian. ``eta`` = ``guidance_scale`` (official: 2.0 Navier-Stokes, 3.5 black hole).
    The official code runs it on an 80-step EDM grid and trims the first and last steps; the window
    here is in noise level. The particles are coupled: results depend on the batch.

    ``ensemble_size`` J splits the batch into consecutive groups of J particles, group g with its own
    measurement y[g] (several problems in one run); default: the whole batch is one ensemble for one y.
    """

    def __init__(
        self,
        forward: Callable[[Tensor], Tensor],
        y: Tensor,
        guidance_scale: float = 2.0,
        *,
        num_updates: int = 1,
        inner_steps: int | None = None,
        window: tuple[float, float] | None = None,
        ensemble_size: int | None = None,
    ):
        if not callable(forward):
            raise TypeError(f"forward must be callable as G(x0) -> y, got {type(forward).__name__}")
        if isinstance(num_updates, bool) or not isinstance(num_updates, int) or num_updates < 1:
            raise ValueError(f"num_updates must be an int >= 1, got {num_updates!r}")
        if inner_steps is not None and (
            isinstance(inner_steps, bool) or not isinstance(inner_steps, int) or inner_steps < 1
        ):
            raise ValueError(f"inner_steps must be None or an int >= 1, got {inner_steps!r}")
        if ensemble_size is not None and (
            isinstance(ensemble_size, bool) or not isinstance(ensemble_size, int) or ensemble_size < 2
        ):
            raise ValueError(f"ensemble_size must be None or an int >= 2, got {ensemble_size!r}")
        self.forward, self.y, self.guidance_scale = forward, y, float(guidance_scale)
        self.num_updates, self.inner_steps, self.window = num_updates, inner_steps, window
        self.ensemble_size = ensemble_size

    def _inside(self, x: Tensor, t: float, schedule: Schedule) -> bool:
        if self.window is None:
            return True
        s = float(noise_level(schedule, t, x)[0])
        return self.window[0] < s <= self.window[1]

    def denoise(self, x: Tensor, t: float, steps: int, ctx: HookContext) -> Tensor:
        """x0 of each particle: ``steps`` model calls of DDIM from t towards the grid's end."""
        from ..solvers.ode.ddim import ddim_step

        inner = make_grid(ctx.schedule, steps, None, t_max=t, t_min=float(ctx.grid[-1]))
        for k in range(steps):
            pred = ctx.call(x, float(inner[k]))
            if k == steps - 1:
                return pred.x0
            x, _ = ddim_step(pred, float(inner[k]), float(inner[k + 1]), ctx.schedule, 0.0)
        raise AssertionError

    def update(self, x: Tensor, x0: Tensor) -> Tensor:
        """One ensemble update of the particles x given their denoised x0 (the formula above)."""
        b = x.shape[0]
        j = self.ensemble_size or b
        if b % j:
            raise ValueError(f"EnKG: a batch of {b} does not split into ensembles of {j}")
        g = self.forward(x0).reshape(b // j, j, -1)
        r = g - self.y.to(g).reshape(-1, 1, g.shape[-1])
        c = r @ (g - g.mean(1, keepdim=True)).transpose(1, 2) / j  # [G, J, J]
        xs = x.reshape(b // j, j, -1)
        dx = c @ (xs - xs.mean(1, keepdim=True))
        step = self.guidance_scale / c.flatten(1).norm(dim=1)[:, None, None]
        return (xs - step * dx).reshape(x.shape)

    def before(self, x, t, ctx):
        t = _scalar_t(t)
        if ctx.index is not None:
            raise ValueError("EnKG couples the whole batch: use a solver that queries all rows at once")
        if not self._inside(x, t, ctx.schedule):
            return x
        n = len(ctx.grid) - 1
        steps = self.inner_steps or min(1 + (n - ctx.step + 1) // 4, 20)
        with torch.no_grad():
            for _ in range(self.num_updates):
                x = self.update(x, self.denoise(x, t, steps, ctx))
        return x
