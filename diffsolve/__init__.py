"""diffsolve: one registry of ODE/SDE solvers for diffusion and flow models, over one model interface."""

from . import (
    core,
    guidance,
    metrics,
    models,
    optimize,
    pretrained,
    quality,
    samplers,
    schedules,
    solvers,
)
from .models import DiffusionModel
from .optimize import OptimizedGrid, optimize_grid
from .samplers import Latent, SampleResult, UnstableError, get_solver, invert, list_solvers, sample

__version__ = "0.1.0"

__all__ = [
    "DiffusionModel",
    "Latent",
    "OptimizedGrid",
    "SampleResult",
    "UnstableError",
    "__version__",
    "core",
    "get_solver",
    "guidance",
    "invert",
    "list_solvers",
    "metrics",
    "models",
    "optimize",
    "optimize_grid",
    "pretrained",
    "quality",
    "sample",
    "samplers",
    "schedules",
    "solvers",
]
