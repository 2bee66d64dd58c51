"""Exactly invertible solvers (:mod:`.solvers`)."""

from . import solvers  # noqa: F401
from .solvers import Reversible

__all__ = ["Reversible"]
