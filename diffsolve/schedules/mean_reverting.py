"""Mean-reverting schedules: x_t = alpha x_0 + (1 - alpha) mu + sigma eps with a condition mu.

References: Luo et al. 2023, "Image Restoration with Mean-Reverting SDEs" (IR-SDE); Li et al. 2025,
"MRS: a fast sampler for mean reverting diffusion" (the general form); Welker et al. 2022 and
Richter et al. 2023 (SGMSE / SGMSE+, the OUVE SDE).
"""

from __future__ import annotations

import math

import torch

from .base import Schedule, Tensor, as_time, check_range, check_times


class MeanReverting(Schedule):
    """IR-SDE: dx = theta(t) (mu - x) dt + g(t) dw with g^2 / theta = 2 lam^2 (stationary std ``lam``).

        alpha(t) = exp(-thetabar(t)),    thetabar(t) = c int_0^t theta(u) du,
        sigma(t) = lam sqrt(1 - alpha(t)^2),      x_t -> N(mu, lam^2 I) as alpha -> 0.

    Continuous-time version of IR-SDE's discrete schedules on t in [0, 1]:
      - ``theta="cosine"``: theta(u) = 1 - abar(u) with abar the improved-DDPM cosine curve
        (s = 0.008) normalised to abar(0) = 1, rising from 0 to 1 as in IR-SDE;
      - ``theta="linear"``: theta(u) = 1e-4 + u (0.02 - 1e-4).
    The scale c is chosen so that alpha(1) = ``alpha_end`` (IR-SDE's eps = 0.005). With lam = 1 and
    mu = 0 this is a VP schedule with beta = 2 theta. ``lam`` is in data units (IR-SDE's max_sigma/255
    for images in [0, 1]); the default 50/255 is DA-CLIP's universal-IR setting.
    """

    default_grid = "log-snr"
    _S = 0.008

    def __init__(
        self,
        lam: float = 50.0 / 255.0,
        theta: str = "cosine",
        alpha_end: float = 0.005,
        t_min: float = 0.01,
        t_max: float = 1.0,
    ):
        self.lam = check_range("lam", lam, 0.0)
        if theta not in ("cosine", "linear"):
            raise ValueError(f"theta must be 'cosine' or 'linear', got {theta!r}")
        self.theta_kind = theta
        self.alpha_end = check_range("alpha_end", alpha_end, 0.0, 1.0)
        if self.alpha_end >= 1.0:
            raise ValueError(f"alpha_end must be < 1, got {alpha_end}")
        self.t_min, self.t_max = check_times(t_min, t_max, 0.0, 1.0)
        if self.t_min <= 0.0:
            raise ValueError("t_min must be > 0 for MeanReverting (sigma(0) = 0, the log-SNR is infinite)")
        self._scale = -math.log(self.alpha_end) / float(self._theta_integral(torch.tensor(1.0, dtype=torch.float64)))

    def _theta_integral(self, t: Tensor) -> Tensor:
        if self.theta_kind == "linear":
            b0, b1 = 1e-4, 0.02
            return b0 * t + 0.5 * (b1 - b0) * t * t
        s = self._S
        k = math.pi / (2.0 * (1.0 + s))
        norm = math.cos(k * s) ** 2
        # int_0^t cos^2(k (u + s)) du = t/2 + (sin(2k(t + s)) - sin(2ks)) / (4k)
        cos2 = 0.5 * t + (torch.sin(2.0 * k * (t + s)) - math.sin(2.0 * k * s)) / (4.0 * k)
        return t - cos2 / norm

    def theta(self, t) -> Tensor:
        """The mean-reversion rate theta(t) = f(t)."""
        t = as_time(t)
        if self.theta_kind == "linear":
            return self._scale * (1e-4 + t * (0.02 - 1e-4))
        s = self._S
        k = math.pi / (2.0 * (1.0 + s))
        return self._scale * (1.0 - torch.cos(k * (t + s)) ** 2 / math.cos(k * s) ** 2)

    def thetabar(self, t) -> Tensor:
        return self._scale * self._theta_integral(as_time(t))

    def alpha(self, t) -> Tensor:
        return torch.exp(-self.thetabar(t))

    def alpha_dot(self, t) -> Tensor:
        t = as_time(t)
        return -self.theta(t) * self.alpha(t)

    def sigma(self, t) -> Tensor:
        return self.lam * torch.sqrt(-torch.expm1(-2.0 * self.thetabar(t)))

    def sigma_dot(self, t) -> Tensor:
        t = as_time(t)
        a = self.alpha(t)
        return self.lam**2 * self.theta(t) * a * a / self.sigma(t)

    def _repr_fields(self) -> dict:
        return {"lam": self.lam, "theta": self.theta_kind, "alpha_end": self.alpha_end, **super()._repr_fields()}


class OUVE(Schedule):
    """SGMSE's Ornstein-Uhlenbeck variance-exploding SDE (Welker et al. 2022; Richter et al. 2023).

        dx = gamma (mu - x) dt + g(t) dw,   g(t) = sigma_min (sigma_max/sigma_min)^t sqrt(2 L),
        L = log(sigma_max / sigma_min),  alpha(t) = exp(-gamma t),
        sigma(t)^2 = sigma_min^2 (exp(2 L t) - exp(-2 gamma t)) L / (gamma + L).

    Defaults are SGMSE+'s: gamma = 1.5, sigma_min = 0.05, sigma_max = 0.5, t in [0.03, 1].
    """

    default_grid = "uniform"

    def __init__(
        self,
        gamma: float = 1.5,
        sigma_min: float = 0.05,
        sigma_max: float = 0.5,
        t_min: float = 0.03,
        t_max: float = 1.0,
    ):
        self.gamma = check_range("gamma", gamma, 0.0)
        self.sigma_min = check_range("sigma_min", sigma_min, 0.0)
        self.sigma_max = check_range("sigma_max", sigma_max, self.sigma_min)
        self.t_min, self.t_max = check_times(t_min, t_max, 0.0)
        if self.t_min <= 0.0:
            raise ValueError("t_min must be > 0 for OUVE (sigma(0) = 0, the log-SNR is infinite)")
        self._L = math.log(self.sigma_max / self.sigma_min)

    def alpha(self, t) -> Tensor:
        return torch.exp(-self.gamma * as_time(t))

    def alpha_dot(self, t) -> Tensor:
        return -self.gamma * self.alpha(t)

    def sigma(self, t) -> Tensor:
        t = as_time(t)
        L, g = self._L, self.gamma
        var = self.sigma_min**2 * (torch.exp(2 * L * t) - torch.exp(-2 * g * t)) * L / (g + L)
        return torch.sqrt(var)

    def sigma_dot(self, t) -> Tensor:
        t = as_time(t)
        L, g = self._L, self.gamma
        dvar = self.sigma_min**2 * (2 * L * torch.exp(2 * L * t) + 2 * g * torch.exp(-2 * g * t)) * L / (g + L)
        return dvar / (2.0 * self.sigma(t))

    def _repr_fields(self) -> dict:
        return {"gamma": self.gamma, "sigma_min": self.sigma_min, "sigma_max": self.sigma_max, **super()._repr_fields()}
