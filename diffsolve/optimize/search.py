"""``optimize_grid``: the best ``steps``-step grid of times for one model and one registered solver.

Teacher: the model's probability-flow ODE solved accurately (``dpmpp-3m`` on a grid ``teacher_sub``
times finer than the candidate set, log-SNR spaced) from a batch of starting noises; its states at
the candidate times are kept. The student is the solver itself, run by its own generator (its real
update: its order, its multistep history, its last step), with every model answer memoised on the
exact (x, t) it was asked for, so re-running a grid that shares a prefix with an earlier one costs
no model call for that prefix.

Tier 1, dynamic programming over the candidate times c_0 = t_max > c_1 > ... > c_M = t_end (the
global-error DP of OSS, Pei et al. 2025, with the solver's real update instead of Euler's): for
k = 1 .. steps and each candidate j, the best k-step path to c_j is the best (k-1)-step path to some
c_i extended by the step c_i -> c_j, scored by the student's state at c_j against the teacher's
there (RMS over the batch). The student's state at c_j is read from the run of the path followed by
a padding of the remaining steps to t_end (so a solver that treats its last steps differently sees
the right step count); the last level runs the whole grid to its end. Cost: about steps x M model
calls for one-call solvers (more for multi-stage ones), and steps x M^2 / 2 solver replays.

Tier 2, local search, warm-started from the best on the fitting noise of tier 1's grid and the
hand-made grids (log-SNR, Karras, uniform, exponential): each interior time moves by +-delta in log-SNR
(bounded by its neighbours); a move is kept if the final error on the fitting noise falls; delta
halves after a sweep without a kept move. After each sweep the grid is checked on held-out noise
(disjoint seeds), and the grid with the lowest held-out error is the result (early stopping).

End of the trajectory (``stop_early=True``): the grid may also stop at a noise level above the end
and return the state there, scored against the teacher's final state (as diffusers'
``final_sigmas_type="sigma_min"`` does at a fixed level). At few steps a solver's last step into
sigma = 0 is its least accurate one (first order in every multistep solver), and stopping at a
searched sigma/alpha ~ 0.1 instead measures 2.6-4x lower error at 5-8 calls on the ODE
benchmark's mixture (the best hand-made grids of dpmpp-2m, dpmpp-3m and unipc either way). Both
tiers then search the last time as well: the DP's last level ends at any candidate, the
exhaustive tier tries every end, the local search moves the last time too.

Tier 3, tuned calls (``tune_calls=True``, :mod:`diffsolve.models.tuned`, fitted by :mod:`diffsolve.optimize.calls`): warm-started from tier
2's grid, the grid and two numbers per model call (the time the model is asked at, decoupled from
the time the solver steps from, as LD3 does, and a per-call epsilon scale) are fitted together by
Nelder-Mead on the fitting noise, early-stopped on the held-out noise; the solver's update is left as
it is. On the ODE benchmark's mixture at 3 and 4 unipc calls it halves the grid-only error.

Start of the trajectory (``teleport=`` a :class:`~diffsolve.models.Gaussian`): the starting noise
is carried at no model call by the Gaussian's exact flow to a hand-over candidate (t_max and four
more in the upper half of the candidates, :func:`handover_starts`); tier 1 and the hand-made grids
run from each, against the same teacher (which starts at t_max), and the best start is refined.
"""

from __future__ import annotations

import functools
import itertools
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ..core.driver import _grid, resolve_solver, sample
from ..core.noise import prior_sample
from ..core.protocol import Pump, UnstableError, as_outcome
from ..core.registry import cfg_pp_base, get_solver, solver_info
from ..models.gaussian import Gaussian
from ..models.model import DiffusionModel
from ..models.tuned import tuned_prediction
from ..schedules.grids import is_grid_kind, make_grid
from ..schedules.optimized import OptimizedGrid, model_identity
from .calls import fit_calls

Tensor = torch.Tensor


class _NoNoise:
    """The noise source of a grid search: a solver that draws noise is refused (the search compares
    deterministic runs)."""

    def __init__(self, name: str):
        self.name = name

    def __getattr__(self, attr):
        raise ValueError(
            f"optimize_grid needs a deterministic run; solver {self.name!r} draws noise with these options "
            "(set its noise options to their deterministic values, e.g. eta=0)"
        )


#: the memory a student's memoised model answers may take (bytes)
MEMO_BYTES = 1 << 30


class Student:
    """Runs one solver on explicit grids from fixed starting states, answering its queries with
    memoised model predictions (keyed on the exact state and time asked for)."""

    def __init__(self, solver, model: DiffusionModel, x_T: Tensor, mu=None, cond=None):
        self.solver, self.model, self.x_T, self.mu = solver, model, x_T, mu
        self.cond = dict(cond or {})
        # least recently used answers are dropped beyond MEMO_BYTES (a 50-step refinement on 1024
        # noises would otherwise keep ~30000 of them: 15 GB for the 16-D mixture)
        self.cache: OrderedDict[tuple, Any] = OrderedDict()
        self.limit = max(16, MEMO_BYTES // (4 * x_T.numel() * x_T.element_size()))  # x, output, x0, eps
        self.calls = 0
        self.memo = True  # keep the model's answers (off while tuning calls: few would be asked again)
        #: tuned calls (:mod:`diffsolve.models.tuned`): grid time -> (model time, data weight)
        self.tuning: dict[float, tuple[float, float]] = {}
        self.asked: set[float] = set()  # the times queried so far

    def predict(self, x: Tensor, t) -> Any:
        tf = float(t)
        self.asked.add(tf)
        tau, weight = self.tuning.get(tf, (tf, 1.0))
        key = (tau, x.dtype, tuple(x.shape), hash(x.detach().cpu().contiguous().numpy().tobytes()))
        pred = self.cache.get(key) if self.memo else None
        if pred is not None:
            self.cache.move_to_end(key)
        else:
            pred = self.model(x, t if tau == tf else tau, mu=self.mu, **self.cond)
            if not bool(torch.isfinite(pred.output).all()):
                raise UnstableError(f"optimize_grid: the model returned NaN or inf at t={tau:.6g}")
            if self.memo:
                self.cache[key] = pred
                if len(self.cache) > self.limit:
                    self.cache.popitem(last=False)
            self.calls += 1
        return pred if (tau, weight) == (tf, 1.0) else tuned_prediction(pred, x, t, weight)

    def run(self, grid: Sequence[float]) -> Tensor:
        """The solver's final state on ``grid``."""
        out = self._run(grid, None)
        assert out is not None
        return out

    def state_at(self, grid: Sequence[float], t: float) -> Tensor | None:
        """The solver's state at ``t`` (a time of ``grid``): the state of the first query of the step
        from there (by the query's step number; for a solver that numbers none, its last query at
        that time before its first query below it), None if it asks nothing there (a solver whose
        steps do not start on every grid time)."""
        return self._run(grid, t)

    def _run(self, grid: Sequence[float], stop_at: float | None) -> Tensor | None:
        times = [float(t) for t in grid]
        g = torch.tensor(times, dtype=torch.float64)
        stop_step = times.index(stop_at) + 1 if stop_at is not None else None
        run = self.solver.run(self.x_T.clone(), g, _NoNoise(self.solver.name), schedule=self.model.schedule, mu=self.mu)
        pump = Pump(run)
        at = None
        try:
            while pump.query is not None:
                q = pump.query
                if q.rows is not None:
                    raise ValueError(
                        f"optimize_grid needs a solver that steps the whole batch; {self.solver.name!r} does not"
                    )
                t = float(q.t)
                if stop_at is not None and q.step is not None:
                    if q.step == stop_step:  # the first query of the step from stop_at: the state there
                        return q.x
                elif stop_at is not None:
                    if t == stop_at:
                        at = q.x
                    elif t < stop_at:
                        return at
                pump.answer(self.predict(q.x, q.t))
        finally:
            pump.close()
        return as_outcome(pump.value, self.solver.name).x


def rms(a: Tensor, b: Tensor) -> float:
    return float((a.double() - b.double()).pow(2).mean().sqrt())


def trimmed_rms(a: Tensor, b: Tensor, trim: float = 0.0) -> float:
    """RMS over the samples after leaving out the ``trim`` fraction with the largest errors (rounded
    down): a sample near the boundary between two modes may land in the other one at few steps, and
    its error, 100 times the others', would otherwise decide the grid."""
    per = (a.double() - b.double()).pow(2).reshape(a.shape[0], -1).mean(1)
    drop = int(trim * a.shape[0])
    if drop:
        per = per.sort().values[: a.shape[0] - drop]
    return float(per.mean().sqrt())


def _log_snr_maps(schedule):
    """(t -> log-SNR, log-SNR -> t) of ``schedule``, on Python floats."""

    def lam(t: float) -> float:
        return float(schedule.log_snr(torch.tensor(t, dtype=torch.float64)))

    def time_of(v: float) -> float:
        return float(schedule.t_of_log_snr(torch.tensor(v, dtype=torch.float64)))

    return lam, time_of


def candidate_times(schedule, hi: float, lo: float, m: int) -> list[float]:
    """``m + 1`` candidate times from ``hi`` down to ``lo``, uniform in log-SNR; an end where the
    log-SNR is infinite (alpha = 0 or sigma = 0) is kept, with the interior uniform in log-SNR
    between the times 1/(4m) of the range inside it (toward sigma = 0, the schedule's t_min instead
    where that is above ``lo`` and closer to the clean end: a trained network's last noise level)."""
    lam, _ = _log_snr_maps(schedule)
    inner_hi, inner_lo, head, tail = hi, lo, [], []
    if not math.isfinite(lam(hi)):
        inner_hi, head = hi - (hi - lo) / (4 * m), [hi]
    if not math.isfinite(lam(lo)):  # sigma = 0: the interior ends at the schedule's t_min if that is above
        inner_lo, tail = lo + (hi - lo) / (4 * m), [lo]
        if schedule.t_min > lo and math.isfinite(lam(schedule.t_min)) and lam(schedule.t_min) > lam(inner_lo):
            inner_lo = float(schedule.t_min)
    n = m - len(head) - len(tail)
    inner = make_grid(schedule, n, "log-snr", t_max=inner_hi, t_min=inner_lo).tolist()
    return head + inner + tail


def teacher_grid(schedule, cands: list[float], sub: int) -> tuple[list[float], list[int]]:
    """The teacher's grid through the candidates, and where each candidate is in it: ``sub`` steps
    between two, uniform in log-SNR (in t next to alpha = 0); into an end where sigma = 0, 4 ``sub``
    log-SNR steps down to sigma/alpha e^-12 times that of the candidate before it, then the end (an
    ODE solver's last step to sigma = 0 is its least accurate one: there it starts at ~1e-7)."""
    lam, time_of = _log_snr_maps(schedule)
    fine: list[float] = []
    where: list[int] = []
    for a, b in zip(cands, cands[1:]):
        la, lb = lam(a), lam(b)
        if math.isfinite(la) and math.isfinite(lb):
            part = make_grid(schedule, sub, "log-snr", t_max=a, t_min=b).tolist()[:-1]
        elif math.isfinite(la):  # into sigma = 0
            part = make_grid(schedule, 4 * sub, "log-snr", t_max=a, t_min=time_of(la + 12.0)).tolist()
        else:  # out of alpha = 0
            part = make_grid(schedule, sub, "uniform", t_max=a, t_min=b).tolist()[:-1]
        where.append(len(fine))
        fine += [a, *part[1:]]
    where.append(len(fine))
    fine.append(cands[-1])
    return fine, where


def _pad(j: int, m: int, n: int) -> list[int]:
    """``n`` strictly increasing candidate indices after ``j`` ending at ``m`` (m - j >= n)."""
    if n == 0:
        return []
    idx = np.rint(np.linspace(j, m, n + 1)[1:]).astype(int).tolist()
    for a in range(len(idx)):  # strictly increasing from j
        idx[a] = max(idx[a], (idx[a - 1] if a else j) + 1)
    return idx


def dp_search(
    student: Student, cands: list[float], teacher: list[Tensor], steps: int, score=rms, stop_early: bool = False
) -> tuple[list[float], float]:
    """Tier 1 (module docstring): (best grid, its final error against the teacher on the fit batch).
    ``stop_early``: the last step may end at any candidate, scored against the teacher's final state."""
    m = len(cands) - 1
    if m < steps:
        raise ValueError(f"candidates: {m} candidate steps cannot hold a {steps}-step grid")
    best: dict[int, tuple[float, list[int]]] = {0: (0.0, [0])}
    for k in range(1, steps + 1):
        level: dict[int, tuple[float, list[int]]] = {}
        targets = range(k, m + 1) if k == steps and stop_early else [m] if k == steps else range(k, m - (steps - k) + 1)
        for j in targets:
            for i, (_, path) in best.items():
                if i >= j:
                    continue
                idx = path + [j] + _pad(j, m, steps - k)
                grid = [cands[a] for a in idx]
                x = student.run(grid) if k == steps else student.state_at(grid, cands[j])
                err = math.inf if x is None else score(x, teacher[m if k == steps else j])
                if j not in level or err < level[j][0]:
                    level[j] = (err, path + [j])
        best = level
    err, path = min(best.values(), key=lambda v: v[0])
    if not math.isfinite(err):
        raise ValueError(
            f"solver {student.solver.name!r} does not start a step on every grid time, so the grid search "
            "cannot score its partial paths; use refine on a given grid instead"
        )
    return [cands[a] for a in path], err


def exhaustive_search(
    student: Student, cands: list[float], teacher_end: Tensor, steps: int, score=rms, stop_early: bool = False
) -> tuple[list[float], float]:
    """Every ``steps``-step path through the candidates, each run to its end: (best grid, its error).
    ``stop_early``: paths may end at any candidate, each scored against ``teacher_end``."""
    m = len(cands) - 1
    best: tuple[float, list[float]] = (math.inf, [])
    paths = (
        itertools.combinations(range(1, m + 1), steps)
        if stop_early
        else ((*inner, m) for inner in itertools.combinations(range(1, m), steps - 1))
    )
    for rest in paths:
        grid = [cands[a] for a in (0, *rest)]
        err = score(student.run(grid), teacher_end)
        if err < best[0]:
            best = (err, grid)
    return best[1], best[0]


def local_search(
    student: Student,
    check: Student,
    schedule,
    grid: list[float],
    target: Tensor,
    check_target: Tensor,
    delta: float,
    sweeps: int,
    patience: int = 2,
    score=rms,
    end: float | None = None,
    students_at: Callable[[float], tuple[Student, Student]] | None = None,
    top: float | None = None,
) -> tuple[list[float], dict[str, Any]]:
    """Tier 2 (module docstring): coordinate moves of the interior times in log-SNR on the fitting
    batch (``student`` / ``target``), early-stopped on the held-out batch (``check`` / ``check_target``).
    ``end``: the time a grid may not reach or pass when its last time is above it (a grid that stops
    early: its last time moves too, between the one before it and ``end``). ``students_at`` and
    ``top``: the first time moves too, below ``top``, each start with its own (fitting, held-out)
    students (a teleport's hand-over: the starting states depend on it)."""
    lam, time_of = _log_snr_maps(schedule)
    last = len(grid) - 1 if end is not None and grid[-1] > end else len(grid) - 2
    first = 0 if students_at is not None and top is not None else 1
    cur, cur_err = list(grid), score(student.run(grid), target)
    best, best_held = list(grid), score(check.run(grid), check_target)
    best_err = cur_err
    history = [{"sweep": 0, "fit_error": cur_err, "heldout_error": best_held}]
    stale = 0
    for sweep in range(1, sweeps + 1):
        moved = False
        for p in range(first, last + 1):
            before = cur[p - 1] if p else top
            after = cur[p + 1] if p + 1 < len(cur) else end
            lo_l, hi_l = lam(before), lam(after)  # log-SNR rises along the grid
            for sign in (1.0, -1.0):
                v = lam(cur[p]) + sign * delta
                if not (lo_l < v < hi_l):
                    continue
                t = time_of(v)
                if not (before > t > after) or not (lo_l < lam(t) < hi_l):
                    continue  # the schedule's time cannot resolve the move
                trial = cur[:p] + [t] + cur[p + 1 :]
                fit, held = (student, check) if p or students_at is None else students_at(t)
                try:
                    e = score(fit.run(trial), target)
                except (ArithmeticError, ValueError):  # a grid the solver cannot step
                    continue
                if e < cur_err:
                    cur, cur_err, moved, student, check = trial, e, True, fit, held
                    break
        held = score(check.run(cur), check_target)
        history.append({"sweep": sweep, "fit_error": cur_err, "heldout_error": held, "delta": delta})
        if held < best_held:
            best, best_held, best_err, stale = list(cur), held, cur_err, 0
        else:
            stale += 1
            if stale >= patience:
                break
        if not moved:
            delta /= 2
    return best, {"sweeps": history, "heldout_error": best_held, "fit_error": best_err}


#: the hand-made grids tier 1's result is compared with (on the fitting noise) before refining
HAND_MADE = ("log-snr", "karras", "uniform", "exponential")


def _hand_made(schedule, steps: int, kind: str, hi: float, lo: float) -> list[float] | None:
    """The grid ``kind`` from ``hi`` to ``lo``; where the kind cannot reach ``lo`` (sigma = 0), its
    ``steps - 1`` steps to the schedule's t_min (above ``lo``) and a last step to ``lo``; None if
    neither can be made."""
    try:
        return make_grid(schedule, steps, kind, t_max=hi, t_min=lo).tolist()
    except ValueError:
        pass
    if steps < 2 or not schedule.t_min > lo:
        return None
    try:
        return make_grid(schedule, steps - 1, kind, t_max=hi, t_min=schedule.t_min).tolist() + [lo]
    except ValueError:
        return None


def handover_starts(m: int, steps: int, teleport: bool, count: int = 4) -> list[int]:
    """The candidate indices a grid may start from: 0 (t_max) and, with a teleport, up to ``count``
    more spread over the upper half of the candidates, each leaving room for ``steps`` steps."""
    if not teleport:
        return [0]
    top = min(m // 2, m - steps)
    return sorted({0, *np.rint(np.linspace(0, top, count + 1)).astype(int).tolist()})


def optimize_grid(
    model: DiffusionModel,
    solver: str,
    steps: int,
    *,
    shape: Sequence[int],
    seed: int = 0,
    heldout_seed: int | None = None,
    candidates: int = 40,
    refine: bool = True,
    sweeps: int = 12,
    exhaustive: int = 2000,
    init: Any = None,
    trim: float = 0.02,
    teacher: str = "dpmpp-3m",
    teacher_sub: int = 4,
    t_max: float | None = None,
    t_min: float | None = None,
    cond: Mapping[str, Any] | None = None,
    uncond: Mapping[str, Any] | None = None,
    mu: Tensor | None = None,
    search_options: Mapping[str, Sequence[Any]] | None = None,
    stop_early: bool = False,
    teleport: Gaussian | None = None,
    tune_calls: bool = False,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    **options: Any,
) -> OptimizedGrid:
    """The best ``steps``-step grid for ``model`` and the registered ``solver`` (with ``options``),
    fitted to the model's own accurate ODE solution (the teacher) from ``shape[0]`` noises (seeds
    ``seed`` ...) and checked on as many others (seeds ``heldout_seed`` ..., default ``seed +
    shape[0]``). See :mod:`diffsolve.optimize.search` for the two tiers.

    ``candidates``: the number of candidate steps of tier 1 (which tries every path through them,
    run to the end, when there are at most ``exhaustive`` such paths, else runs the DP); ``init``: a
    grid (kind or times, as ``grid=`` in :func:`diffsolve.sample`) to refine instead of tier 1 (for
    step counts where the DP's cost, about steps^2 x candidates^2 / 2 solver steps, is too high);
    ``trim``: the errors are RMS over the samples less the ``trim`` fraction with the largest errors
    (a sample between two modes that lands in the other one at few steps would decide the grid) (log-SNR spaced between the grid's ends,
    which are those of the solver's default grid, or ``t_max`` / ``t_min``); ``refine``: run tier 2
    (``sweeps`` sweeps at most); ``teacher`` and ``teacher_sub``: the teacher's solver and how many of
    its steps lie between two candidates (the teacher is also run at half that, and the agreement
    is recorded); ``cond`` / ``uncond`` / ``mu``: as in :func:`diffsolve.sample` (a classifier-free
    guided model is fitted with its guidance); ``search_options``: solver options to search as well,
    each with its values (``{"lower_order_final": [True, False]}``): every combination is fitted and
    the one with the lowest fitting error kept; ``stop_early``: search grids that stop above the end
    too (module docstring: the returned samples then keep the noise level of the grid's last time,
    small, recorded as the artefact's last sigma); ``teleport``: a :class:`~diffsolve.models.Gaussian`
    fitted to the data, whose exact flow may carry the noise from t_max to a hand-over time at no
    model call (analytical teleportation); the hand-over time is searched among the upper half of
    the candidates (t_max itself included) and recorded in the artefact; ``tune_calls``: after the
    grid search, fit the grid and the model calls together (tier 3 of the module docstring: the time
    each call asks the model at and the scale of its noise prediction, :mod:`diffsolve.models.tuned`;
    a Nelder-Mead fit of a few thousand solver runs, so worth it where a model call is cheap against
    the samples it serves), recorded as the artefact's ``calls``. Returns an :class:`OptimizedGrid` (save it with
    ``.save(path)``), with the held-out error of the solver's default grid (or of ``init``) as
    ``baseline``.
    """
    with torch.no_grad():
        return _optimize_grid(
            model, solver, steps, shape=shape, seed=seed, heldout_seed=heldout_seed, candidates=candidates,
            refine=refine, sweeps=sweeps, exhaustive=exhaustive, init=init, trim=trim, teacher=teacher, teacher_sub=teacher_sub,
            t_max=t_max, t_min=t_min, cond=cond, uncond=uncond, mu=mu, search_options=search_options, stop_early=stop_early, teleport=teleport, tune_calls=tune_calls,
            dtype=dtype, device=device, **options,
        )  # fmt: skip


def _optimize_grid(model, solver, steps, *, shape, seed, heldout_seed, candidates, refine, sweeps, exhaustive, init, trim,
                   teacher, teacher_sub, t_max, t_min, cond, uncond, mu, search_options, stop_early, teleport, tune_calls, dtype, device,
                  **options):  # fmt: skip
    started = time.perf_counter()
    if isinstance(trim, bool) or not isinstance(trim, (int, float)) or not 0 <= trim < 0.5:
        raise ValueError(f"trim must be a fraction in [0, 0.5), got {trim!r}")
    score = functools.partial(trimmed_rms, trim=trim)
    if not isinstance(model, DiffusionModel):
        raise TypeError(f"model must be a diffsolve.DiffusionModel, got {type(model).__name__}")
    if not isinstance(solver, str):
        raise TypeError(f"solver must be a registered solver's name, got {type(solver).__name__}")
    info = solver_info(solver)
    if cfg_pp_base(solver) is not None:
        raise ValueError(
            f"{solver!r} is a CFG++ sampler, whose steps solve no ODE (each re-projects onto the guided x0): "
            f"there is no step-independent target to fit a grid to; fit {info.name!r} with ClassifierFreeGuidance"
        )
    if not info.fixed_grid:
        raise ValueError(
            f"solver {info.name!r} chooses its own steps (adaptive); optimize_grid needs a fixed-grid solver"
        )
    for name, value in (("candidates", candidates), ("teacher_sub", teacher_sub), ("sweeps", sweeps)):
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "sweeps" else 1):
            raise ValueError(
                f"{name} must be a {'non-negative' if name == 'sweeps' else 'positive'} int, got {value!r}"
            )
    if teleport is not None and not isinstance(teleport, Gaussian):
        raise TypeError(f"teleport must be a diffsolve.models.Gaussian, got {type(teleport).__name__}")
    for name, flag in (("stop_early", stop_early), ("tune_calls", tune_calls)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be True or False, got {flag!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if candidates < steps and init is None:
        raise ValueError(f"candidates must be at least steps ({steps}), got {candidates}")
    combos = [dict()]
    if search_options:
        keys = list(search_options)
        for k in keys:
            if isinstance(search_options[k], (str, bytes)) or not isinstance(search_options[k], Sequence):
                raise TypeError(f"search_options[{k!r}] must be a list of values, got {search_options[k]!r}")
        combos = [dict(zip(keys, vals)) for vals in itertools.product(*(search_options[k] for k in keys))]
    solvers = [resolve_solver(solver, {**options, **c}) for c in combos]
    run_model = model.for_solver(solvers[0])
    run_model.check_solver(solvers[0])
    schedule = model.schedule
    shape = tuple(int(s) for s in shape)
    device = torch.device(device) if device is not None else (model.device or torch.get_default_device())
    dtype = dtype or model.dtype or torch.get_default_dtype()
    cond = dict(cond or {})
    if uncond is not None:
        cond["uncond"] = dict(uncond)
    if mu is not None:
        mu = torch.as_tensor(mu, device=device, dtype=dtype).expand(shape)

    ends = _grid(schedule, steps, "uniform", t_max, t_min, True, solvers[0])
    hi, lo = float(ends[0]), float(ends[-1])
    default_name = str(schedule.default_grid)
    try:
        default = make_grid(schedule, steps, schedule.default_grid, t_max=hi, t_min=lo)
    except ValueError:  # e.g. log-SNR to sigma = 0: log-SNR spaced inside, the ends kept
        default = torch.tensor(candidate_times(schedule, hi, lo, steps), dtype=torch.float64)
        default_name += " (inside; ends kept)"
    start = None
    if init is not None:  # tier 1 skipped: refine from this grid (an explicit one sets the ends)
        kind = is_grid_kind(init)
        start = _grid(
            schedule, steps, init, t_max if kind else None, t_min if kind else None, True, solvers[0]
        ).tolist()
        hi, lo = start[0], start[-1]
    cands = candidate_times(schedule, hi, lo, candidates)
    fine, where = teacher_grid(schedule, cands, teacher_sub)
    fine_t = torch.tensor(fine, dtype=torch.float64)

    heldout_seed = seed + shape[0] if heldout_seed is None else heldout_seed
    kw = {"mu": mu, "cond": {k: v for k, v in cond.items() if k != "uncond"}, "uncond": cond.get("uncond")}

    def teach(x_T: Tensor) -> list[Tensor]:
        """The teacher's states at the candidates (its trajectory: one query a step, then the end)."""
        res = sample(model, teacher, x_T=x_T, grid=fine_t, return_trajectory=True, **kw)
        assert res.trajectory is not None and len(res.trajectory) == len(fine)
        return [res.trajectory[i][1] for i in where]

    x_fit = prior_sample(schedule, shape, seed, device=device, dtype=dtype, mu=mu, t=hi)
    x_held = prior_sample(schedule, shape, heldout_seed, device=device, dtype=dtype, mu=mu, t=hi)
    teacher_fit = teach(x_fit)
    teacher_held = teach(x_held)[-1]
    halved = [*fine[:-1:2], fine[-1]]  # every other time: the teacher's own error, roughly
    teacher_check = rms(sample(model, teacher, x_T=x_held, grid=halved, **kw).samples, teacher_held)
    teacher_seconds = time.perf_counter() - started

    lam_spacing = abs(
        float(schedule.log_snr(torch.tensor(cands[len(cands) // 2], dtype=torch.float64)))
        - float(schedule.log_snr(torch.tensor(cands[len(cands) // 2 + 1], dtype=torch.float64)))
    )
    tried = []
    starts = handover_starts(len(cands) - 1, steps, teleport is not None and start is None)

    def states_at(x: Tensor, t: float) -> Tensor:  # the starting states carried to t (a teleport's)
        return x if t == hi or teleport is None else teleport.flow_map(x, hi, t, schedule, mu)

    for combo, slv in zip(combos, solvers):
        t0 = time.perf_counter()
        pairs: dict[float, tuple[Student, Student]] = {}

        def students_at(t: float, pairs=pairs, slv=slv) -> tuple[Student, Student]:
            """The (fitting, held-out) students of runs that start at t (t_max, or a hand-over)."""
            if t not in pairs:
                pairs[t] = (
                    Student(slv, run_model, states_at(x_fit, t), mu, cond),
                    Student(slv, run_model, states_at(x_held, t), mu, cond),
                )
            return pairs[t]

        by_start: dict[int, dict[str, Any]] = {}
        for i in starts:  # tier 1 (and the hand-made grids) from each hand-over candidate
            fit = students_at(cands[i])[0]
            sub = cands[i:]
            paths = math.comb(len(sub) - 1, steps) if stop_early else math.comb(len(sub) - 2, steps - 1)
            tier1 = "init" if start is not None else "exhaustive" if paths <= exhaustive else "dp"
            if start is not None:
                dp_grid, dp_err = start, score(fit.run(start), teacher_fit[-1])
            elif tier1 == "exhaustive":
                dp_grid, dp_err = exhaustive_search(fit, sub, teacher_fit[-1], steps, score, stop_early)
            else:
                dp_grid, dp_err = dp_search(fit, sub, teacher_fit[i:], steps, score, stop_early)
            # the refinement starts from the best on the fitting noise of tier 1's grid and the
            # hand-made grids (so it never starts behind them)
            hand, start_name = {}, tier1
            best_grid, best_err = dp_grid, dp_err
            if start is None:
                stops = {"": lo}
                if stop_early:  # each kind also stopping at every candidate of the lower half of the range
                    stops.update({f" to t={c:.6g}": c for c in cands[len(cands) // 2 : -1] if c < sub[0]})
                for (label, stop), kind in itertools.product(stops.items(), HAND_MADE):
                    g = _hand_made(schedule, steps, kind, sub[0], stop)
                    if g is not None:
                        hand[kind + label] = score(fit.run(g), teacher_fit[-1])
                        if hand[kind + label] < best_err:
                            best_grid, best_err, start_name = g, hand[kind + label], kind + label
            by_start[i] = {
                "tier1": {
                    "method": tier1,
                    "paths": paths,
                    "grid": dp_grid,
                    "fit_error": dp_err,
                    "hand_made_fit_errors": hand,
                },
                "start": start_name,
                "grid": best_grid,
                "fit_error": best_err,
            }
        i = min(by_start, key=lambda k: by_start[k]["fit_error"])
        best = by_start[i]
        fit, held = students_at(cands[i])
        best["tier1"].update(
            heldout_error=score(held.run(best["tier1"]["grid"]), teacher_held), seconds=time.perf_counter() - t0
        )
        record: dict[str, Any] = {"options": combo, "tier1": best["tier1"], "start": best["start"]}
        if teleport is not None:
            record["teleport"] = {
                "to": cands[i] if i else None,
                "fit_errors": {f"{cands[k]:.6g}": v["fit_error"] for k, v in by_start.items()},
            }
        dp_grid, dp_err = best["grid"], best["fit_error"]
        dp_held = score(held.run(dp_grid), teacher_held)
        grid, fit_err, held_err = dp_grid, dp_err, dp_held

        if refine and steps > 1 and sweeps > 0:
            t1 = time.perf_counter()
            grid, rec = local_search(
                fit,
                held,
                schedule,
                dp_grid,
                teacher_fit[-1],
                teacher_held,
                lam_spacing / 2,
                sweeps,
                score=score,
                end=lo if stop_early else None,
                students_at=students_at if teleport is not None and start is None else None,
                top=hi,
            )
            fit_err, held_err = rec["fit_error"], rec["heldout_error"]
            record["refine"] = {**rec, "grid": grid, "seconds": time.perf_counter() - t1}
        times = weights = None
        if tune_calls:
            t2 = time.perf_counter()
            fit, held = students_at(grid[0])
            grid, times, weights, rec = fit_calls(
                fit, held, schedule, grid, teacher_fit[-1], teacher_held, score, end=lo if stop_early else None
            )
            if times == grid and all(w == 1.0 for w in weights):  # no round did better on held-out noise
                times = weights = None
            fit_err, held_err = rec["fit_error"], rec["heldout_error"]
            record["tune"] = {**rec, "seconds": time.perf_counter() - t2}
        if teleport is not None:  # where the refined grid hands over
            record["teleport"]["to"] = grid[0] if grid[0] < hi else None
        base_grid = start if start is not None else default.tolist()
        base = score(students_at(hi)[1].run(base_grid), teacher_held)
        record.update(
            grid=grid,
            calls=None if times is None else {"times": times, "data_weights": weights},
            fit_error=fit_err,
            heldout_error=held_err,
            default_heldout_error=base,
            model_calls=sum(st.calls for pair in pairs.values() for st in pair),
        )
        tried.append(record)
    pick = min(tried, key=lambda r: r["fit_error"])
    chosen = get_solver(solver, **{**options, **pick["options"]})

    def sigma_of(t: float) -> float:
        a, s = (float(v) for v in schedule.at(float(t)))
        return s / a if a > 0 else math.inf

    sig = [sigma_of(t) for t in pick["grid"]]
    return OptimizedGrid(
        grid=pick["grid"],
        sigmas=sig,
        solver=chosen.name,
        options=chosen.options(),
        steps=steps,
        model=model_identity(model),
        fit_error=pick["fit_error"],
        heldout_error=pick["heldout_error"],
        baseline={
            "grid": default_name if init is None else f"init {init!r}"[:200],
            "heldout_error": pick["default_heldout_error"],
        },
        search={
            "tiers": [pick["tier1"]["method"]]
            + (["refine"] if refine and steps > 1 and sweeps > 0 else [])
            + (["calls"] if tune_calls else []),
            "candidates": candidates,
            "trim": trim,
            "stop_early": stop_early,
            "end": lo,
            "samples": shape[0],
            "seed": seed,
            "heldout_seed": heldout_seed,
            "teacher": {"solver": teacher, "steps": len(fine) - 1, "agreement_at_half_steps": teacher_check},
            "tried": tried,
            "seconds": {"teacher": teacher_seconds, "total": time.perf_counter() - started},
        },
        teleport=(
            {"from": hi, "to": pick["grid"][0], "gaussian": teleport.fingerprint()}
            if teleport is not None and pick["grid"][0] < hi
            else None
        ),
        calls=None
        if pick["calls"] is None
        else {**pick["calls"], "sigmas": [sigma_of(t) for t in pick["calls"]["times"]]},
    )
