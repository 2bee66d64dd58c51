"""Exponential integrators: the shared maths (:mod:`.maths`: parameterisations, first-order and
multistep weights, phi functions, UniPC's B(h) and rho), DPM-Solver++ / MR Sampler multistep
(:mod:`.multistep`), the UniPC-type predictor-corrector (:mod:`.pc`), UniPC itself (:mod:`.unipc`),
DEIS (:mod:`.deis`), the adaptive log-SNR solvers (:mod:`.adaptive`), the fixed-grid singlestep one
(:mod:`.singlestep`), diffusers' grid-grouped singlestep DPM-Solver++ (:mod:`.grouped`), SA-Solver,
the stochastic Adams predictor-corrector (:mod:`.sa_solver`), and k-diffusion's DPM-Solver-fast /
adaptive (:mod:`.dpm`)."""

from . import adaptive, deis, dpm, grouped, maths, multistep, pc, sa_solver, singlestep, unipc  # noqa: F401
from .adaptive import pilot_grid

__all__ = ["pilot_grid"]
