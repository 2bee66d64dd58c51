"""The common model interface and the oracle models."""

from .analytic import Empirical, GaussianMixture
from .gaussian import Gaussian
from .model import TIME_INPUTS, DiffusionModel, FiniteGuard, NFECounter, NonFiniteError, Prediction, check_finite
from .parameterization import PREDICTIONS, Coefs, compose, from_x0_eps, to_x0_eps

__all__ = [
    "PREDICTIONS",
    "TIME_INPUTS",
    "Coefs",
    "DiffusionModel",
    "Empirical",
    "FiniteGuard",
    "Gaussian",
    "GaussianMixture",
    "NFECounter",
    "NonFiniteError",
    "Prediction",
    "check_finite",
    "compose",
    "from_x0_eps",
    "to_x0_eps",
]
