"""Stochastic fixed-grid solvers: Euler-Maruyama (:mod:`.euler_maruyama`) and Score-SDE's predictor-corrector
(:mod:`.pc`)."""

from . import euler_maruyama, pc  # noqa: F401
