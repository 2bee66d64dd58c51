"""The solver protocol.

A solver is a small object holding its hyperparameters. Its ``run`` is a generator that yields model
queries and receives predictions; the driver (or the diffusers scheduler adapter) answers them:

    def run(self, x, grid, noise, *, schedule, mu=None):
        for i in range(len(grid) - 1):
            pred = yield x, grid[i]          # the driver evaluates the model there
            x = <update from pred.x, pred.x0, pred.eps, pred.velocity ...>
        return x

A query is ``(x, t)`` or a :class:`Query` (which may also name the active rows ``index`` for
per-sample solvers, and the grid ``step`` for error messages). What comes back is a
:class:`~diffsolve.models.Prediction`; its ``pred.x`` is the state the model actually saw (a step
hook may have changed it) and the solver continues from that. Solvers keep no state between runs.
"""

from __future__ import annotations

import inspect
from typing import Any, Generator, NamedTuple

import torch

from ..models.model import Prediction
from ..schedules.base import Schedule
from .noise import NoiseSource

Tensor = torch.Tensor


class Query(NamedTuple):
    """A request to evaluate the model at (x, t). ``index``: the batch rows x holds (None: all)."""

    x: Tensor
    t: Any
    index: Tensor | None = None
    step: int | None = None


class Outcome(NamedTuple):
    """What a solver may return instead of a bare tensor: the samples plus per-sample step counts
    (adaptive solvers) and any other statistics of the run (``stats``, copied into the result)."""

    x: Tensor
    accepted: Tensor | None = None
    rejected: Tensor | None = None
    stats: dict | None = None


Run = Generator["Query | tuple[Tensor, Any]", Prediction, "Tensor | Outcome"]


class Solver:
    """Base class of every registered solver (see the module docstring for the protocol)."""

    name: str = "solver"
    default_noise: str = "gaussian"  # the driver's noise kind when the caller names none
    #: True for solvers whose step is alpha' x0 + sigma' eps (+ noise) with the prediction's own x0 and
    #: eps, so a pair that is not consistent with x (``Prediction.from_pair``: CFG++) is stepped as given
    steps_with_pair: bool = False
    #: whether ``run`` also steps on an ascending grid (from t_min to t_max): what
    #: :func:`diffsolve.invert` does with a deterministic solver that has no ``run_inverse``. False
    #: for solvers whose loop only goes down in time (an adaptive one that steps until it reaches
    #: the grid's lower end); ``invert`` refuses those, naming them.
    runs_backward: bool = True

    def run(self, x: Tensor, grid: Tensor, noise: NoiseSource, *, schedule: Schedule,
            mu: Tensor | None = None) -> Run:
        raise NotImplementedError

    def replace_ends(self, schedule: Schedule, t_max: float, t_min: float) -> dict[str, float]:
        """Of a run's ends ``t_max`` and ``t_min``, those this solver cannot reach (a singular end of its
        variables), with the ends it takes instead: ``{"t_max": ...}`` and / or ``{"t_min": ...}``. The
        driver and the diffusers scheduler use them, and say so, where the caller gives neither that
        end nor an explicit grid. Default: none."""
        return {}

    def noise_options(self) -> dict[str, Any]:
        """The options that make this instance draw noise although its registry entry is deterministic
        (ddim's ``eta`` > 0, heun's ``s_churn`` > 0); empty when it is deterministic as built.
        :func:`diffsolve.invert` refuses a solver that draws noise, naming them."""
        return {}

    def options(self) -> dict[str, Any]:
        """The hyperparameters this solver was built with."""
        sig = inspect.signature(type(self).__init__)
        return {k: getattr(self, k) for k in sig.parameters if k != "self" and hasattr(self, k)}

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"{type(self).__name__}[{self.name}]({opts})"


def as_query(item) -> Query:
    if isinstance(item, Query):
        return item
    if isinstance(item, tuple) and len(item) == 2:
        return Query(item[0], item[1])
    raise TypeError(f"a solver must yield (x, t) or a Query, got {type(item).__name__}")


def sub(mu: Tensor | float | None, index: Tensor | None, ndim: int | None = None):
    """Rows ``index`` (a query's rows in the full batch; None: all) of a per-sample tensor (mu, a
    condition, a measurement, a mask): the one helper with which the driver, the guidance wrappers and
    the step hooks subset what they hold to the rows they are given. Scalars, None and tensors with
    batch size 1 pass through; with ``ndim`` (the state's), so does a tensor of fewer dimensions,
    which broadcasts against every row (e.g. one [H, W] mask for a [B, C, H, W] batch)."""
    if index is None or not isinstance(mu, Tensor) or mu.ndim == 0 or mu.shape[0] == 1:
        return mu
    if ndim is not None and mu.ndim < ndim:
        return mu
    return mu[index]


def col(v, like: Tensor) -> Tensor:
    """A per-row [R] (or scalar) value as a tensor in ``like``'s dtype and device, shaped to broadcast
    against it ([R, 1, ..., 1])."""
    v = torch.as_tensor(v).to(device=like.device, dtype=like.dtype)
    return v.reshape(-1, *([1] * (like.ndim - 1))) if v.ndim else v


def check_batch(name: str, value, b: int, shape: tuple[int, ...] | None = None) -> None:
    """Refuse a per-sample tensor ``value`` (named ``name`` in the message) whose batch is neither 1 nor
    the run's ``b`` or, given the samples' ``shape``, that does not broadcast to it (non-tensors pass)."""
    if isinstance(value, Tensor) and value.ndim >= (len(shape) if shape else 1) and value.shape[0] not in (1, b):
        raise ValueError(f"{name} has batch size {value.shape[0]}, but the run has {b} samples")
    if shape is not None and isinstance(value, Tensor):
        try:
            torch.broadcast_shapes(value.shape, shape)
        except RuntimeError:
            raise ValueError(f"{name} of shape {tuple(value.shape)} does not broadcast to the samples' shape {shape}") from None
