"""Variance-exploding schedules: alpha = 1.

References: Song et al. 2021 (VE SDE, sigma(t) = sigma_min (sigma_max/sigma_min)^t); Karras et al.
2022, "Elucidating the Design Space of Diffusion-Based Generative Models" (EDM: sigma(t) = t).
"""

from __future__ import annotations

import math

import torch

from .base import Schedule, Tensor, as_time, check_range, check_times


class _VEBase(Schedule):
    def alpha(self, t) -> Tensor:
        return torch.ones_like(as_time(t))

    def alpha_dot(self, t) -> Tensor:
        return torch.zeros_like(as_time(t))

    def log_snr(self, t) -> Tensor:
        return -torch.log(self.sigma(t))


class VE(_VEBase):
    """Score-SDE's VE SDE: alpha = 1, sigma(t) = sigma_min (sigma_max / sigma_min)^t, t in [t_min, 1].

    sigma_min is not subtracted (as in Score-SDE), so sigma(0) = sigma_min. Prior N(0, sigma_max^2 I).
    """

    default_grid = "log-snr"

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0, t_min: float = 1e-5, t_max: float = 1.0):
        self.sigma_min = check_range("sigma_min", sigma_min, 0.0)
        self.sigma_max = check_range("sigma_max", sigma_max, self.sigma_min)
        self.t_min, self.t_max = check_times(t_min, t_max, 0.0)
        self._log_ratio = math.log(self.sigma_max / self.sigma_min)

    def sigma(self, t) -> Tensor:
        return self.sigma_min * torch.exp(as_time(t) * self._log_ratio)

    def sigma_dot(self, t) -> Tensor:
        return self.sigma(t) * self._log_ratio

    def t_of_log_snr(self, lam) -> Tensor:
        return (-as_time(lam) - math.log(self.sigma_min)) / self._log_ratio

    def _repr_fields(self) -> dict:
        return {"sigma_min": self.sigma_min, "sigma_max": self.sigma_max, **super()._repr_fields()}


class EDM(_VEBase):
    """EDM (Karras et al. 2022): alpha = 1, sigma(t) = t, t in [sigma_min, sigma_max] = [0.002, 80].

    The EDM network input c_noise = log(sigma)/4 is a ``time_input`` choice of the model
    (``time_input="c_noise"``), not part of the schedule.
    """

    default_grid = "karras"

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0):
        self.t_min, self.t_max = check_times(sigma_min, sigma_max, 0.0)

    @property
    def sigma_min(self) -> float:
        return self.t_min

    @property
    def sigma_max(self) -> float:
        return self.t_max

    def sigma(self, t) -> Tensor:
        return as_time(t).clone()

    def sigma_dot(self, t) -> Tensor:
        return torch.ones_like(as_time(t))

    def t_of_log_snr(self, lam) -> Tensor:
        return torch.exp(-as_time(lam))

    def _repr_fields(self) -> dict:
        return {"sigma_min": self.t_min, "sigma_max": self.t_max}
