"""Rectified flow / flow matching: x_t = (1 - sigma) x_0 + sigma eps.

References: Liu et al. 2023 (rectified flow); Lipman et al. 2023 (flow matching); Esser et al. 2024
(SD3, the time shift sigma = s t / (1 + (s - 1) t)).
"""

from __future__ import annotations

import torch

from .base import Schedule, Tensor, as_time, check_range, check_times


class RectifiedFlow(Schedule):
    """alpha = 1 - sigma(t), sigma(t) = shift t / (1 + (shift - 1) t), t in [0, 1].

    With ``shift = 1`` this is the plain linear path alpha = 1 - t, sigma = t. The network time is
    the noise level sigma(t) (what a flow model such as SD3 is conditioned on, up to a factor 1000
    which belongs in ``time_input``). Both ends have an infinite log-SNR, so the default grid is
    uniform in t; pass ``t_min > 0`` and ``t_max < 1`` to use log-SNR grids.
    """

    default_grid = "uniform"

    def __init__(self, shift: float = 1.0, t_min: float = 0.0, t_max: float = 1.0):
        self.shift = check_range("shift", shift, 0.0)
        self.t_min, self.t_max = check_times(t_min, t_max, 0.0, 1.0)

    def sigma(self, t) -> Tensor:
        t = as_time(t)
        if self.shift == 1.0:
            return t.clone()
        return self.shift * t / (1.0 + (self.shift - 1.0) * t)

    def alpha(self, t) -> Tensor:
        return 1.0 - self.sigma(t)

    def sigma_dot(self, t) -> Tensor:
        t = as_time(t)
        return self.shift / (1.0 + (self.shift - 1.0) * t) ** 2

    def alpha_dot(self, t) -> Tensor:
        return -self.sigma_dot(t)

    def log_snr(self, t) -> Tensor:
        s = self.sigma(t)
        return torch.log1p(-s) - torch.log(s)

    def t_of_log_snr(self, lam) -> Tensor:
        s = 1.0 / (1.0 + torch.exp(as_time(lam)))  # (1 - s)/s = e^lam (torch.sigmoid is not batch invariant)
        return s / (self.shift - (self.shift - 1.0) * s)

    def sampling_scale(self, t: float) -> float:
        return 1.0

    def timestep(self, t) -> Tensor:
        return self.sigma(t)

    def _repr_fields(self) -> dict:
        return {"shift": self.shift, **super()._repr_fields()}
