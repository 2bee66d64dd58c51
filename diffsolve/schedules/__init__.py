"""Forward processes and time grids (knows nothing of models).

Every schedule has the form x_t = alpha(t) x_0 + (1 - alpha(t)) mu + sigma(t) eps; see
:mod:`diffsolve.schedules.base`.
"""

from .base import Schedule
from .flow import RectifiedFlow
from .grids import (
    ALL_GRID_KINDS,
    GRID_KINDS,
    GRID_PARAMS,
    check_grid,
    grid_kind_name,
    grid_kind_params,
    is_grid_kind,
    make_grid,
)
from .mean_reverting import OUVE, MeanReverting
from .trigflow import TrigFlow
from .ve import EDM, VE
from .vp import SubVP, VPCosine, VPDiscrete, VPLinear

__all__ = [
    "ALL_GRID_KINDS",
    "EDM",
    "GRID_KINDS",
    "GRID_PARAMS",
    "OUVE",
    "VE",
    "MeanReverting",
    "RectifiedFlow",
    "Schedule",
    "SubVP",
    "TrigFlow",
    "VPCosine",
    "VPDiscrete",
    "VPLinear",
    "check_grid",
    "grid_kind_name",
    "grid_kind_params",
    "is_grid_kind",
    "make_grid",
]
