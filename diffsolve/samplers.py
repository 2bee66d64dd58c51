"""The public names of :mod:`diffsolve.core` and :mod:`diffsolve.solvers` in one namespace
(``ds.samplers.get_solver``, ``ds.samplers.StepSizeController``, ...), as before the two packages
existed. Importing it registers every solver."""

from .core import (
    DEFAULT_INVERSION_SOLVER,
    Latent,
    NoiseSource,
    Outcome,
    Query,
    ReNoise,
    SampleResult,
    Solver,
    SolverInfo,
    StepSizeController,
    UnstableError,
    check_invertible,
    get_solver,
    invert,
    list_solvers,
    register,
    resolve_seeds,
    sample,
    solver_info,
)
from .core.graphs import CUDAGraphSampler
from .solvers import ClassifierNoiseLevel, DenoiserNoiseLevel, ExactNoiseLevel, NoiseLevelEstimator, pilot_grid

__all__ = [
    "DEFAULT_INVERSION_SOLVER",
    "CUDAGraphSampler",
    "ClassifierNoiseLevel",
    "DenoiserNoiseLevel",
    "ExactNoiseLevel",
    "Latent",
    "NoiseLevelEstimator",
    "NoiseSource",
    "Outcome",
    "Query",
    "ReNoise",
    "SampleResult",
    "Solver",
    "SolverInfo",
    "StepSizeController",
    "UnstableError",
    "check_invertible",
    "get_solver",
    "invert",
    "list_solvers",
    "pilot_grid",
    "register",
    "resolve_seeds",
    "sample",
    "solver_info",
]
