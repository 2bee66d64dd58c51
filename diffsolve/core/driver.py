"""The driver: pumps a solver's generator with model evaluations and returns a SampleResult."""

from __future__ import annotations

import math
import operator
import time
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ..models.gaussian import Gaussian
from ..models.model import (
    DiffusionModel,
    FiniteGuard,
    NFECounter,
    as_dtype,
    same_device,
)
from ..models.tuned import TunedCalls
from ..schedules.base import check_range
from ..schedules.grids import GridSpec, is_grid_kind, make_grid
from ..schedules.optimized import OptimizedGrid, as_optimized_grid, is_grid_file
from .adjoint import require_reversible, reversible_sample
from .blocks import check_row_block, count_back, in_row_blocks
from .continuous_adjoint import adjoint_sample
from .hooks import HookContext, StepHook, run_hooks
from .noise import NoiseSource
from .protocol import Outcome, Pump, Solver, as_outcome, check_batch, take_rows
from .registry import get_solver, registered, solver_info
from .result import Latent, SampleResult

Tensor = torch.Tensor


def resolve_solver(solver: str | Solver, options: Mapping[str, Any]) -> Solver:
    if isinstance(solver, Solver):
        if options:
            raise TypeError(
                f"solver options {sorted(options)} given with a solver instance; "
                "pass a solver name instead, or build the instance with them"
            )
        return solver
    return get_solver(solver, **options)


_HALF = (torch.float16, torch.bfloat16)


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """The precision of a run's state and solver arithmetic for the run's ``dtype``: float32 for the
    half types (the network alone runs in half precision, as diffusers' schedulers upcast the
    sample in ``step``), else ``dtype`` itself."""
    return torch.float32 if dtype in _HALF else dtype


def _run_dtype(model: DiffusionModel, dtype, like: Tensor | None, name: str) -> torch.dtype:
    """The run's dtype: ``dtype``, else ``like``'s (x_T, x0), else the network's, else torch's default.
    Refuses one the network's weights are not in (``name`` says where the dtype came from)."""
    net = model.dtype
    if dtype is not None:
        dtype, source = as_dtype(dtype), "dtype"
    elif like is not None:
        dtype, source = as_dtype(like.dtype, name), name
    else:
        dtype, source = (
            (net, "the network's dtype") if net is not None else (torch.get_default_dtype(), "default dtype")
        )
        dtype = as_dtype(dtype, source)
    if net is not None and net != dtype:
        raise ValueError(
            f"dtype: the run's dtype is {dtype} ({source}) but the network's weights are {net}; "
            f"pass dtype={net}, or convert the model first: model.to(dtype={dtype}) "
            f"(ds.pretrained.load(name, dtype={dtype}) loads it so)"
        )
    return dtype


def _run_device(model: DiffusionModel, device, like: Tensor | None, name: str) -> torch.device:
    """The run's device: ``device``, else ``like``'s (x_T, x0), else the network's, else torch's
    default. Refuses one the network is not on (``name`` says where the device came from)."""
    net = model.device
    if device is not None:
        try:
            device, source = torch.device(device), "device"
        except (RuntimeError, TypeError):
            raise ValueError(f"device {device!r} is not a torch device (e.g. 'cpu', 'cuda', 'cuda:1')") from None
    elif like is not None:
        device, source = like.device, name
    else:
        device, source = (
            (net, "the network's device") if net is not None else (torch.get_default_device(), "default device")
        )
    if net is not None and not same_device(net, device):
        raise ValueError(
            f"device: the run's device is {device} ({source}) but the network is on {net}; "
            f"pass device={str(net)!r}, or move the model first: model.to({str(device)!r})"
        )
    return device


def _state_arg(value, name: str) -> tuple[Tensor, Tensor | None]:
    """A state argument (x_T, x0) as a tensor, and the tensor whose dtype and device the run follows
    (None for a numpy array: it is converted to the run's, its float64 default chooses nothing)."""
    if isinstance(value, Tensor):
        return value, value
    if isinstance(value, np.ndarray):
        return torch.as_tensor(value), None
    raise TypeError(f"{name} must be a torch.Tensor or a numpy array (batch first), got {type(value).__name__}")


def _check_shape(shape) -> tuple[int, ...]:
    """``shape`` as a tuple of positive ints (batch first); numpy ints and 0-d integer tensors count."""
    what = "shape must be a tuple of positive ints (batch first)"
    try:
        if isinstance(shape, (str, bytes)) or any(isinstance(s, bool) for s in shape):
            raise TypeError
        dims = tuple(operator.index(s) for s in shape)  # no floats: 1.5 is no size
    except TypeError:
        raise TypeError(f"{what}, got {shape!r}") from None
    if len(dims) < 1 or any(s < 1 for s in dims):
        raise ValueError(f"{what}, got {dims}")
    return dims


def _describe_t(t) -> str:
    if isinstance(t, Tensor) and t.ndim > 0:
        return f"t in [{float(t.min()):.6g}, {float(t.max()):.6g}]"
    return f"t={float(t):.6g}"


def sample(
    model: DiffusionModel,
    solver: str | Solver = "euler",
    steps: int | None = None,
    *,
    shape: Sequence[int] | None = None,
    x_T: Tensor | None = None,
    seed: int | Sequence[int] | None = None,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    grid: GridSpec | OptimizedGrid | None = None,
    t_max: float | None = None,
    t_min: float | None = None,
    mu: Tensor | None = None,
    cond: Mapping[str, Any] | None = None,
    noise: str | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    progress: bool | None = None,
    return_trajectory: bool = False,
    num_inference_steps: int | None = None,
    latent: Latent | None = None,
    grad: bool | str = False,
    uncond: Mapping[str, Any] | None = None,
    hooks: Sequence[StepHook] | None = None,
    row_block: int | None = None,
    teleport: Gaussian | None = None,
    **solver_options: Any,
) -> SampleResult:
    """Sample from ``model`` with a registered solver.

    Parameters
    ----------
    model: the :class:`~diffsolve.DiffusionModel`.
    solver: a registered name (see :func:`list_solvers`) or a solver instance.
    steps: number of steps of the time grid (alias ``num_inference_steps``); adaptive solvers
        (``fixed_grid=False`` in the registry) need none: they run from t_max to t_min.
    shape: the batch shape to sample (batch first); or give ``x_T``, the starting state (a tensor, or
        a numpy array, which is converted to the run's dtype and device).
    seed: an int (sample i uses seed + i) or one seed per sample (Python or numpy integers; floats
        are refused); ``generator``: a torch.Generator
        per sample (or one, for a batch of one). Same seed, device and dtype: the same samples,
        whatever the batch size, bitwise where the network's output for a row does not depend on
        the other rows it is called with (the oracles; any network with ``row_block``).
    grid: a grid kind (``"uniform"``, ``"log-snr"``, ``"karras"``, ... :data:`~diffsolve.schedules.ALL_GRID_KINDS`),
        a kind with its parameters (``("karras", {"rho": 5})``, see :func:`~diffsolve.schedules.make_grid`),
        an :class:`~diffsolve.optimize.OptimizedGrid` from :func:`diffsolve.optimize_grid` or the path
        of its .json file (its times, and its solver options when ``solver`` is the one it was fitted
        for and no options are given; a warning if used with another solver or model)
        or an explicit descending list of times in the schedule's :attr:`~Schedule.time_range`
        (diffusers' integer timesteps are refused: convert them, or use ``DiffsolveScheduler``);
        default: the schedule's ``default_grid``.
    t_max, t_min: the time range (default: the schedule's).
    mu: the condition of mean-reverting schedules (x_T is drawn around it).
    cond: keyword arguments passed to the network on every call (class labels, embeddings, ...).
        A run without an input the model needs (:attr:`DiffusionModel.requires`: digits-mr's ``mu``,
        digits-vp-cond's ``class_labels``) is refused before the first call.
    uncond: the unconditional call's keyword arguments, for a classifier-free guided model
        (:class:`diffsolve.guidance.ClassifierFreeGuidance`); overrides the wrapper's own.
    hooks: step hooks (:mod:`diffsolve.guidance`: ``Inpaint``, ``Threshold``, ``EnKG``, or any
        :class:`~diffsolve.core.hooks.StepHook`), run in order around every model call.
    noise: ``"gaussian"`` (fresh per-sample draws) or ``"brownian"`` (a per-sample Brownian tree);
        default: the solver's ``default_noise`` (gaussian, brownian for ``adaptive-sde``).
    device, dtype: where and in which precision to sample (default: x_T's, else the network's when
        the model knows it (:attr:`DiffusionModel.dtype`, :attr:`DiffusionModel.device`), else torch's
        default device and dtype). They must be the network's: another is refused, naming ``dtype`` or
        ``device`` (convert the model with :meth:`DiffusionModel.to`); x_T is converted to them when
        they are given. For ``float16`` and ``bfloat16``
        the state and the solver's arithmetic stay in float32 (the network's inputs are cast to
        ``dtype``, its outputs back); samples are returned in ``dtype``.
    progress: show a progress bar (default: only when stderr is a terminal).
    return_trajectory: keep (t, x) of every model query.
    grad: back-propagate through a reversible solver in constant memory (the reversible adjoint,
        :mod:`diffsolve.core.adjoint`): ``samples`` then carry a graph whose backward rebuilds the
        states step by step instead of storing them, and gradients reach x_T (or the latent), mu, the
        tensors in ``cond`` and the parameters of ``model.net``. Without it, autograd through
        ``sample`` also works, storing every step. ``grad="continuous"``: any deterministic solver,
        fixed-grid or adaptive, back-propagated by the continuous adjoint (AdjointDPM,
        :mod:`diffsolve.core.continuous_adjoint`): the backward pass integrates the adjoint ODE from
        the sample back to x_T on the run's grid (an adaptive solver's: a default grid of as many
        steps as it accepted), 4 model calls with a vector-Jacobian product per interval, in
        memory flat in the step count; gradients reach x_T, the floating-point tensors in ``cond``
        and the network's parameters (not mu). It is the gradient of the exact flow, accurate to the
        forward solver's error. ``grad="reversible"`` is ``grad=True``.
    latent: a :class:`Latent` from :func:`invert` (or :meth:`Latent.load`): the run starts from it, on
        its grid (for reversible solvers from its full state, which reproduces the inverted data to
        round-off), with its solver's options unless given again.
    row_block: call the network on blocks of exactly this many rows (the last one padded,
        :class:`~diffsolve.core.blocks.RowBlocks`), so a row's output, and with it each sample,
        is bitwise the same whatever the batch size and whichever rows a per-sample solver still
        queries. A trained network's rows otherwise differ in the last bits between batch sizes,
        which the accept / reject decisions of per-sample adaptive solvers amplify (on digits-vp up
        to 0.03 for adaptive-sde and 0.3 for mrs-sde-adaptive between batches of 8 and 3). The
        same row_block (and seeds, device, dtype, thread count) gives the same samples; another
        one may differ in the last bits, and after adaptive decisions by more. NFE counts model
        calls as without it. Default None: one network call on all the rows queried.
    teleport: a :class:`~diffsolve.models.Gaussian` fitted to the data (analytical teleportation,
        Wang & Vastola 2024): x_T is drawn (or given) at the schedule's t_max and carried by the
        Gaussian's exact probability-flow map to the run's first time (``t_max``, or the grid's first
        time), at no model call; the solver runs from there. ``stats["teleport"]`` records the two
        times. An optimized grid fitted with a teleport needs it (and one fitted without refuses it).
    **solver_options: the solver's options, e.g. ``eta=1.0`` for ddim.
    """
    if isinstance(latent, Latent) and isinstance(solver, str) and solver_info(solver).name == latent.solver:
        solver_options = {**latent.options, **solver_options}  # the options it was made with
    optimized = _optimized_grid(grid)
    if optimized is not None:
        if isinstance(solver, str) and not solver_options and get_solver(solver).name == optimized.solver:
            solver_options = dict(optimized.options)  # the options it was fitted with
        grid = optimized.grid
    model, slv, _, fixed_grid, steps = _start(model, solver, steps, num_inference_steps, solver_options)
    if teleport is not None and not isinstance(teleport, Gaussian):
        raise TypeError(f"teleport must be a diffsolve.models.Gaussian, got {type(teleport).__name__}")
    if optimized is not None:
        optimized.check_use(slv.name, model)
        optimized.check_teleport(teleport)
    noise = slv.default_noise if noise is None else noise
    if row_block is not None:
        row_block = check_row_block(row_block)
    mode = _check_grad(grad)
    if mode:
        if mode == "reversible":
            require_reversible(slv)
        else:
            _check_continuous(slv, optimized, teleport)
        if return_trajectory:
            raise ValueError(f"grad={mode!r} keeps no trajectory; give return_trajectory=False")
        if hooks:
            raise ValueError(f"grad={mode!r} runs no step hooks (the adjoint's backward pass cannot replay them)")
    if latent is not None:
        if not isinstance(latent, Latent):
            raise TypeError(f"latent must be a diffsolve Latent (from ds.invert), got {type(latent).__name__}")
        if x_T is not None:
            raise ValueError("give x_T or latent, not both")
        if latent.aux is not None and latent.solver != slv.name:
            raise ValueError(
                f"this latent was made by {latent.solver!r}; its second state means nothing to "
                f"{slv.name!r} (sample with solver={latent.solver!r})"
            )
        x_T = latent.x
        grid = latent.grid.tolist() if grid is None else grid
        if dtype is None and latent.dtype is not None:
            dtype = latent.dtype
    schedule = model.schedule

    like = None
    if x_T is not None:
        x_T, like = _state_arg(x_T, "x_T")
        if shape is not None and tuple(shape) != tuple(x_T.shape):
            raise ValueError(f"shape {tuple(shape)} does not match x_T's shape {tuple(x_T.shape)}")
        shape = _check_shape(x_T.shape)
    elif shape is None:
        raise ValueError("give shape (the batch shape to sample, batch first) or x_T (the starting state)")
    else:
        shape = _check_shape(shape)
    device = _run_device(model, device, like, "x_T's device")
    dtype = _run_dtype(model, dtype, like, "x_T's dtype")
    work = state_dtype(dtype)
    b = shape[0]
    cond = _check_cond(cond, "cond", b)
    if uncond is not None:
        uncond = _check_cond(uncond, "uncond", b)
    model.check_inputs(mu, cond, uncond)
    hooks = _check_hooks(hooks, shape)
    if mu is not None:
        mu = torch.as_tensor(mu, device=device, dtype=work)
        check_batch("mu", mu, b, shape)
        mu = mu.expand(shape)  # a view: per-sample rows for solvers that subset the batch

    g = _grid(schedule, steps, grid, t_max, t_min, fixed_grid, slv)
    t_start = float(g[0])
    if teleport is not None:
        if latent is not None:
            raise ValueError("teleport: a latent already sits on its grid; give latent or teleport, not both")
        t_start = float(schedule.t_max)
        if not float(g[0]) < t_start:
            raise ValueError(
                f"teleport: the run's first time ({float(g[0]):.6g}) must be below the schedule's t_max "
                f"({t_start:.6g}), where x_T is drawn; give t_max or a grid that starts lower"
            )

    if isinstance(generator, torch.Generator):
        generator = [generator]
    if generator is not None and seed is not None:
        raise ValueError("give seed or generator, not both")
    src = NoiseSource(
        shape,
        seeds=seed,
        generators=generator,
        device=device,
        dtype=work,
        kind=noise,
        t_range=(float(g[-1]), float(g[0])),
    )
    if x_T is None:
        x = schedule.prior(shape, mu, noise=src.randn(), t=t_start)
    elif latent is not None and latent.aux is not None:
        x = x_T.to(device=device)  # a reversible latent keeps its precision; the model runs in dtype
    else:
        x = x_T.to(device=device, dtype=work)

    if teleport is not None:
        x = teleport.flow_map(x, t_start, float(g[0]), schedule, mu)
    # a reversible latent's second state, for the solver that made it (ExactInverse.start takes it)
    aux: dict[str, Any] = {"aux": latent.aux.to(device)} if latent is not None and latent.aux is not None else {}
    run_model = model if row_block is None else in_row_blocks(model, row_block)
    if optimized is not None and optimized.calls is not None:  # its tuned model calls
        run_model = TunedCalls(run_model, optimized.grid, optimized.calls["times"], optimized.calls["data_weights"])
    if uncond is not None:
        cond = {**cond, "uncond": uncond}  # classifier-free guidance's second call: a condition like any other
    try:
        if mode == "continuous":
            box: dict[str, Any] = {}

            def forward(x_: Tensor, cond_: dict) -> tuple[Tensor, Tensor]:
                run = slv.run(x_, g, src, schedule=schedule, mu=mu, **aux)
                box["run"] = execute(
                    run, slv, run_model, g, b, mu=mu, cond={**cond, **cond_}, progress=progress, net_dtype=dtype
                )
                return box["run"][0].x, _adjoint_grid(schedule, g, box["run"][0], fixed_grid)

            start = time.perf_counter()
            x_end = adjoint_sample(run_model, forward, x, mu=mu, cond=cond, dtype=dtype)
            out, counter, trajectory, _ = box["run"]
            out, wall = out._replace(x=x_end), time.perf_counter() - start
        elif mode:
            counter, start = NFECounter(b), time.perf_counter()
            out = Outcome(
                reversible_sample(run_model, slv, x, g, mu=mu, cond=cond, counter=counter, dtype=dtype, **aux)
            )
            trajectory, wall = None, time.perf_counter() - start
        else:
            run = slv.run(x, g, src, schedule=schedule, mu=mu, **aux)
            out, counter, trajectory, wall = execute(
                run,
                slv,
                run_model,
                g,
                b,
                mu=mu,
                cond=cond,
                progress=progress,
                return_trajectory=return_trajectory,
                hooks=hooks,
                hook_noise=src.derived() if hooks else None,
                net_dtype=dtype,
            )
    finally:
        if run_model is not model:
            count_back(model, run_model)
    stats = dict(out.stats or {})
    if teleport is not None:
        stats["teleport"] = {"from": t_start, "to": float(g[0])}
    return SampleResult(
        samples=out.x.to(dtype),
        nfe=counter.calls,
        nfe_per_sample=counter.per_sample,
        grid=g,
        wall_time=wall,
        solver=slv.name,
        options=slv.options(),
        seeds=src.seeds,
        accepted=out.accepted,
        rejected=out.rejected,
        stats=stats,
        trajectory=trajectory,
    )


GRAD_MODES = ("reversible", "continuous")


def _check_grad(grad) -> str | None:
    """``grad`` as a mode name (None: no adjoint)."""
    if grad is False or grad is None:
        return None
    if grad is True:
        return "reversible"
    if grad in GRAD_MODES:
        return grad
    raise ValueError(f"grad must be False, True, or one of {', '.join(map(repr, GRAD_MODES))}, got {grad!r}")


def _check_continuous(slv: Solver, optimized, teleport) -> None:
    """Refuse what the continuous adjoint cannot back-propagate through, naming it."""
    info, _ = _info(slv)
    noisy = slv.noise_options()
    if (info is not None and not info.deterministic) or noisy:
        how = f" with {', '.join(f'{k}={v!r}' for k, v in noisy.items())}" if noisy else ""
        raise ValueError(f"grad='continuous' needs a deterministic solver (an ODE): {slv.name!r}{how} draws noise")
    if optimized is not None and optimized.calls is not None:
        raise ValueError(
            "grad='continuous' cannot run an optimized grid with tuned model calls (they exist only at its times)"
        )
    if teleport is not None:
        raise ValueError("grad='continuous' does not differentiate through the teleport; leave teleport out")


def _adjoint_grid(schedule, g: Tensor, out: Outcome, fixed_grid: bool) -> Tensor:
    """The continuous adjoint's backward grid: the run's own, or for an adaptive solver the
    schedule's default grid kind with as many steps as it accepted (the most over the samples)."""
    if fixed_grid or len(g) > 2:
        return g
    n = int(torch.as_tensor(out.accepted).max()) if out.accepted is not None else 1
    return make_grid(schedule, max(n, 1), t_max=float(g[0]), t_min=float(g[-1]))


def _optimized_grid(grid):
    """The :class:`~diffsolve.optimize.OptimizedGrid` a ``grid`` argument gives (the object, or a
    path to its .json file), else None."""
    return as_optimized_grid(grid) if is_grid_file(grid) else None


def _grid(schedule, steps, grid, t_max, t_min, fixed_grid: bool, slv: Solver) -> Tensor:
    """The run's time grid (:func:`make_grid`), with t_max / t_min checked: numbers, and with an
    explicit grid only as its own ends. An end the caller leaves open and the solver cannot reach
    (:meth:`Solver.replace_ends`) is moved, with a warning that says where."""
    ends: dict[str, float | None] = {
        k: None if v is None else check_range(k, v) for k, v in (("t_max", t_max), ("t_min", t_min))
    }
    explicit = grid is not None and not is_grid_kind(grid)
    if not explicit:
        lo = schedule.t_min if ends["t_min"] is None else ends["t_min"]
        hi = schedule.t_max if ends["t_max"] is None else ends["t_max"]
        for k, v in slv.replace_ends(schedule, hi, lo).items():
            if ends[k] is None:
                ends[k] = v
                warnings.warn(
                    f"solver {slv.name!r} cannot reach {type(schedule).__name__}'s {k}="
                    f"{getattr(schedule, k):.6g} (a singular end of its variables): the run uses "
                    f"{k}={v:.6g}; pass {k} to choose",
                    stacklevel=3,
                )
    if steps is None and not explicit:
        if fixed_grid:
            raise ValueError("steps is required (or pass an explicit grid of times)")
        steps = 1  # an adaptive solver only uses the grid's ends
    g = make_grid(schedule, steps, grid, t_max=ends["t_max"], t_min=ends["t_min"])
    if explicit:
        for (k, given), end in zip(ends.items(), (g[0], g[-1])):
            if given is not None and given != float(end):
                raise ValueError(
                    f"{k}={given} is not the explicit grid's end ({float(end):.6g}); an explicit grid "
                    "sets the time range: leave t_max / t_min out, or give a grid kind"
                )
    return g


def _check_cond(cond, name: str, b: int) -> dict:
    """``cond`` / ``uncond`` as a dict of network keyword arguments whose tensors have batch 1 or ``b``."""
    if cond is None:
        return {}
    if not isinstance(cond, Mapping):
        raise TypeError(f"{name} must be a dict of network keyword arguments, got {type(cond).__name__}")
    for k, v in cond.items():
        check_batch(f"{name}[{k!r}]", v, b)
    return dict(cond)


def _check_hooks(hooks, shape: tuple[int, ...]) -> list:
    """``hooks`` as a list of step hooks, each checked against the samples' ``shape`` (its ``check``)."""
    if hooks is None:
        return []
    hooks = [hooks] if isinstance(hooks, StepHook) else list(hooks)
    for h in hooks:
        if not all(callable(getattr(h, m, None)) for m in ("before", "after", "finish")):
            raise TypeError(f"hooks must be StepHook objects (before / after / finish), got {type(h).__name__}")
        check = getattr(h, "check", None)
        if callable(check):
            check(shape)
    return hooks


def execute(
    run,
    slv: Solver,
    model: DiffusionModel,
    grid: Tensor,
    batch_size: int,
    *,
    mu=None,
    cond=None,
    progress: bool | None = None,
    return_trajectory: bool = False,
    hooks=(),
    hook_noise: NoiseSource | None = None,
    net_dtype: torch.dtype | None = None,
):
    """Pump a solver's generator ``run`` with model calls: every call counted and checked for NaN,
    with the step hooks run around each call and at the end. With ``net_dtype`` (a half-precision
    run) the model gets x and mu in that dtype and its answer comes back for the state's precision.

    Returns (Outcome, NFECounter, trajectory or None, wall seconds). Shared by sampling and inversion.
    """
    from tqdm.auto import tqdm

    info, fixed_grid = _info(slv)
    cond = dict(cond or {})
    counter = NFECounter(batch_size)
    trajectory: list | None = [] if return_trajectory else None
    n_steps = len(grid) - 1
    total = n_steps * (info.calls_per_step if info is not None else 1) if fixed_grid else None
    bar = tqdm(total=total, desc=slv.name, unit="nfe", disable=None if progress is None else not progress, leave=False)
    of = f" of {n_steps}" if fixed_grid else ""

    def caller(index, step):
        kw = {k: take_rows(v, index) for k, v in cond.items()}

        def call(x, t):
            m = take_rows(mu, index)
            try:
                if net_dtype is None or x.dtype == net_dtype:
                    pred = model(x, t, mu=m, counter=counter, index=index, **kw)
                else:
                    pred = model(
                        x.to(net_dtype),
                        t,
                        mu=None if m is None else m.to(net_dtype),
                        counter=counter,
                        index=index,
                        **kw,
                    ).rebased(x, m)
            except RuntimeError as e:
                _first_call_error(e, counter, x)
                raise
            n = counter.calls
            guard.check(
                pred.output,
                lambda: (
                    f"solver {slv.name!r}, step {step() if callable(step) else step}{of} "
                    f"({_describe_t(t)}), model call {n}"
                ),
            )
            return pred

        return call

    def context(index, step, call):
        return HookContext(model.schedule, grid, step, index, take_rows(mu, index), call, hook_noise)

    guard = FiniteGuard()
    start = time.perf_counter()
    pump = None
    try:
        pump = Pump(run)
        while pump.query is not None:
            q = pump.query
            # the step index is for messages and hooks: found lazily (a search per call otherwise)
            step = q.step if q.step is not None else (lambda t=q.t: _step_of(grid, t))
            call = caller(q.rows, step)
            x = q.x
            if hooks:
                ctx = context(q.rows, step() if callable(step) else step, call)
                x = run_hooks(hooks, "before", x, q.t, ctx)
            if trajectory is not None:
                trajectory.append((q.t, x.detach().clone()))
            pred = call(x, q.t)
            if hooks:
                pred = run_hooks(hooks, "after", pred, ctx)
            bar.update(1)
            pump.answer(pred)
    finally:
        bar.close()
        run.close()  # a run stopped by an error releases what it holds (e.g. a worker thread)
    guard.finish()
    out = as_outcome(pump.value, slv.name)
    if hooks:
        out = out._replace(x=run_hooks(hooks, "finish", out.x, context(None, n_steps, caller(None, n_steps))))
    if trajectory is not None:
        trajectory.append((float(grid[-1]), out.x.detach().clone()))
    return out, counter, trajectory, time.perf_counter() - start


def _first_call_error(e: RuntimeError, counter: NFECounter, x: Tensor) -> None:
    """A plain RuntimeError from the run's first model call (the network cannot take the input: a wrong
    shape, channel count ...) re-raised as a ValueError naming ``shape``, the original chained."""
    if counter.calls == 0 and type(e) is RuntimeError:
        raise ValueError(
            f"shape: the network failed on its first call, for states of shape {tuple(x.shape)} "
            f"({x.dtype}, {x.device}); check the samples' shape (shape=, x_T or x0) against what "
            f"the network takes. The network said: {e}"
        ) from e


def _start(model, solver, steps, num_inference_steps, solver_options):
    """Checks shared by sample and invert: (model to run, solver instance, registry entry, fixed
    grid?, steps). The model answers for the solver (:meth:`DiffusionModel.for_solver`: a CFG++
    name's solver runs classifier-free guidance as CFG++) and may refuse it
    (:meth:`DiffusionModel.check_solver`: the guidance wrappers)."""
    if not isinstance(model, DiffusionModel):
        raise TypeError(f"model must be a diffsolve.DiffusionModel, got {type(model).__name__}")
    if num_inference_steps is not None:
        if steps is not None and steps != num_inference_steps:
            raise ValueError("give steps or num_inference_steps, not both")
        steps = num_inference_steps
    slv = resolve_solver(solver, solver_options)
    model = model.for_solver(slv)
    model.check_solver(slv)
    return (model, slv, *_info(slv), steps)


def _info(slv: Solver):
    """(registry entry or None for an unregistered Solver subclass, whether it runs on a fixed grid)."""
    try:
        info = solver_info(slv.name)
    except ValueError:
        return None, True
    return info, info.fixed_grid


def _step_of(grid: Tensor, t) -> int:
    """1-based index of the grid step a query time belongs to (for error messages)."""
    tv = float(t.max()) if isinstance(t, Tensor) and t.ndim > 0 else float(t)
    if math.isnan(tv):
        return 0
    return max(1, min(len(grid) - 1, int((grid > tv + 1e-12 * max(1.0, abs(tv))).sum()) + 1))


#: the solver :func:`invert`, ``invert_pipeline`` and ``diffsolve invert`` use when none is named:
#: reversible Heun, whose latent samples back to the data to round-off at one model call per step
DEFAULT_INVERSION_SOLVER = "rev-heun"


def check_invertible(slv: Solver) -> None:
    """Refuse (ValueError naming it) a solver :func:`invert` cannot run: one that draws noise, and one
    whose steps cannot run on the ascending grid the default :meth:`Solver.run_inverse` runs
    (:attr:`Solver.runs_backward` False, e.g. ``mrs-adaptive``)."""
    info, _ = _info(slv)
    noisy = slv.noise_options()
    if (info is not None and not info.deterministic) or noisy:
        how = f" with {', '.join(f'{k}={v!r}' for k, v in noisy.items())}" if noisy else ""
        raise ValueError(
            f"solver {slv.name!r}{how} is stochastic; invert needs a deterministic solver "
            "(e.g. ddim with eta=0, heun, dpmpp-2m, or a reversible one such as "
            f"{DEFAULT_INVERSION_SOLVER})"
        )
    if not slv.runs_backward:
        exact = ", ".join(i.name for i in registered() if i.invertible)
        raise ValueError(
            f"solver {slv.name!r} cannot invert: {slv.backward_refusal}. Use a reversible solver, which "
            f"inverts exactly ({exact}; the default is {DEFAULT_INVERSION_SOLVER!r}), or a fixed-grid "
            "one run backwards (ddim, dpmpp-2m, mrs-pc ...)"
        )


def invert(
    model: DiffusionModel,
    solver: str | Solver = DEFAULT_INVERSION_SOLVER,
    x0: Tensor | np.ndarray | None = None,
    steps: int | None = None,
    *,
    grid: GridSpec | None = None,
    t_max: float | None = None,
    t_min: float | None = None,
    mu: Tensor | None = None,
    cond: Mapping[str, Any] | None = None,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    progress: bool | None = None,
    num_inference_steps: int | None = None,
    **solver_options: Any,
) -> Latent:
    """Map data ``x0`` (the state at t_min) to a :class:`Latent` at t_max with a deterministic solver.

    ``solver`` defaults to :data:`DEFAULT_INVERSION_SOLVER` (``"rev-heun"``). Reversible solvers
    (``invertible`` in the registry) run their exact inverse and return their full state, which
    samples back to ``x0`` to round-off. Every other deterministic solver runs its own steps on the
    grid backwards (``ddim`` gives DDIM inversion), which is exact only as the step count grows;
    stochastic solvers, and those whose steps cannot run backwards (``mrs-adaptive``:
    :attr:`Solver.runs_backward`), are refused with a ValueError naming them (:func:`check_invertible`).
    ``ds.sample(model, solver, latent=lat)`` samples back on the same grid.
    A solver may define its own inversion (:meth:`Solver.run_inverse`): ``ddim`` with ``renoise=True`` refines
    DDIM inversion by ReNoise's fixed-point iteration.

    The other arguments are :func:`sample`'s: dtype and device follow the same rule (x0's, else the
    network's, and they must be the network's), a numpy ``x0`` is converted to them, and a run
    without an input the model needs (``mu``, a ``cond`` key) is refused. ``Latent.save`` writes the
    result to disk.
    """
    x0, like = _state_arg(x0, "x0")
    model, slv, _, fixed_grid, steps = _start(model, solver, steps, num_inference_steps, solver_options)
    check_invertible(slv)
    shape = _check_shape(x0.shape)
    device = _run_device(model, device, like, "x0's device")
    dtype = _run_dtype(model, dtype, like, "x0's dtype")
    work = state_dtype(dtype)
    x = x0.to(device=device, dtype=work)
    b = shape[0]
    cond = _check_cond(cond, "cond", b)
    model.check_inputs(mu, cond)
    if mu is not None:
        mu = torch.as_tensor(mu, device=x.device, dtype=work)
        check_batch("mu", mu, b, shape)
        mu = mu.expand(shape)
    g = _grid(model.schedule, steps, grid, t_max, t_min, fixed_grid, slv)
    src = NoiseSource(shape, seeds=0, device=x.device, dtype=work, t_range=(float(g[-1]), float(g[0])))
    run = slv.run_inverse(x, g, src, schedule=model.schedule, mu=mu)
    out, counter, _, _ = execute(run, slv, model, g, b, mu=mu, cond=cond, progress=progress, net_dtype=dtype)
    return Latent(
        x=out.x,
        aux=(out.stats or {}).get("aux"),
        grid=g,
        solver=slv.name,
        options=slv.options(),
        nfe=counter.calls,
        dtype=dtype,
    )
