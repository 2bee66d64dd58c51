"""The driver: pumps a solver's generator with model evaluations and returns a SampleResult."""

from __future__ import annotations

import math
import time
from typing import Any, Mapping, Sequence

import torch

from ..models.model import DiffusionModel, NFECounter, check_finite
from ..schedules.grids import GridSpec, make_grid
from .base import Outcome, Solver, as_query, sub
from .noise import NoiseSource
from .registry import get_solver, solver_info
from .result import SampleResult

Tensor = torch.Tensor

_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_solver(solver: str | Solver, options: Mapping[str, Any]) -> Solver:
    if isinstance(solver, Solver):
        if options:
            raise TypeError(f"solver options {sorted(options)} given with a solver instance; "
                            "pass a solver name instead, or build the instance with them")
        return solver
    return get_solver(solver, **options)


def _dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype in _DTYPES:
        return _DTYPES[dtype]
    raise ValueError(f"dtype {dtype!r} is unknown; allowed: {', '.join(_DTYPES)} or a torch.dtype")


def _check_shape(shape) -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in shape)
    except (TypeError, ValueError):
        raise TypeError(f"shape must be a tuple of positive ints (batch first), got {shape!r}") from None
    if len(shape) < 1 or any(s < 1 for s in shape):
        raise ValueError(f"shape must be a non-empty tuple of positive ints (batch first), got {shape}")
    return shape


def _check_batch(name: str, value, b: int, shape: tuple[int, ...] | None = None) -> None:
    if isinstance(value, Tensor) and value.ndim >= (len(shape) if shape else 1) and value.shape[0] not in (1, b):
        raise ValueError(f"{name} has batch size {value.shape[0]}, but the run has {b} samples")
    if shape is not None and isinstance(value, Tensor):
        try:
            torch.broadcast_shapes(value.shape, shape)
        except RuntimeError:
            raise ValueError(f"{name} of shape {tuple(value.shape)} does not broadcast to the samples' shape {shape}") from None


def _describe_t(t) -> str:
    if isinstance(t, Tensor) and t.ndim > 0:
        return f"t in [{float(t.min()):.6g}, {float(t.max()):.6g}]"
    return f"t={float(t):.6g}"


def sample(model: DiffusionModel, solver: str | Solver = "euler", steps: int | None = None, *,
           shape: Sequence[int] | None = None, x_T: Tensor | None = None,
           seed: int | Sequence[int] | None = None, generator: torch.Generator | Sequence[torch.Generator] | None = None,
           grid: GridSpec | None = None, t_max: float | None = None, t_min: float | None = None,
           mu: Tensor | None = None, cond: Mapping[str, Any] | None = None, noise: str | None = None,
           device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
           progress: bool | None = None, return_trajectory: bool = False,
           num_inference_steps: int | None = None, **solver_options: Any) -> SampleResult:
    """Sample from ``model`` with a registered solver.

    Parameters
    ----------
    model: the :class:`~diffsolve.DiffusionModel`.
    solver: a registered name (see :func:`list_solvers`) or a solver instance.
    steps: number of steps of the time grid (alias ``num_inference_steps``); adaptive solvers
        (``fixed_grid=False`` in the registry) need none: they run from t_max to t_min.
    shape: the batch shape to sample (batch first); or give ``x_T``, the starting state.
    seed: an int (sample i uses seed + i) or one seed per sample; ``generator``: a torch.Generator
        per sample (or one, for a batch of one). Same seed, device and dtype: the same samples,
        whatever the batch size.
    grid: a grid kind (``"uniform"``, ``"log-snr"``, ``"karras"``, ``"quadratic"``, ``"flow-shift"``)
        or an explicit descending list of times; default: the schedule's ``default_grid``.
    t_max, t_min: the time range (default: the schedule's).
    mu: the condition of mean-reverting schedules (x_T is drawn around it).
    cond: keyword arguments passed to the network on every call (class labels, embeddings, ...).
    noise: ``"gaussian"`` (fresh per-sample draws) or ``"brownian"`` (a per-sample Brownian tree);
        default: the solver's ``default_noise`` (gaussian, brownian for ``adaptive-sde``).
    device, dtype: where and in which precision to sample (default: x_T's, else cpu / float32).
    progress: show a progress bar (default: only when stderr is a terminal).
    return_trajectory: keep (t, x) of every model query.
    **solver_options: the solver's options, e.g. ``eta=1.0`` for ddim.
    """
    if not isinstance(model, DiffusionModel):
        raise TypeError(f"model must be a diffsolve.DiffusionModel, got {type(model).__name__}")
    if num_inference_steps is not None:
        if steps is not None and steps != num_inference_steps:
            raise ValueError("give steps or num_inference_steps, not both")
        steps = num_inference_steps
    slv = resolve_solver(solver, solver_options)
    try:
        info = solver_info(slv.name)
    except ValueError:  # an unregistered Solver subclass
        info = None
    fixed_grid = info.fixed_grid if info is not None else True
    noise = slv.default_noise if noise is None else noise
    schedule = model.schedule
    dtype = _dtype(dtype)

    if x_T is not None:
        if shape is not None and tuple(shape) != tuple(x_T.shape):
            raise ValueError(f"shape {tuple(shape)} does not match x_T's shape {tuple(x_T.shape)}")
        shape = _check_shape(x_T.shape)
        device = x_T.device if device is None else torch.device(device)
        dtype = x_T.dtype if dtype is None else dtype
    elif shape is None:
        raise ValueError("give shape (the batch shape to sample, batch first) or x_T (the starting state)")
    else:
        shape = _check_shape(shape)
        device = torch.device("cpu") if device is None else torch.device(device)
        dtype = torch.float32 if dtype is None else dtype
    b = shape[0]
    cond = dict(cond or {})
    for k, v in cond.items():
        _check_batch(f"cond[{k!r}]", v, b)
    if mu is not None:
        mu = torch.as_tensor(mu, device=device, dtype=dtype)
        _check_batch("mu", mu, b, shape)
        mu = mu.expand(shape)  # a view: per-sample rows for solvers that subset the batch

    if steps is None and (grid is None or isinstance(grid, str)):
        if fixed_grid:
            raise ValueError("steps is required (or pass an explicit grid of times)")
        steps = 1  # an adaptive solver only uses the grid's ends
    g = make_grid(schedule, steps, grid, t_max=t_max, t_min=t_min)

    if isinstance(generator, torch.Generator):
        generator = [generator]
    if generator is not None and seed is not None:
        raise ValueError("give seed or generator, not both")
    src = NoiseSource(shape, seeds=seed, generators=generator, device=device, dtype=dtype, kind=noise,
                      t_range=(float(g[-1]), float(g[0])))
    if x_T is None:
        x = schedule.prior(shape, mu, noise=src.randn(), t=float(g[0]))
    else:
        x = x_T.to(device=device, dtype=dtype)

    counter = NFECounter(b)
    trajectory: list | None = [] if return_trajectory else None
    n_steps = len(g) - 1
    total = n_steps * (info.calls_per_step if info is not None else 1) if fixed_grid else None
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=slv.name, unit="nfe", disable=None if progress is None else not progress, leave=False)
    start = time.perf_counter()
    run = slv.run(x, g, src, schedule=schedule, mu=mu)
    try:
        item = next(run)
        while True:
            q = as_query(item)
            if trajectory is not None:
                trajectory.append((q.t, q.x.detach().clone()))
            pred = model(q.x, q.t, mu=sub(mu, q.index), counter=counter, index=q.index,
                         **{k: sub(v, q.index) for k, v in cond.items()})
            step = q.step if q.step is not None else _step_of(g, q.t)
            of = f" of {n_steps}" if fixed_grid else ""
            check_finite(pred.output, f"solver {slv.name!r}, step {step}{of} ({_describe_t(q.t)}), "
                                      f"model call {counter.calls}")
            bar.update(1)
            item = run.send(pred)
    except StopIteration as stop:
        x = stop.value
    finally:
        bar.close()
        run.close()  # a run stopped by an error releases what it holds (e.g. a worker thread)
    out = x if isinstance(x, Outcome) else Outcome(x)
    x = out.x
    if not isinstance(x, Tensor):
        raise TypeError(f"solver {slv.name!r} returned {type(x).__name__}, expected a tensor")
    if trajectory is not None:
        trajectory.append((float(g[-1]), x.detach().clone()))
    wall = time.perf_counter() - start
    return SampleResult(samples=x, nfe=counter.calls, nfe_per_sample=counter.per_sample, grid=g, wall_time=wall,
                        solver=slv.name, options=slv.options(), seeds=src.seeds, accepted=out.accepted,
                        rejected=out.rejected, stats=dict(out.stats or {}), trajectory=trajectory)


def _step_of(grid: Tensor, t) -> int:
    """1-based index of the grid step a query time belongs to (for error messages)."""
    tv = float(t.max()) if isinstance(t, Tensor) and t.ndim > 0 else float(t)
    if math.isnan(tv):
        return 0
    return max(1, min(len(grid) - 1, int((grid > tv + 1e-12 * max(1.0, abs(tv))).sum()) + 1))
