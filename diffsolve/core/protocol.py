"""The solver protocol.

A solver is a small object holding its hyperparameters. Its ``run`` is a generator that yields model
queries and receives predictions; the driver (or the diffusers scheduler adapter) answers them:

    def run(self, x, grid, noise, *, schedule, mu=None):
        for i in range(len(grid) - 1):
            pred = yield x, grid[i]          # the driver evaluates the model there
            x = <update from pred.x, pred.x0, pred.eps, pred.velocity ...>
        return x

A query is ``(x, t)`` or a :class:`Query` (which may also name the active ``rows`` for
per-sample solvers, and the grid ``step`` for error messages). What comes back is a
:class:`~diffsolve.models.Prediction`; its ``pred.x`` is the state the model actually saw (a step
hook may have changed it) and the solver continues from that. Solvers keep no state between runs.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Generator, Mapping
from typing import Any, NamedTuple, TypeVar

import torch

from ..models.model import Prediction
from ..schedules.base import Schedule
from .noise import NoiseSource
from .options import declared, resolve

Tensor = torch.Tensor


class Query(NamedTuple):
    """A request to evaluate the model at (x, t). ``rows``: the batch rows x holds (None: all)."""

    x: Tensor
    t: Any
    rows: Tensor | None = None
    step: int | None = None


class Outcome(NamedTuple):
    """What a solver may return instead of a bare tensor: the samples plus per-sample step counts
    (adaptive solvers) and any other statistics of the run (``stats``, copied into the result)."""

    x: Tensor
    accepted: Tensor | None = None
    rejected: Tensor | None = None
    stats: dict | None = None


R = TypeVar("R")
Run = Generator["Query | tuple[Tensor, Any]", Prediction, "Tensor | Outcome"]


class Solver:
    """Base class of every registered solver (see the module docstring for the protocol)."""

    name: str = "solver"
    default_noise: str = "gaussian"  # the driver's noise kind when the caller names none
    #: True for solvers that step with the prediction's x0 and eps as separate terms (alpha' x0 +
    #: sigma' eps + ..., from ``Prediction.pair_x`` rather than x), so a pair that is not consistent
    #: with x (``Prediction.from_pair``: CFG++) is stepped as given; may be a property of the options
    steps_with_pair: bool = False
    #: set by the registry on a solver got by a CFG++ name (``euler-cfg-pp``, ComfyUI's
    #: ``euler_cfg_pp``): the run needs CFG++ (``DiffusionModel.for_solver``)
    cfg_pp: bool = False
    #: whether ``run`` also steps on an ascending grid (from t_min to t_max): what the default
    #: :meth:`run_inverse` (and so :func:`diffsolve.invert`) does. False
    #: for solvers whose loop only goes down in time (an adaptive one that steps until it reaches
    #: the grid's lower end); ``invert`` refuses those, naming them.
    runs_backward: bool = True
    #: why the steps cannot run backwards where :attr:`runs_backward` is False (``invert`` says it)
    backward_refusal: str = (
        "its steps only run down in time, from t_max to t_min, not on the ascending grid an inversion runs"
    )

    def __init__(self, **options: Any):
        """Takes the options the class declares (:class:`~diffsolve.core.options.Option` class
        attributes), each checked, converted and set as an attribute (``given``: the names of those
        the caller gave); then :meth:`check_options`."""
        values, self.given = resolve(type(self), self.name, options)
        for k, v in values.items():
            setattr(self, k, v)
        self.check_options()

    def check_options(self) -> None:
        """Checks that involve several options, and what the options imply (override; default none)."""

    def run(self, x: Tensor, grid: Tensor, noise: NoiseSource, *, schedule: Schedule, mu: Tensor | None = None) -> Run:
        raise NotImplementedError

    def run_inverse(
        self, x: Tensor, grid: Tensor, noise: NoiseSource, *, schedule: Schedule, mu: Tensor | None = None
    ) -> Run:
        """Map data ``x`` at grid[-1] to grid[0] (``grid`` descending, as :meth:`run`'s), what
        :func:`diffsolve.invert` runs. Default: :meth:`run` on the ascending grid (DDIM inversion for
        ``ddim``), for solvers whose steps run backwards (:attr:`runs_backward`). Reversible solvers
        override it with their exact inverse, ``ddim`` with ReNoise's refinement when asked."""
        return self.run(x, grid.flip(0), noise, schedule=schedule, mu=mu)

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
        specs = declared(type(self))
        if specs or type(self).__init__ is Solver.__init__:  # declared options (none: {})
            return {k: getattr(self, k) for k, s in specs.items() if s.alias_of is None}
        sig = inspect.signature(type(self).__init__)  # a solver with an __init__ of its own
        return {k: getattr(self, k) for k in sig.parameters if k != "self" and hasattr(self, k)}

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"{type(self).__name__}[{self.name}]({opts})"


class ExactInverse(Solver):
    """The protocol of a solver with an exact inverse step, which the reversible adjoint
    (``ds.sample(..., grad=True)``, :mod:`diffsolve.core.adjoint`) needs. A run is a map between
    states S_0 (the noise end) and S_m (the data end), each a tuple of tensors, in a frame (the
    grid in the solver's own variables) that ``frame`` builds; every method but ``frame``, ``n_steps``
    and ``sample_of`` is a generator of model queries, as :meth:`Solver.run`:

    - ``start(frame, x, aux)``: S_0 from the starting sample (and a latent's second state);
    - ``step(frame, S_k, k)`` -> S_{k+1} and ``unstep(frame, S_{k+1}, k)`` -> S_k, its exact inverse;
    - ``sample_of(frame, S_m)``: the samples.
    """

    def frame(self, grid: Tensor, schedule: Schedule, mu: Tensor | None) -> Any:
        raise NotImplementedError

    def n_steps(self, frame: Any) -> int:
        raise NotImplementedError

    def start(self, frame: Any, x: Tensor, aux: Tensor | None) -> Generator[Any, Prediction, tuple[Tensor, ...]]:
        raise NotImplementedError

    def step(self, frame: Any, state: tuple[Tensor, ...], k: int) -> Generator[Any, Prediction, tuple[Tensor, ...]]:
        raise NotImplementedError

    def unstep(self, frame: Any, state: tuple[Tensor, ...], k: int) -> Generator[Any, Prediction, tuple[Tensor, ...]]:
        raise NotImplementedError

    def sample_of(self, frame: Any, state: tuple[Tensor, ...]) -> Tensor:
        raise NotImplementedError


class UnstableError(RuntimeError):
    """A run whose scheme went unstable, so that its samples would be noise: raised instead of
    returning them, naming the solver, the step and the remedy (a reversible scheme's parasitic mode:
    :mod:`diffsolve.solvers.reversible`)."""


def as_query(item) -> Query:
    if isinstance(item, Query):
        return item
    if isinstance(item, tuple) and len(item) == 2:
        return Query(item[0], item[1])
    raise TypeError(f"a solver must yield (x, t) or a Query, got {type(item).__name__}")


def take_rows(mu: Any, index: Tensor | None, ndim: int | None = None) -> Any:
    """Rows ``index`` (a query's rows in the full batch; None: all) of a per-sample tensor (mu, a
    condition, a measurement, a mask): the one helper with which the driver, the guidance wrappers and
    the step hooks subset what they hold to the rows they are given. Scalars, None and tensors with
    batch size 1 pass through; with ``ndim`` (the state's), so does a tensor of fewer dimensions,
    which broadcasts against every row (e.g. one [H, W] mask for a [B, C, H, W] batch)."""
    if isinstance(mu, Mapping):  # a dict of them (classifier-free guidance's ``uncond``)
        return {k: take_rows(v, index, ndim) for k, v in mu.items()}
    if index is None or not isinstance(mu, Tensor) or mu.ndim == 0 or mu.shape[0] == 1:
        return mu
    if ndim is not None and mu.ndim < ndim:
        return mu
    return mu[index]


def per_row(v: Any, like: Tensor) -> Tensor:
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
            raise ValueError(
                f"{name} of shape {tuple(value.shape)} does not broadcast to the samples' shape {shape}"
            ) from None


def as_outcome(value: Any, solver: str) -> Outcome:
    """A run's return value as an :class:`Outcome` (a solver may return a bare tensor)."""
    out = value if isinstance(value, Outcome) else Outcome(value)
    if not isinstance(out.x, Tensor):
        raise TypeError(f"solver {solver!r} returned {type(out.x).__name__}, expected a tensor")
    return out


class Pump:
    """Steps a solver's generator one model answer at a time: the one place a run's queries are read
    and its answers sent. ``query`` is the pending :class:`Query` (None once the run has ended, when
    ``value`` holds what it returned). The driver, the adjoint, dmcmc's sub-runs and the diffusers
    scheduler (which gets one answer per ``step`` call) all use it; :func:`drive` is its loop."""

    def __init__(self, run: Generator[Any, Prediction, Any]):
        self.run = run
        self.query: Query | None = None
        self.value: Any = None
        self._advance(None)

    def _advance(self, answer: Prediction | None) -> None:
        try:
            item = next(self.run) if answer is None else self.run.send(answer)
        except StopIteration as stop:
            self.query, self.value = None, stop.value
        else:
            self.query = as_query(item)

    def answer(self, pred: Prediction) -> None:
        """Send the model's answer to the pending query; the run moves on to its next query or ends."""
        if self.query is None:
            raise RuntimeError("the run has ended; there is no query to answer")
        self._advance(pred)

    @property
    def done(self) -> bool:
        return self.query is None

    def close(self) -> None:
        """Stop the run (a run stopped by an error releases what it holds, e.g. a worker thread)."""
        self.run.close()


def drive(run: Generator[Any, Prediction, R], call: Callable[[Query], Prediction]) -> R:
    """Run a solver's generator to its end, answering each query with ``call(query)``; returns what
    the generator returns."""
    pump = Pump(run)
    try:
        while pump.query is not None:
            pump.answer(call(pump.query))
    finally:
        pump.close()
    return pump.value
