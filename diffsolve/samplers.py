"""The public names of :mod:`diffsolve.core` and :mod:`diffsolve.solvers` in one namespace
(``ds.samplers.get_solver``, ``ds.samplers.StepSizeController``, ...), as before the two packages
existed. Importing it registers every solver."""

from .core import (DEFAULT_INVERSION_SOLVER, Latent, NoiseSource, Outcome, Query, ReNoise, SampleResult, Solver,
                   SolverInfo, StepSizeController, UnstableError, check_invertible, get_solver, invert, list_solvers,
                   register, resolve_seeds, sample, solver_info)
from .core.graphs import CUDAGraphSampler
from .solvers import (ClassifierNoiseLevel, DenoiserNoiseLevel, ExactNoiseLevel, NoiseLevelEstimator,
                      pilot_grid)

__all__ = [
    "sample", "invert", "DEFAULT_INVERSION_SOLVER", "check_invertible", "Latent", "ReNoise", "get_solver",
    "list_solvers", "register", "solver_info", "SolverInfo", "Solver", "Query", "Outcome", "StepSizeController",
    "NoiseLevelEstimator", "ExactNoiseLevel", "ClassifierNoiseLevel", "DenoiserNoiseLevel",
    "SampleResult", "UnstableError", "NoiseSource", "resolve_seeds", "CUDAGraphSampler", "pilot_grid",
]
