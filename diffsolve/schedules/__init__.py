"""Forward processes and time grids (knows nothing of models).

Every schedule has the form x_t = alpha(t) x_0 + (1 - alpha(t)) mu + sigma(t) eps; see
:mod:`diffsolve.schedules.base`.
"""

from .base import Schedule
from .flow import RectifiedFlow
from .grids import GRID_KINDS, check_grid, make_grid
from .mean_reverting import OUVE, MeanReverting
from .ve import EDM, VE
from .vp import SubVP, VPCosine, VPDiscrete, VPLinear

__all__ = [
    "EDM",
    "GRID_KINDS",
    "OUVE",
    "VE",
    "MeanReverting",
    "RectifiedFlow",
    "Schedule",
    "SubVP",
    "VPCosine",
    "VPDiscrete",
    "VPLinear",
    "check_grid",
    "make_grid",
]
