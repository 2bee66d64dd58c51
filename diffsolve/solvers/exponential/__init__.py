"""Exponential integrators: DPM-Solver++ / MR Sampler multistep (:mod:`.multistep`), the UniPC-type
predictor-corrector (:mod:`.pc`), and the adaptive log-SNR solvers with the fixed-grid singlestep one
(:mod:`.adaptive`)."""

from . import adaptive, multistep, pc  # noqa: F401
from .adaptive import pilot_grid

__all__ = ["pilot_grid"]
