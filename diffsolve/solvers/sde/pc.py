"""Predictor-corrector samplers of Score-SDE (Song et al. 2021, Algorithms 1-5), for any schedule.

At every grid time t_i the corrector runs first (``n_corrector_steps`` Langevin steps at t_i), then the
predictor steps to t_{i+1}, as in Score-SDE's code (``get_pc_sampler``; the paper's Algorithm 1 writes
the predictor first). NFE = N (n_corrector_steps + 1). With y = x - mu, s the score at (x, t_i),
A = alpha_i / alpha_{i+1} and Q = sigma_i^2 - A^2 sigma_{i+1}^2 (the forward transition
y_i = A y_{i+1} + sqrt(Q) z between grid points):

Predictors (x_mean is the update without noise; ``denoise`` returns the last x_mean):
  ``euler-maruyama``     x_mean = x + [-f (x - mu) - g2 s] dt,        noise sqrt(g2 |dt|)   (weak order 1)
  ``reverse-diffusion``  x_mean = mu + (2 - A) y + Q s,               noise sqrt(Q)
                         (VP: (2 - sqrt(1 - beta)) x + beta s;  VE: x + (sigma_i^2 - sigma_{i+1}^2) s)
  ``ancestral``          the DDPM posterior step q(x_{i+1} | x_i, x0 = Tweedie(x_i))   (= ``ddpm``)
                         (VE: Score-SDE's ancestral step exactly; VP: Score-SDE uses the variance
                         beta where the posterior has beta (1 - abar_{i+1}) / (1 - abar_i))
  ``none``               x_mean = x
Correctors (each step one model call; first order in the step size):
  ``langevin``  eps = 2 (snr |z| / |s|)^2,          x_mean = x + eps s,  x = x_mean + sqrt(2 eps) z
  ``ald``       eps = 2 (snr sigma(t_i))^2           (annealed Langevin dynamics, NCSN)
  ``none``
|z| and |s| are per-sample L2 norms over all dimensions, averaged over the batch as in Score-SDE
(one step size per batch): so with ``corrector="langevin"`` a sample depends on the rest of its batch,
as in the published algorithm. ``langevin_norm="sample"`` keeps one step size per sample (batch
invariant), but in low dimension |s| fluctuates with x and the step size then biases the variance
upward (about +25% at D = 16). Score-SDE multiplies eps by alpha_j = 1 - beta_j for VP; we use 1
(under 2% apart for VP with 1000 training steps). ``ald`` is batch invariant.
"""

from __future__ import annotations

import math

import torch

from ...core.options import Option
from ...core.protocol import Query, Solver
from ...core.registry import register
from ..ode.ddim import ddim_step
from .euler_maruyama import euler_maruyama_step

PREDICTORS = ("euler-maruyama", "reverse-diffusion", "ancestral", "none")
CORRECTORS = ("langevin", "ald", "none")


def langevin_step_size(score: torch.Tensor, z: torch.Tensor, snr: float, per_sample: bool = False) -> torch.Tensor:
    """Score-SDE's Langevin step size 2 (snr |z| / |s|)^2, shaped to broadcast against x.

    |z| and |s| are per-sample L2 norms, averaged over the batch (Score-SDE) or not (``per_sample``).
    """
    s_norm = score.flatten(1).norm(dim=1)
    z_norm = z.flatten(1).norm(dim=1)
    if not per_sample:
        s_norm, z_norm = s_norm.mean().expand_as(s_norm), z_norm.mean().expand_as(z_norm)
    eps = 2.0 * (snr * z_norm / s_norm) ** 2
    return eps.reshape(-1, *([1] * (score.ndim - 1)))


@register(
    "pc",
    family="pc",
    order=1,
    calls_per_step=2,
    deterministic=False,
    description="Score-SDE predictor-corrector (predictor x corrector by name, snr step size)",
    reference="Song et al. 2021, Score-Based Generative Modeling through SDEs (Algorithms 1-5)",
    aliases=("score-sde-pc",),
)
class PredictorCorrector(Solver):
    """Score-SDE's predictor-corrector sampler; see the module docstring for the rules.

    Options: ``predictor`` (euler-maruyama, reverse-diffusion, ancestral, none), ``corrector``
    (langevin, ald, none), ``snr`` (0.16, Score-SDE's CIFAR-10 value), ``n_corrector_steps`` (1),
    ``denoise`` (True: the last predictor's noise-free mean is returned). SGMSE's sampler is
    ``predictor="reverse-diffusion", corrector="ald", snr=0.5`` on the OUVE schedule.
    """

    predictor = Option("reverse-diffusion", "the predictor step", choices=PREDICTORS)
    corrector = Option("langevin", "the corrector step", choices=CORRECTORS)
    snr = Option(0.16, "the corrector's signal-to-noise ratio r (its step size)", low=0.0, low_open=True)
    n_corrector_steps = Option(1, "corrector steps per predictor step", low=0)
    denoise = Option(True, "the last step is the noiseless mean (Tweedie's denoising step)")
    langevin_norm = Option(
        "batch",
        "the Langevin step size from the batch's mean gradient norm ('batch', as "
        "Score-SDE's code) or each sample's own ('sample')",
        choices=("batch", "sample"),
    )

    def check_options(self):
        if self.predictor == "none" and (self.corrector == "none" or self.n_corrector_steps == 0):
            raise ValueError("predictor='none' needs a corrector with n_corrector_steps >= 1")

    def run(self, x, grid, noise, *, schedule, mu=None):
        n = len(grid) - 1
        m = self.n_corrector_steps if self.corrector != "none" else 0
        for i in range(n):
            t, t_next = float(grid[i]), float(grid[i + 1])
            for _ in range(m):
                pred = yield Query(x, t, step=i + 1)
                score = pred.score
                z = noise.randn()
                if self.corrector == "langevin":
                    eps = langevin_step_size(score, z, self.snr, per_sample=self.langevin_norm == "sample")
                else:
                    eps = torch.tensor(2.0 * (self.snr * float(schedule.sigma(t))) ** 2, dtype=x.dtype, device=x.device)
                x = pred.x + eps * score + (2.0 * eps).sqrt() * z
            if self.predictor == "none":
                continue
            pred = yield Query(x, t, step=i + 1)
            last = i == n - 1
            x_mean, std = self._predict(pred, t, t_next, schedule, mu)
            x = x_mean if (std == 0 or (last and self.denoise)) else x_mean + std * noise.step(t, t_next)
        return x

    def _predict(self, pred, t, t_next, schedule, mu):
        """(x_mean, noise std) of one predictor step from t to t_next."""
        if self.predictor == "euler-maruyama":
            return euler_maruyama_step(pred, t, t_next, schedule, mu)
        if self.predictor == "ancestral":  # the posterior q(x_{i+1} | x_i, x0) with x0 from the model
            return ddim_step(pred, t, t_next, schedule, eta=1.0)
        x = pred.x
        y = x if mu is None else x - mu
        big_a = float(schedule.alpha(t)) / float(schedule.alpha(t_next))
        q = float(schedule.sigma(t)) ** 2 - big_a**2 * max(float(schedule.sigma(t_next)), 0.0) ** 2
        y_mean = (2.0 - big_a) * y + q * pred.score  # reverse diffusion
        return (y_mean if mu is None else y_mean + mu), math.sqrt(max(q, 0.0))
