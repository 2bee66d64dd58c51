"""diffsolve: one registry of ODE/SDE solvers for diffusion and flow models, over one model interface."""

from . import (
    core,
    guidance,
    metrics,
    models,
    pretrained,
    quality,
    samplers,
    schedules,
    solvers,
)
from .models import DiffusionModel
from .samplers import Latent, SampleResult, UnstableError, get_solver, invert, list_solvers, sample

__version__ = "0.1.0"

__all__ = [
    "DiffusionModel",
    "Latent",
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
    "pretrained",
    "quality",
    "sample",
    "samplers",
    "schedules",
    "solvers",
]
