"""Step-size control for the adaptive solvers, separate from the solvers (as in diffrax).

A solver computes a local error estimate E for each sample; the controller turns it into a scaled
error norm, an accept/reject decision and the next step size. All of it works per sample ([B]
tensors), so a batch can carry one step size per row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

Tensor = torch.Tensor


@dataclass(frozen=True)
class StepSizeController:
    """I / PI step-size control on a mixed-tolerance scaled RMS error norm.

    error norm   err = sqrt( mean_over_dims( (E / delta)^2 ) ),
                 delta = max(atol, rtol * max(|x_prev|, |x_new|))     (element-wise)
    accept       err <= 1
    next step    h_next = h * clamp(safety * err^(-exponent) * err_prev^(exponent_prev), factor_min, factor_max)

    The defaults are Gotta Go Fast's (Jolicoeur-Martineau et al. 2021): safety 0.9, exponent 0.9, no
    PI term and no limits on the factor (its code caps h only by the time left). With ``err = 0`` the
    factor is ``factor_max``; ``exponent_prev > 0`` gives PI control (Gustafsson 1991, with err_prev
    the norm of the last accepted step).
    """

    safety: float = 0.9
    exponent: float = 0.9
    exponent_prev: float = 0.0
    factor_min: float = 0.0
    factor_max: float = math.inf

    def __post_init__(self):
        if not 0 < self.safety <= 1:
            raise ValueError(f"safety must be in (0, 1], got {self.safety}")
        if not self.exponent > 0:
            raise ValueError(f"exponent must be > 0, got {self.exponent}")
        if self.exponent_prev < 0:
            raise ValueError(f"exponent_prev must be >= 0, got {self.exponent_prev}")
        if not 0 <= self.factor_min < 1 < self.factor_max:
            raise ValueError(f"need 0 <= factor_min < 1 < factor_max, got {self.factor_min}, {self.factor_max}")

    @staticmethod
    def error_norm(err: Tensor, x_prev: Tensor, x_new: Tensor, atol: float, rtol: float) -> Tensor:
        """The scaled RMS norm of ``err`` per sample ([B], float64)."""
        delta = torch.maximum(x_prev.abs(), x_new.abs()).mul(rtol).clamp_min(atol)
        return (err / delta).double().flatten(1).pow(2).mean(dim=1).sqrt()

    def factor(self, err: Tensor, err_prev: Tensor | None = None) -> Tensor:
        """The factor h_next / h for error norms ``err`` ([B])."""
        with torch.no_grad():
            # err^-a as exp(-a log err): Tensor.pow's vectorised and scalar paths differ in the last
            # bit, which would make a row's step sizes depend on its batch
            f = self.safety * torch.exp(-self.exponent * err.double().log())
            if self.exponent_prev and err_prev is not None:
                f = f * torch.exp(self.exponent_prev * err_prev.double().log())
            return f.nan_to_num(nan=self.factor_max, posinf=self.factor_max).clamp(self.factor_min, self.factor_max)


MODES = ("per_sample", "batch")


def check_adaptive(controller: StepSizeController | None, default: StepSizeController, mode: str,
                   **positive: float) -> StepSizeController:
    """Shared option checks of the adaptive solvers: the named tolerances and step sizes must be
    numbers > 0, ``mode`` one of :data:`MODES`; returns ``controller`` or ``default``."""
    for name, v in positive.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
            raise ValueError(f"{name} must be a number > 0, got {v!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if controller is not None and not isinstance(controller, StepSizeController):
        raise TypeError(f"controller must be a StepSizeController, got {type(controller).__name__}")
    return default if controller is None else controller
