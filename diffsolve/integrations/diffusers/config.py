"""What a diffusers scheduler config means to diffsolve: prediction types, flow shifts."""

from __future__ import annotations

import math

PREDICTIONS = {"epsilon": "eps", "sample": "x0", "v_prediction": "v", "flow_prediction": "velocity"}


def flow_shift(cfg, mu: float | None = None) -> float:
    """The shift of a flow-matching scheduler config as RectifiedFlow's ``shift``: the static one, or
    for dynamic shifting with ``mu`` the time shift sigma = e^mu / (e^mu + 1/t - 1) (exponential),
    which is RectifiedFlow's with shift e^mu (linear: shift mu)."""
    if not cfg.get("use_dynamic_shifting", False):
        return float(cfg.get("shift", 1.0))
    if mu is None:
        raise ValueError("this flow scheduler config uses dynamic shifting: its shift needs mu")
    return math.exp(mu) if cfg.get("time_shift_type", "exponential") == "exponential" else float(mu)
