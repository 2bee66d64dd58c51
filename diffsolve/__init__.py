"""diffsolve: one registry of ODE/SDE solvers for diffusion and flow models, over one model interface."""

from . import core, metrics, models, pretrained, quality, samplers, schedules, solvers
from .models import DiffusionModel
from .samplers import Latent, SampleResult, UnstableError, get_solver, invert, list_solvers, sample
from . import guidance  # noqa: E402  (imports samplers)

__version__ = "0.1.0"

__all__ = ["sample", "invert", "Latent", "get_solver", "list_solvers", "DiffusionModel", "SampleResult", "UnstableError", "schedules", "models", "guidance",
           "samplers", "core", "solvers", "pretrained", "quality", "metrics", "__version__"]
