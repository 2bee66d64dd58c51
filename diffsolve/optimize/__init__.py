"""Grids optimised per model and solver (:func:`optimize_grid`) and their saved form (:class:`OptimizedGrid`)."""

from ..schedules.optimized import OptimizedGrid, as_optimized_grid, is_grid_file, model_identity
from .search import optimize_grid

__all__ = ["OptimizedGrid", "as_optimized_grid", "is_grid_file", "model_identity", "optimize_grid"]
