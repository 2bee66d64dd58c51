"""The machinery every solver runs in: the solver protocol, the registry, the driver (``sample`` /
``invert``), noise and the Brownian tree, the step-size controller, the reversible adjoint, step hooks,
CUDA graphs and the result types. Nothing here knows a particular solver (those are in
:mod:`diffsolve.solvers`)."""

from .control import StepSizeController
from .driver import DEFAULT_INVERSION_SOLVER, check_invertible, invert, sample
from .noise import NoiseSource, resolve_seeds
from .protocol import ExactInverse, Outcome, Pump, Query, Solver, UnstableError, drive
from .registry import SolverInfo, get_solver, list_solvers, register, solver_info
from .renoise import ReNoise
from .result import Latent, SampleResult

__all__ = [
    "DEFAULT_INVERSION_SOLVER",
    "ExactInverse",
    "Latent",
    "NoiseSource",
    "Outcome",
    "Pump",
    "Query",
    "ReNoise",
    "SampleResult",
    "Solver",
    "SolverInfo",
    "StepSizeController",
    "UnstableError",
    "check_invertible",
    "drive",
    "get_solver",
    "invert",
    "list_solvers",
    "register",
    "resolve_seeds",
    "sample",
    "solver_info",
]
