"""The base of models that wrap another model: :class:`GuidedModel` (guidance, tuned calls)."""

from __future__ import annotations

import copy
from typing import Any

import torch

from .model import DiffusionModel

Tensor = torch.Tensor


class GuidedModel(DiffusionModel):
    """A DiffusionModel over another one (``inner``): same schedule, network, prediction, time input;
    subclasses override the call (this one calls the network as the inner model would)."""

    def __init__(self, model: DiffusionModel):
        if not isinstance(model, DiffusionModel):
            raise TypeError(f"model must be a diffsolve.DiffusionModel, got {type(model).__name__}")
        self.inner = model
        self.net, self.schedule, self.prediction, self.time_input = (
            model.net,
            model.schedule,
            model.prediction,
            model.time_input,
        )

    @property
    def nfe(self) -> int:
        """The wrapped model's network calls (a wrapper's calls are its inner model's)."""
        return self.inner.nfe

    @nfe.setter
    def nfe(self, value: int) -> None:
        self.inner.nfe = value

    @property
    def dtype(self) -> torch.dtype | None:
        return self.inner.dtype

    @property
    def device(self) -> torch.device | None:
        return self.inner.device

    @property
    def requires(self) -> tuple[str, ...]:
        """The inputs the wrapped network needs (see :class:`~diffsolve.DiffusionModel`)."""
        return self.inner.requires

    @requires.setter
    def requires(self, value: tuple[str, ...]) -> None:
        self.inner.requires = value

    def to(self, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None) -> GuidedModel:
        """Convert the wrapped model (:meth:`DiffusionModel.to`), in place; returns this wrapper."""
        self.inner.to(device=device, dtype=dtype)
        return self

    def compile(self, **options: Any) -> GuidedModel:
        """A copy of this wrapper over ``inner.compile(**options)`` (:meth:`DiffusionModel.compile`):
        the wrapped model's network is the one compiled, and the copy's count starts at 0."""
        twin = copy.copy(self)
        twin.inner = self.inner.compile(**options)
        twin.net = twin.inner.net
        return twin

    def check_solver(self, solver) -> None:
        """Raise if this wrapper (or a model it wraps) cannot be sampled with ``solver`` (a Solver);
        :func:`diffsolve.sample` and :func:`diffsolve.invert` ask before the run. Default: any solver."""
        self.inner.check_solver(solver)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.inner!r})"
