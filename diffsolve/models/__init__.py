"""The common model interface and the oracle models."""

from .analytic import Empirical, GaussianMixture
from .model import TIME_INPUTS, DiffusionModel, FiniteGuard, NFECounter, NonFiniteError, Prediction, check_finite
from .parameterization import PREDICTIONS, Coefs, compose, from_x0_eps, to_x0_eps

__all__ = [
    "DiffusionModel", "Prediction", "NFECounter", "NonFiniteError", "check_finite", "GaussianMixture",
    "Empirical", "PREDICTIONS", "TIME_INPUTS", "Coefs", "to_x0_eps", "from_x0_eps", "compose",
]
