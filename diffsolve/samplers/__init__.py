"""Solver registry, driver and every solver (imports models, schedules)."""

from . import adaptive, blackbox, dmcmc, exponential, exponential_adaptive, ode, pc, reversible, sde  # noqa: F401  (registers the solvers)
from .base import Outcome, Query, Solver
from .control import StepSizeController
from .exponential_adaptive import pilot_grid
from .graphs import CUDAGraphSampler
from .dmcmc import ClassifierNoiseLevel, DenoiserNoiseLevel, ExactNoiseLevel, NoiseLevelEstimator
from .driver import DEFAULT_INVERSION_SOLVER, check_invertible, invert, sample
from .noise import NoiseSource, resolve_seeds
from .registry import SolverInfo, get_solver, list_solvers, register, solver_info
from .renoise import ReNoise
from .result import Latent, SampleResult
from .reversible import UnstableError

__all__ = [
    "sample", "invert", "DEFAULT_INVERSION_SOLVER", "check_invertible", "Latent", "ReNoise", "get_solver", "list_solvers", "register", "solver_info", "SolverInfo", "Solver", "Query", "Outcome", "StepSizeController",
    "NoiseLevelEstimator", "ExactNoiseLevel", "ClassifierNoiseLevel", "DenoiserNoiseLevel",
    "SampleResult", "UnstableError", "NoiseSource", "resolve_seeds", "CUDAGraphSampler", "pilot_grid",
]
