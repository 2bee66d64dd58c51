"""The step-hook protocol: hooks act on the state between solver steps and compose (a list runs in order).

Before a run the driver calls ``check(shape)`` (the samples' shape, batch first), where a hook may
refuse inputs that do not fit, naming them. Then it gives every hook three chances per run, through
a :class:`HookContext`:

    before(x, t, ctx) -> x        the state the model is about to see (the solver continues from it)
    after(pred, ctx) -> pred      the prediction the solver receives
    finish(x, ctx) -> x           the final samples

A hook may call the model itself (``ctx.call``: counted in the NFE, with the run's cond and mu) and
draw its own noise (``ctx.randn``: per-sample seeds derived from the run's, so results stay
independent of the batch size and the solver's own noise is untouched). Per-sample solvers query
some rows of the batch (``ctx.index``); a hook holding per-sample tensors takes their rows with
:func:`diffsolve.core.protocol.sub`. Concrete hooks live in :mod:`diffsolve.guidance`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..models.model import Prediction
from ..schedules.base import Schedule
from .noise import NoiseSource

Tensor = torch.Tensor


@dataclass
class HookContext:
    """What a hook may use at one model query."""

    schedule: Schedule
    grid: Tensor  # the run's time grid (descending)
    step: int  # 1-based grid step of the query
    index: Tensor | None  # the batch rows of the query (None: all)
    mu: Tensor | None
    call: Callable[..., Prediction]  # call(x, t) -> Prediction, counted, with the run's cond and mu
    noise: NoiseSource  # the hooks' own per-sample noise

    def randn(self) -> Tensor:
        return self.noise.randn(self.index)

    @property
    def t_next(self) -> float:
        return float(self.grid[min(self.step, len(self.grid) - 1)])


class StepHook:
    """Base class: every method passes its input through unchanged."""

    def check(self, shape: tuple[int, ...]) -> None:
        """Refuse (ValueError naming the argument) what cannot work on samples of ``shape``."""

    def before(self, x: Tensor, t, ctx: HookContext) -> Tensor:
        return x

    def after(self, pred: Prediction, ctx: HookContext) -> Prediction:
        return pred

    def finish(self, x: Tensor, ctx: HookContext) -> Tensor:
        return x

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def run_hooks(hooks, attr: str, value: Any, *args) -> Any:
    """Thread ``value`` through ``hook.<attr>`` of every hook, in order."""
    for h in hooks:
        value = getattr(h, attr)(value, *args)
    return value
