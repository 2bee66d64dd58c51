"""Exponential integrators: the shared maths (:mod:`.maths`: parameterisations, first-order and
multistep weights, phi functions, UniPC's B(h) and rho), DPM-Solver++ / MR Sampler multistep
(:mod:`.multistep`), the UniPC-type predictor-corrector (:mod:`.pc`), UniPC itself (:mod:`.unipc`), DEIS (:mod:`.deis`),
the adaptive log-SNR solvers (:mod:`.adaptive`) and the fixed-grid singlestep one (:mod:`.singlestep`)."""

from . import adaptive, deis, maths, multistep, pc, singlestep, unipc  # noqa: F401
from .adaptive import pilot_grid

__all__ = ["pilot_grid"]
