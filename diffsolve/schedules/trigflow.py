"""TrigFlow (Lu & Song 2024, "Simplifying, Stabilizing and Scaling Continuous-Time Consistency
Models", sCM, arXiv 2410.11081): x_t = cos(t) x_0 + sin(t) z, z ~ N(0, sigma_d^2 I), t in [0, pi/2].
"""

from __future__ import annotations

import math

import torch

from .base import Schedule, Tensor, as_time, check_range, check_times


class TrigFlow(Schedule):
    """alpha = cos t, sigma = sigma_data sin t, t in [t_min, t_max] within [0, pi/2].

    The time is the network's (diffusers' SCMScheduler lists it as its timesteps; its default
    max_timesteps = 1.57080 lies 3.7e-6 beyond pi/2, where alpha < 0: start at pi/2 or below). Both
    ends have an infinite log-SNR, so the default grid is uniform in t (SCM's linspace)."""

    default_grid = "uniform"

    def __init__(self, sigma_data: float = 0.5, t_min: float = 0.0, t_max: float = math.pi / 2):
        self.sigma_data = check_range("sigma_data", sigma_data, 0.0)
        self.t_min, self.t_max = check_times(t_min, t_max, 0.0, math.pi / 2)

    def alpha(self, t) -> Tensor:
        return torch.cos(as_time(t))

    def sigma(self, t) -> Tensor:
        return self.sigma_data * torch.sin(as_time(t))

    def alpha_dot(self, t) -> Tensor:
        return -torch.sin(as_time(t))

    def sigma_dot(self, t) -> Tensor:
        return self.sigma_data * torch.cos(as_time(t))

    def log_snr(self, t) -> Tensor:
        return -torch.log(torch.tan(as_time(t))) - math.log(self.sigma_data)

    def t_of_log_snr(self, lam) -> Tensor:
        return torch.atan(torch.exp(-as_time(lam)) / self.sigma_data)

    def _repr_fields(self) -> dict:
        return {"sigma_data": self.sigma_data, **super()._repr_fields()}
