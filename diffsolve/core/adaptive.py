"""The one accept / reject loop of the error-controlled solvers.

The split follows diffrax's: a *solver* knows how to take one step and estimate its local error; a
*controller* (:class:`~diffsolve.core.control.StepSizeController`, which owns the tolerances) turns
the estimate into a scaled error norm, a decision and the next step size; and one loop, here, applies
them row by row. Gotta Go Fast (Jolicoeur-Martineau et al. 2021, ``adaptive-sde``) and the log-SNR
exponential integrators (``mrs-adaptive``, ``mrs-sde-adaptive``) all run in it.

A solver supplies its *tries* (:class:`Tries`): ``attempt(x, s, h, rows, it)``, a generator of model
queries like :meth:`Solver.run <diffsolve.core.protocol.Solver.run>`, steps the active ``rows``
(state ``x``, clock values ``s``, step sizes ``h``, iteration ``it``) and returns a :class:`Try`: the
lower- and higher-order solutions, the model time at the step's end and optionally its own error
estimate; ``commit(rows, ok, s_new)`` then tells it which rows were accepted, so that it updates the
per-row state it keeps (a multistep history, a cache of the model output at a rejected step's
start). The loop, per iteration, on the rows still running (all of them in ``mode="batch"``):

    try        (x_low, x_high, E) = attempt(x, s, h)                  E = x_high - x_low unless given
    norm       err = controller.error_norm(E, x_ref, x_low)            x_ref: the reference of the row's
                                                                       last accepted step (below)
               batch mode: err <- controller.pool(err) (the max or RMS over the batch: one step size)
    decide     ok, f = controller.decide(err, history)                 (ok: err <= controller.accept by default)
    advance    s <- s +- h where ok (onto the end itself when within ``snap`` of it)
    step size  h <- min(h * f, what is left of the clock)
    keep       x <- x_high, x_ref <- x_high (``reference="high"``) or x_low (``"low"``) where ok;
               a rejected row keeps its state (as the model saw it) and retries with the smaller h

and a row leaves the batch (``mode="per_sample"``: its later iterations cost no model rows) once its
clock reaches the end. With ``cap=False`` the loop carries the controller's proposal h * f as it is
and each try takes min(h, what is left of the clock) (k-diffusion's ``dpm_adaptive``: a rejected last
step then retries with its uncapped proposal times f). A step size below ``snap`` times the clock's span raises an error naming the
tolerances. The counts ``accepted`` / ``rejected`` and, when asked, each row's accepted times come back
in a :class:`LoopResult`.

:class:`AdaptiveSolver` is the base of the solvers that use the loop: their tolerance options
``rtol`` / ``atol`` (with any old names as aliases), ``mode``, ``h_init`` and ``controller``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Generator
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import torch

from ..models.model import Prediction
from .control import MODES, StepSizeController
from .options import Option
from .protocol import Query, Solver, per_row

Tensor = torch.Tensor

REFERENCES = ("high", "low")


class Try(NamedTuple):
    """What one try of the active rows returns (all in the state's coordinates, rows as given)."""

    x: Tensor  # the rows' state as the model saw it (a step hook may change it): kept on rejection
    low: Tensor  # the lower-order solution (the error norm's scale uses it)
    high: Tensor  # the higher-order solution: an accepted row continues from it
    end: Tensor  # the model time at the step's end, per row (the record of accepted times)
    error: Tensor | None = None  # the local error estimate; None: high - low


class Tries(Protocol):
    """A solver's side of :func:`adaptive_loop` (see the module docstring)."""

    def attempt(self, x: Tensor, s: Tensor, h: Tensor, rows: Tensor, it: int) -> Generator[Query, Prediction, Try]: ...

    def commit(self, rows: Tensor, ok: Tensor, s_new: Tensor) -> None: ...


@dataclass(frozen=True)
class Clock:
    """The variable the loop steps in, from ``start`` to ``end``: time itself going down
    (``descending=True``: Gotta Go Fast) or the log-SNR going up (the exponential integrators), so
    that a step of size h > 0 goes from s to s - h or s + h. ``label`` names it in messages;
    ``times``: the model times (t_start, t_end) at both ends, given when the loop should record each
    row's accepted times. The direction is the solver's, not the ends': on a grid that runs the other
    way the end is already behind every row and the loop takes no step."""

    start: float
    end: float
    descending: bool = False
    label: str = "t ="
    times: tuple[float, float] | None = None

    @property
    def span(self) -> float:
        """How far the clock has to go (a Python float)."""
        return self.start - self.end if self.descending else self.end - self.start

    def active(self, s: Tensor) -> Tensor:
        """Which rows have not reached the end."""
        return s > self.end if self.descending else s < self.end

    def remaining(self, s: Tensor) -> Tensor:
        """What is left of the clock for each row."""
        return s - self.end if self.descending else self.end - s

    def advance(self, s: Tensor, h: Tensor) -> Tensor:
        return s - h if self.descending else s + h

    def laggard(self, s: Tensor) -> float:
        """The value of the row furthest from the end."""
        return float(s.max() if self.descending else s.min())


class LoopResult(NamedTuple):
    """What :func:`adaptive_loop` returns: the states, each row's accepted and rejected tries, the
    number of iterations (the step number of the last query) and, when the clock has ``times``, each
    row's accepted times (its start time first)."""

    x: Tensor
    accepted: Tensor
    rejected: Tensor
    iterations: int
    grids: list[list[float]] | None = None


def adaptive_loop(
    tries: Tries,
    x: Tensor,
    clock: Clock,
    controller: StepSizeController,
    *,
    h_init: float,
    mode: str,
    name: str,
    snap: float,
    reference: str = "high",
    cap: bool = True,
) -> Generator[Query, Prediction, LoopResult]:
    """Step every row of ``x`` from ``clock.start`` to ``clock.end`` with ``tries`` under
    ``controller`` (which must hold ``rtol`` and ``atol``): the module docstring's loop. ``h_init``:
    the first step size (at most the clock's span); ``mode``: ``"per_sample"`` or ``"batch"``;
    ``name``: the solver's, for messages; ``snap``: the fraction of the span within which a step
    lands on the end, and below which a step size is an underflow; ``reference``: which solution of
    an accepted step scales the next step's error norm (``"high"``: the state the row continues
    from; ``"low"``: Gotta Go Fast's x'_prev); ``cap``: whether the carried step size is capped by
    what is left of the clock (the module docstring)."""
    if reference not in REFERENCES:
        raise ValueError(f"reference must be one of {', '.join(REFERENCES)}, got {reference!r}")
    if controller.rtol is None or controller.atol is None:
        raise ValueError(f"{name}: the controller of the adaptive loop needs rtol and atol")
    b, dev, f64 = x.shape[0], x.device, torch.float64
    span = clock.span
    s = torch.full((b,), clock.start, dtype=f64, device=dev)
    h = torch.full((b,), min(h_init, span) if cap else h_init, dtype=f64, device=dev)
    x_ref = x.clone()
    err_hist = controller.fresh_history(b, dev)
    accepted = torch.zeros(b, dtype=torch.long, device=dev)
    rejected = torch.zeros(b, dtype=torch.long, device=dev)
    times = clock.times
    grids = None if times is None else [[times[0]] for _ in range(b)]
    tiny = snap * span
    it = 0

    # per_sample: the unfinished rows step on their own; batch: every row, one shared error norm
    # (so all rows keep one clock value and one step size and finish together)
    while bool(clock.active(s).any()):
        it += 1
        rows = clock.active(s).nonzero().squeeze(1)
        sr, hp = s[rows], h[rows]
        hr = hp if cap else torch.minimum(hp, clock.remaining(sr))  # the step this try takes
        if bool((hr < tiny).any()):
            raise RuntimeError(
                f"{name}: the step size underflowed at {clock.label} {clock.laggard(sr):.6g} "
                f"(rtol={controller.rtol}, atol={controller.atol}); loosen the tolerances"
            )
        step = yield from tries.attempt(x[rows], sr, hr, rows, it)
        xr, xp = step.x, x_ref[rows]
        error = step.high - step.low if step.error is None else step.error
        err = controller.error_norm(error, xp, step.low)
        if mode == "batch":
            err = controller.pool(err)
        ok, f = controller.decide(err, err_hist[rows])
        last = hr >= clock.remaining(sr) - tiny
        s_new = torch.where(ok, torch.where(last, torch.full_like(sr, clock.end), clock.advance(sr, hr)), sr)
        h_new = torch.minimum(hr * f, clock.remaining(s_new)) if cap else hp * f
        h_new = torch.where(clock.active(s_new), h_new, hp)  # a finished row keeps its last h
        okx = per_row(ok, xr).bool()
        x = x.index_copy(0, rows, torch.where(okx, step.high, xr))
        x_ref = x_ref.index_copy(0, rows, torch.where(okx, step.high if reference == "high" else step.low, xp))
        err_hist = err_hist.index_copy(0, rows, controller.push(err_hist[rows], err, ok))
        s, h = s.index_copy(0, rows, s_new), h.index_copy(0, rows, h_new)
        accepted[rows] += ok.long()
        rejected[rows] += (~ok).long()
        tries.commit(rows, ok, s_new)
        if grids is not None and times is not None:
            t_acc = torch.where(last, torch.full_like(step.end, times[1]), step.end)
            for j, i in enumerate(rows.tolist()):
                if bool(ok[j]):
                    grids[i].append(float(t_acc[j]))
    return LoopResult(x, accepted, rejected, it, grids)


class AdaptiveSolver(Solver):
    """Base of the solvers that run in :func:`adaptive_loop`: the options ``rtol``, ``atol``,
    ``h_init``, ``mode`` and ``controller`` (a subclass declares them again for its own defaults).

    The tolerances belong to the controller: the solver hands the loop its controller with ``rtol``
    and ``atol`` filled in, each taken from, in this order,
      1. the solver's option (``rtol`` / ``atol``, or an alias of it) when given;
      2. the ``controller``'s own ``rtol`` / ``atol`` when it has them (not None);
      3. the solver's default.
    So explicit options override a controller's tolerances. The ``controller`` option is the
    solver's default controller (:meth:`default_controller`) when none is given; ``rtol`` and
    ``atol`` are the tolerances in use.
    """

    rtol = Option(0.01, "the relative tolerance of the error norm", low=0.0, low_open=True)
    atol = Option(0.0078, "the absolute tolerance of the error norm", low=0.0, low_open=True)
    h_init = Option(0.01, "the first step size, in the solver's clock", low=0.0, low_open=True)
    mode = Option(
        "per_sample",
        "'per_sample': each row has its own time and step size (a finished row leaves "
        "the batch); 'batch': one step size, accepted when every row's error norm is <= 1",
        choices=MODES,
    )
    controller: Option[Any] = Option(
        None,
        "the step-size controller (default: the solver's own)",
        types=(StepSizeController,),
        what="a StepSizeController",
    )

    def default_controller(self) -> StepSizeController:
        """The controller used when none is given."""
        return StepSizeController()

    def check_options(self) -> None:
        if self.controller is None:
            self.controller = self.default_controller()
        for k in ("rtol", "atol"):
            if k not in self.given and getattr(self.controller, k) is not None:
                setattr(self, k, float(getattr(self.controller, k)))
        self._control = dataclasses.replace(self.controller, rtol=self.rtol, atol=self.atol)

    def _loop(
        self, tries: Tries, x: Tensor, clock: Clock, *, snap: float, reference: str = "high", cap: bool = True
    ) -> Generator[Query, Prediction, LoopResult]:
        """:func:`adaptive_loop` with this solver's controller, h_init, mode and name."""
        return adaptive_loop(
            tries,
            x,
            clock,
            self._control,
            h_init=self.h_init,
            mode=self.mode,
            name=self.name,
            snap=snap,
            reference=reference,
            cap=cap,
        )
