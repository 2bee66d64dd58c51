"""Adaptive-step solvers: Gotta Go Fast (:mod:`.ggf`) and the black-box RK45 integrators of torchdiffeq
and scipy (:mod:`.blackbox`)."""

from . import blackbox, ggf  # noqa: F401
