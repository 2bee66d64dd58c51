"""Tuned model calls: the answer a solver gets at a grid time, made from the model asked at another time.

A few-step solver's error is mostly truncation error, and two numbers per model call can absorb much
of it without touching the solver's update (so any registered solver can use them): the time the
network is asked at, tau_i, decoupled from the grid time t_i the solver steps from (LD3, Tong et al.
2025, learns the same "time fed to the network"), and a weight gamma_i between the network's clean
data prediction and the state's own. A query at (x, t_i) is answered with

    x0 = gamma_i D(x, tau_i) + (1 - gamma_i) x0(x, t_i; eps = 0),

where D(x, tau) is the model's clean-data prediction asked at tau and x0(x, t; eps = 0) = (x - (1 -
alpha_t) mu) / alpha_t is the clean data x stands for when it holds no noise. Its noise prediction,
the consistent one at t_i, is then gamma_i times the one D implies there, (x - alpha_t D) / sigma_t
(mu = 0): gamma is the epsilon scaling of Ning et al. (2024, "Elucidating the Exposure Bias in
Diffusion Models"), fitted per call instead of one schedule. tau_i = t_i and gamma_i = 1 change
nothing. :func:`diffsolve.optimize_grid` fits both with the grid (``tune_calls=True``, :mod:`diffsolve.optimize.calls`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from ..schedules.base import as_time
from .model import DiffusionModel, Prediction
from .wrapped import GuidedModel

Tensor = torch.Tensor


def tuned_prediction(pred: Prediction, x: Tensor, t, weight: float) -> Prediction:
    """The answer at (x, t) made from ``pred`` (the model's answer for x asked at another time) with
    data weight ``weight`` (module docstring)."""
    x0 = pred.x0
    if weight != 1.0:
        own = Prediction(x, t, torch.zeros_like(x), "eps", pred.schedule, pred.mu).x0  # x0(x, t; eps = 0)
        x0 = weight * x0 + (1.0 - weight) * own
    return Prediction(x, t, x0, "x0", pred.schedule, pred.mu)


def tunable(schedule, t: float) -> bool:
    """Whether a call at ``t`` can be tuned: its log-SNR is finite (alpha > 0 and sigma > 0)."""
    return math.isfinite(float(schedule.log_snr(torch.tensor(float(t), dtype=torch.float64))))


class TunedCalls(GuidedModel):
    """``model`` with its calls at the times of ``grid`` tuned (module docstring): a query at
    ``grid[i]`` asks ``model`` at ``model_times[i]`` and mixes with ``data_weights[i]``; queries at other
    times (a multi-stage solver's intermediate times) pass through. Model calls are counted as the
    wrapped model's."""

    def __init__(
        self,
        model: DiffusionModel,
        grid: Sequence[float],
        model_times: Sequence[float],
        data_weights: Sequence[float],
    ):
        super().__init__(model)
        if not len(grid) == len(model_times) == len(data_weights):
            raise ValueError(
                f"model_times and data_weights need one entry per grid time ({len(grid)}), got "
                f"{len(model_times)} and {len(data_weights)}"
            )
        self.table: Mapping[float, tuple[float, float]] = {
            float(t): (float(tau), float(w)) for t, tau, w in zip(grid, model_times, data_weights)
        }
        for t, (tau, w) in self.table.items():
            if not (math.isfinite(tau) and math.isfinite(w)):
                raise ValueError(f"model_times and data_weights must be finite, got {tau} and {w} at t={t:.6g}")
            if (tau != t or w != 1.0) and not tunable(self.schedule, t):
                raise ValueError(f"the call at t={t:.6g} cannot be tuned (alpha or sigma is 0 there)")

    def __call__(self, x, t, *, mu=None, counter=None, index=None, **cond):
        tt = as_time(t)
        entry = self.table.get(float(tt)) if tt.ndim == 0 else None
        if entry is None or entry == (float(tt), 1.0):
            return self.inner(x, t, mu=mu, counter=counter, index=index, **cond)
        tau, weight = entry
        pred = self.inner(x, tau, mu=mu, counter=counter, index=index, **cond)
        return tuned_prediction(pred, x, t, weight)
