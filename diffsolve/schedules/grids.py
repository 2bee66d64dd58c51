"""Descending time grids from t_max to t_min. Solvers never invent their own grids.

Every grid is a 1-D float64 CPU tensor of ``steps + 1`` strictly decreasing times, first
``t_max`` and last ``t_min`` (both exactly). Kinds:

- ``"uniform"``: uniform in t.
- ``"log-snr"``: uniform in lambda = log(alpha/sigma) (DPM-Solver's ``logSNR`` skip type).
- ``"karras"``: Karras et al. 2022, eq. 5, in the EDM noise level s = sigma/alpha = exp(-lambda):
  s_i = (s_max^(1/rho) + i/N (s_min^(1/rho) - s_max^(1/rho)))^rho, rho = 7 by default.
- ``"quadratic"``: uniform in sqrt(t) (DPM-Solver's ``time_quadratic``).
- ``"flow-shift"``: uniform u in [0, 1] mapped by SD3's shift u -> shift u / (1 + (shift - 1) u),
  then affinely onto [t_min, t_max] (on a rectified-flow schedule with t in [0, 1] this is exactly
  SD3's shifted sigmas).
- the kinds known by name in k-diffusion, ComfyUI and diffusers (see
  :mod:`diffsolve.schedules.named_grids` for each definition and its source), in the noise level
  s = sigma/alpha: ``"exponential"`` (uniform in log s: the same grid as ``"log-snr"``, an alias of
  it), ``"polyexponential"`` (``rho``, default 1), ``"vp"``, ``"kl-optimal"``, ``"laplace"`` (``mu``
  = 0, ``beta`` = 0.5), ``"beta-sigmas"`` (``alpha`` = ``beta`` = 0.6), and ``"linear-quadratic"``
  (Mochi, affinely in t). ComfyUI's spellings with underscores (``"kl_optimal"``) name the same kinds.
- kinds read off a discrete model's training timesteps (:data:`DISCRETE_GRID_KINDS`, on a
  :class:`~diffsolve.schedules.VPDiscrete` schedule's table): ComfyUI's ``"simple"``,
  ``"sgm-uniform"``, ``"normal"``, ``"ddim-uniform"``, ``"beta"`` (Beta(``alpha``, ``beta``)
  quantiles in timestep, 0.6 and 0.6; not diffusers' ``"beta-sigmas"``) and ``"sd-turbo"``
  (timesteps 999, 899, .., 99), and diffusers' ``timestep_spacing`` ``"leading"`` (``steps_offset``),
  ``"trailing"`` and ``"linspace"`` (``rounded`` as DDIM rounds it).
- published tables (:data:`TABLE_GRID_KINDS`, in :mod:`diffsolve.schedules.tables`), log-linearly
  interpolated to other step counts: Align Your Steps' ``"ays-sd1"``, ``"ays-sdxl"`` (Stable
  Diffusion's discrete schedule, 14.6146 .. 0.0292) and ``"ays-svd"`` (EDM noise levels 700 ..
  0.002); GITS' ``"gits"`` (``coeff`` 0.80 .. 1.50, default 1.20; rows for 2 .. 20 steps, past 20 the
  20-step row interpolated; Stable Diffusion 1.x's range); OptimalSteps' ``"optimal-steps"``
  (``model`` ``"flux"``, ``"wan"`` or ``"chroma"``; flow noise levels, on a
  :class:`~diffsolve.schedules.RectifiedFlow`). A schedule other than the table's is refused unless
  ``force=True``, which uses the table's noise levels as they are.

  These model kinds start where the kind starts (``t_max`` may not be moved) and end, as ComfyUI's
  and diffusers' lists do, at noise level 0 (t = 0) unless ``t_min`` is given.
- an explicit list or tensor of times (checked to be finite and strictly decreasing).

A kind's parameters are given as keywords of :func:`make_grid` or, wherever a grid is named
(``ds.sample(grid=...)``, ``DiffsolveScheduler(steps_grid=...)``), as a ``(kind, {parameters})``
pair: ``("karras", {"rho": 5})``; on the command line ``--grid karras:rho=5``.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from . import named_grids as ng
from .base import Schedule, Tensor, as_time
from .vp import VPDiscrete

GRID_KINDS = (
    "uniform",
    "log-snr",
    "karras",
    "quadratic",
    "flow-shift",
    "exponential",
    "polyexponential",
    "vp",
    "kl-optimal",
    "beta-sigmas",
    "linear-quadratic",
)
#: kinds that hold only on some ranges: ``"laplace"`` clamps, so a narrow range repeats its ends
RANGE_GRID_KINDS = ("laplace",)
#: kinds read off a discrete model's table of training timesteps (:class:`~diffsolve.schedules.VPDiscrete`)
DISCRETE_GRID_KINDS = (
    "simple",
    "sgm-uniform",
    "normal",
    "ddim-uniform",
    "beta",
    "sd-turbo",
    "leading",
    "trailing",
    "linspace",
)
#: published tables of noise levels, each for the models it was tuned on (``force=True`` for others)
TABLE_GRID_KINDS = (*ng.AYS_TABLES, "gits", "optimal-steps")
#: kinds read off one model's noise levels (a discrete table, or a published table)
MODEL_GRID_KINDS = DISCRETE_GRID_KINDS + TABLE_GRID_KINDS
ALL_GRID_KINDS = GRID_KINDS + RANGE_GRID_KINDS + MODEL_GRID_KINDS
#: other names of the same grids
GRID_ALIASES = {"exponential": "log-snr"}
#: the parameters each kind takes (as keywords of :func:`make_grid`, or in a ``(kind, {params})`` pair)
GRID_PARAMS: dict[str, tuple[str, ...]] = {
    "karras": ("rho",),
    "polyexponential": ("rho",),
    "flow-shift": ("shift",),
    "vp": ("beta_d", "beta_min", "eps_s"),
    "laplace": ("mu", "beta"),
    "beta-sigmas": ("alpha", "beta"),
    "linear-quadratic": ("threshold_noise", "linear_steps"),
    "beta": ("alpha", "beta"),
    "leading": ("steps_offset",),
    "linspace": ("rounded",),
    **dict.fromkeys(ng.AYS_TABLES, ("force",)),
    "gits": ("coeff", "force"),
    "optimal-steps": ("model", "force"),
}


def grid_kind_name(kind: str) -> str:
    """The canonical name of a grid kind: lower case, hyphens for ComfyUI's underscores
    (``"kl_optimal"`` -> ``"kl-optimal"``); raises a ValueError for unknown kinds."""
    name = kind.strip().lower().replace("_", "-")
    if name not in ALL_GRID_KINDS:
        raise ValueError(
            f"grid kind {kind!r} is unknown; allowed: {', '.join(ALL_GRID_KINDS)} or an explicit list of times"
        )
    return name


def is_grid_kind(grid) -> bool:
    """Whether ``grid`` names a kind (a name, or a ``(name, {parameters})`` pair) rather than listing times."""
    return isinstance(grid, str) or (
        isinstance(grid, (tuple, list)) and len(grid) == 2 and isinstance(grid[0], str) and isinstance(grid[1], Mapping)
    )


def grid_kind_params(grid) -> tuple[str, dict[str, Any]] | None:
    """``(canonical kind, parameters)`` of a grid kind given by name (``"karras"``) or as a pair of a
    name and its parameters (``("karras", {"rho": 5})``, or a list, as a JSON config stores it); None
    for an explicit grid of times. Unknown kinds and parameters the kind does not take are refused."""
    if isinstance(grid, str):
        return grid_kind_name(grid), {}
    if is_grid_kind(grid):
        kind = grid_kind_name(grid[0])
        params = dict(grid[1])
        _check_params(kind, params)
        return kind, params
    return None


def _check_params(kind: str, params: Mapping[str, Any]) -> None:
    allowed = GRID_PARAMS.get(kind, ())
    for k in params:
        if k not in allowed:
            takes = f"takes {', '.join(allowed)}" if allowed else "takes no parameters"
            raise ValueError(f"grid kind {kind!r} {takes}; got {k!r}")


#: a grid kind's name, a ``(name, {parameters})`` pair, or an explicit list or tensor of times
GridSpec = str | tuple[str, Mapping[str, Any]] | Sequence[float] | torch.Tensor


def _check_steps(steps) -> int:
    """``steps`` as a positive int (an integral float such as 20.0 is accepted; strings and bools are not)."""
    if isinstance(steps, (bool, str, bytes)):
        raise TypeError(f"steps must be a positive integer, got {steps!r}")
    try:
        n = operator.index(steps)
    except TypeError:
        try:
            n = int(steps)
            ok = float(steps) == n
        except (TypeError, ValueError, OverflowError):
            ok = False
        if not ok:
            raise TypeError(f"steps must be a positive integer, got {steps!r}") from None
    if n < 1:
        raise ValueError(f"steps must be a positive integer, got {n}")
    return n


def check_grid(grid) -> torch.Tensor:
    """Validate an explicit grid and return it as a float64 CPU tensor."""
    try:
        g = (
            torch.as_tensor(grid, dtype=torch.float64).detach().cpu()
            if not isinstance(grid, torch.Tensor)
            else grid.detach().to("cpu", torch.float64)
        )
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(
            f"grid must be a grid kind ({', '.join(GRID_KINDS)}) or a 1-D sequence of times, got {grid!r}"
        ) from None
    if g.ndim != 1 or len(g) < 2:
        raise ValueError(f"grid must be a 1-D sequence of at least 2 times, got shape {tuple(g.shape)}")
    if not bool(torch.isfinite(g).all()):
        raise ValueError("grid must contain only finite times")
    if not bool((g[1:] < g[:-1]).all()):
        raise ValueError("grid must be strictly decreasing (from t_max down to t_min)")
    return g


def _timestep_hint(schedule: Schedule, t: torch.Tensor) -> str:
    """A hint for times that look like diffusers' integer timesteps (999, 979, ..., 0)."""
    if not (float(t.max()) >= 10 and bool((t == t.round()).all())):
        return ""
    how = (
        "schedule.t_of_timestep(timesteps)" if hasattr(schedule, "t_of_timestep") else "timesteps / num_train_timesteps"
    )
    lo, hi = schedule.time_range
    return (
        f". These look like diffusers timesteps; diffsolve grids are times in the schedule's range "
        f"[{lo:g}, {hi:g}]: convert them ({how}), or step on a pipeline's own timesteps with "
        "diffsolve.integrations.diffusers.DiffsolveScheduler"
    )


def check_times_in(schedule: Schedule, times: torch.Tensor, names: Sequence[str]) -> None:
    """Raise a ValueError naming ``names[i]`` (``names[-1]`` for times past the list) unless every time
    lies in the schedule's :attr:`~Schedule.time_range` (0 to its t_max) and its domain: finite
    alpha(t) >= 0 and sigma(t) >= 0."""
    t = times.reshape(-1).to(torch.float64)
    lo, hi = schedule.time_range
    out = (t < lo) | (t > hi + 1e-12 * max(1.0, abs(hi)))
    if bool(out.any()):
        i = int(out.nonzero()[0])
        raise ValueError(
            f"{names[min(i, len(names) - 1)]}: t={float(t[i]):.6g} is outside the times of "
            f"{schedule!r}, [{lo:g}, {hi:.6g}]{_timestep_hint(schedule, t)}"
        )
    a, s = schedule.alpha(t), schedule.sigma(t)
    bad = (t < 0) | ~torch.isfinite(a) | ~torch.isfinite(s) | (a < 0) | (s < 0)
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise ValueError(
            f"{names[min(i, len(names) - 1)]}: t={float(t[i]):.6g} is outside the range of {schedule!r} "
            f"(alpha={float(a[i]):.4g}, sigma={float(s[i]):.4g}; times must be >= 0 with finite "
            "alpha, sigma >= 0)"
        )


def make_grid(
    schedule: Schedule,
    steps: int | None = None,
    kind: GridSpec | None = None,
    *,
    t_max: float | None = None,
    t_min: float | None = None,
    **params: Any,
) -> torch.Tensor:
    """A descending grid of ``steps + 1`` times for ``schedule`` (see the module docstring).

    ``kind`` is a kind's name, a ``(name, {parameters})`` pair (``("karras", {"rho": 5})``), or an
    explicit list of times; parameters may also be passed as keywords (``rho=5``). Each kind takes
    only its own (:data:`GRID_PARAMS`): ``rho`` (``"karras"``: 7, ``"polyexponential"``: 1), ``shift``
    (``"flow-shift"``: 3), ``beta_d``, ``beta_min`` (``"vp"``: 19.9, 0.1) and ``eps_s`` (``"vp"``: when
    given, k-diffusion's own ends tau = 1 .. eps_s instead of the schedule's), ``mu`` and ``beta``
    (``"laplace"``: 0 and 0.5), ``alpha`` and ``beta`` (``"beta-sigmas"`` and ``"beta"``: 0.6 and 0.6),
    ``threshold_noise`` and ``linear_steps`` (``"linear-quadratic"``: 0.025 and steps // 2),
    ``steps_offset`` (``"leading"``: 0), ``rounded`` (``"linspace"``: False), ``coeff`` (``"gits"``:
    1.20), ``model`` (``"optimal-steps"``: ``"flux"``, ``"wan"`` or ``"chroma"``) and ``force`` (the
    tabulated kinds: use the table on a model it was not made for).

    ``kind`` defaults to ``schedule.default_grid``. An explicit grid ignores ``steps``, ``t_max``
    and ``t_min`` (but if ``steps`` is given it must match).
    """
    if kind is None:
        kind = schedule.default_grid
    named = grid_kind_params(kind)
    if named is None:
        if params:
            raise ValueError(f"an explicit grid takes no grid parameters, got {', '.join(params)}")
        g = check_grid(kind)
        if steps is not None and _check_steps(steps) != len(g) - 1:
            raise ValueError(f"steps={steps} does not match the explicit grid of {len(g)} times ({len(g) - 1} steps)")
        check_times_in(schedule, g, ["grid"])
        return g
    kind, given = named
    _check_params(kind, params)
    both = sorted(set(given) & set(params))
    if both:
        raise ValueError(f"grid parameter(s) {', '.join(both)} given twice (in the grid pair and as keywords)")
    p = {**given, **params}
    kind = GRID_ALIASES.get(kind, kind)
    if steps is None:
        raise ValueError("steps is required unless an explicit grid is given")
    n = _check_steps(steps)
    if kind in MODEL_GRID_KINDS:
        return _model_grid(schedule, n, kind, t_max, t_min, p)
    if kind == "vp" and p.get("eps_s") is not None:
        if t_max is not None or t_min is not None:
            raise ValueError("grid kind 'vp' with eps_s runs between k-diffusion's own ends: leave t_max / t_min out")
        t_max, t_min = _vp_ends(schedule, p)
    t_max = schedule.t_max if t_max is None else float(t_max)
    t_min = schedule.t_min if t_min is None else float(t_min)
    if not t_min < t_max:
        raise ValueError(f"t_min must be < t_max, got t_min={t_min}, t_max={t_max}")
    check_times_in(schedule, torch.tensor([t_max, t_min], dtype=torch.float64), ["t_max", "t_min"])
    u = torch.linspace(0.0, 1.0, n + 1, dtype=torch.float64)  # 0 at t_max, 1 at t_min

    if kind == "uniform":
        g = t_max + u * (t_min - t_max)
    elif kind == "quadratic":
        g = (math.sqrt(t_max) + u * (math.sqrt(t_min) - math.sqrt(t_max))) ** 2
    elif kind == "flow-shift":
        shift = float(p.get("shift", 3.0))
        if shift <= 0:
            raise ValueError(f"shift must be > 0, got {shift}")
        v = 1.0 - u
        v = shift * v / (1.0 + (shift - 1.0) * v)
        g = t_min + v * (t_max - t_min)
    elif kind == "linear-quadratic":
        f = ng.linear_quadratic(n, float(p.get("threshold_noise", 0.025)), p.get("linear_steps"))
        g = t_min + f * (t_max - t_min)
    else:
        lam_hi = float(schedule.log_snr(as_time(t_max)))  # at t_max: lowest log-SNR
        lam_lo = float(schedule.log_snr(as_time(t_min)))
        if not (math.isfinite(lam_hi) and math.isfinite(lam_lo)):
            raise ValueError(
                f"grid kind {kind!r} needs a finite log-SNR at both ends, but log_snr(t_max={t_max}) = {lam_hi} "
                f"and log_snr(t_min={t_min}) = {lam_lo}; pass t_min/t_max strictly inside the schedule's range "
                "or use kind='uniform'"
            )
        if kind == "log-snr":
            lam = lam_hi + u * (lam_lo - lam_hi)
        else:  # the kinds defined in the EDM noise level s = sigma/alpha = exp(-lambda)
            s_max, s_min = math.exp(-lam_hi), math.exp(-lam_lo)
            if kind == "karras":
                s = ng.karras(u, s_max, s_min, float(p.get("rho", 7.0)))
            elif kind == "polyexponential":
                s = ng.polyexponential(u, s_max, s_min, float(p.get("rho", 1.0)))
            elif kind == "vp":
                s = ng.vp(u, s_max, s_min, float(p.get("beta_d", 19.9)), float(p.get("beta_min", 0.1)))
            elif kind == "kl-optimal":
                s = ng.kl_optimal(u, s_max, s_min)
            elif kind == "laplace":
                s = ng.laplace(u, s_max, s_min, float(p.get("mu", 0.0)), float(p.get("beta", 0.5)))
            else:  # beta-sigmas
                s = ng.beta_sigmas(u, s_max, s_min, float(p.get("alpha", 0.6)), float(p.get("beta", 0.6)))
            lam = -torch.log(s)
        g = schedule.t_of_log_snr(lam)
    g = g.to(torch.float64).cpu()
    g[0], g[-1] = t_max, t_min
    if not bool((g[1:] < g[:-1]).all()):
        raise ValueError(f"grid {kind!r} with {n} steps is not strictly decreasing (too many steps for the range?)")
    return g


def _vp_ends(schedule: Schedule, p: Mapping[str, Any]) -> tuple[float, float]:
    """The times where ``schedule``'s noise level is the VP SDE's at tau = 1 and tau = ``eps_s``."""
    eps_s = float(p["eps_s"])
    if not 0 < eps_s < 1:
        raise ValueError(f"eps_s must be in (0, 1), got {eps_s}")
    bd, bm = float(p.get("beta_d", 19.9)), float(p.get("beta_min", 0.1))
    if not (bd >= 0 and bm >= 0 and bd + bm > 0):
        raise ValueError(f"beta_d, beta_min must be >= 0 and not both 0, got {bd}, {bm}")
    tau = torch.tensor([1.0, eps_s], dtype=torch.float64)
    s = torch.sqrt(torch.expm1(0.5 * bd * tau * tau + bm * tau))
    t = schedule.t_of_log_snr(-torch.log(s)).to(torch.float64)
    check_times_in(schedule, t, ["t_max (the VP SDE's tau = 1)", "t_min (tau = eps_s)"])
    return float(t[0]), float(t[1])


def _noise_level(schedule: Schedule, t: float) -> float:
    a, s = schedule.at(float(t))
    return s / a


def _table_points(schedule: Schedule, n: int, kind: str, p: Mapping[str, Any]) -> tuple[Tensor, bool]:
    """A tabulated kind's ``n + 1`` noise levels sigma/alpha (the last one stands for the clean end)
    and whether it starts at the schedule's own t_max (its range matched the table's)."""
    force = bool(p.get("force", False))
    if kind == "optimal-steps":
        from .flow import RectifiedFlow

        sig = ng.optimal_steps(n, p.get("model", "flux"))
        if not (force or isinstance(schedule, RectifiedFlow)):
            raise ValueError(
                f"grid kind 'optimal-steps' is a table of flow noise levels sigma in [0, 1] (FLUX, Wan, Chroma); "
                f"{schedule!r} is not a RectifiedFlow schedule (pass force=True to use the table's sigma/(1 - sigma) "
                "as noise levels anyway)"
            )
        return sig / (1.0 - sig), False
    if kind == "gits":
        lev, table = ng.gits(n, float(p.get("coeff", 1.20))), ng.GITS_TABLES[1.20][0]
        what, model = "GITS' tables", "Stable Diffusion 1.x's discrete scaled-linear schedule"
    else:
        table = ng.AYS_TABLES[kind]
        lev, what = ng.loglinear(table, n), "Align Your Steps' table"
        model = (
            "ays-sd1 / ays-sdxl: Stable Diffusion's discrete scaled-linear schedule; ays-svd: "
            "EDM(sigma_min=0.002, sigma_max=700)"
        )
    hi, lo = _noise_level(schedule, schedule.t_max), _noise_level(schedule, schedule.t_min)
    if math.isclose(hi, table[0], rel_tol=2e-3) and math.isclose(lo, table[-1], rel_tol=2e-3):
        return lev, True
    if not force:
        raise ValueError(
            f"grid kind {kind!r} is {what} for noise levels sigma/alpha from {table[0]:g} to {table[-1]:g}, "
            f"but {schedule!r} runs from {hi:.6g} to {lo:.6g}; it holds only for the model it was tuned on "
            f"({model}); pass force=True to use its noise levels anyway"
        )
    return lev, False


def _model_grid(
    schedule: Schedule, n: int, kind: str, t_max: float | None, t_min: float | None, p: Mapping[str, Any]
) -> torch.Tensor:
    """A grid of :data:`MODEL_GRID_KINDS` (see the module docstring)."""
    if kind in TABLE_GRID_KINDS:
        lev, own_start = _table_points(schedule, n, kind, p)
        pts = schedule.t_of_log_snr(-torch.log(lev[:-1])).to(torch.float64).cpu()
        start, inner = (float(schedule.t_max) if own_start else float(pts[0])), pts[1:]
        check_times_in(schedule, pts[:1], [f"the first point of {kind!r}"])
    else:
        if not isinstance(schedule, VPDiscrete):
            raise ValueError(
                f"grid kind {kind!r} is read off a discrete model's table of noise levels; it needs a "
                f"VPDiscrete schedule, not {schedule!r}"
            )
        pts = schedule.t_of_timestep(_timesteps(schedule.num_train_timesteps, n, kind, p)).to(torch.float64)
        start, inner = float(pts[0]), pts[1:]
        if start > schedule.t_max:
            raise ValueError(f"grid kind {kind!r} starts at t={start:.6g}, past {schedule!r}'s t_max")
    if t_max is not None and float(t_max) != start:
        raise ValueError(f"grid kind {kind!r} starts at t={start:.6g}; leave t_max out (got t_max={t_max})")
    end = 0.0 if t_min is None else float(t_min)
    g = torch.cat([torch.tensor([start], dtype=torch.float64), inner.cpu(), torch.tensor([end], dtype=torch.float64)])
    check_times_in(schedule, g[-1:], ["t_min"])
    if not bool((g[1:] < g[:-1]).all()):
        raise ValueError(
            f"grid {kind!r} with {n} steps is not strictly decreasing (t_min={end:.6g} must lie below its last "
            f"point t={float(g[-2]):.6g})"
        )
    return g


def _timesteps(num_train_timesteps: int, n: int, kind: str, p: Mapping[str, Any]) -> Tensor:
    """The ``n`` diffusers timesteps of a :data:`DISCRETE_GRID_KINDS` kind on N training steps."""
    N = num_train_timesteps
    if kind == "beta":
        ts = ng.comfy_beta(N, n, float(p.get("alpha", 0.6)), float(p.get("beta", 0.6)))
        if len(ts) != n:
            raise ValueError(
                f"grid kind 'beta' gives {len(ts)} steps, not {n}, on {N} training steps (as ComfyUI's beta "
                "scheduler: its quantiles round to repeated training timesteps, which it drops); ask for fewer steps"
            )
        return ts
    if kind == "sd-turbo":
        if N != 1000:
            raise ValueError(f"grid kind 'sd-turbo' lists timesteps 999, 899, .., 99 of 1000 training steps, not {N}")
        return ng.sd_turbo(n)
    if kind in ("leading", "trailing", "linspace"):
        off = p.get("steps_offset", 0)
        if isinstance(off, bool) or int(off) != off or not 0 <= int(off) < N:
            raise ValueError(f"steps_offset must be an integer in 0..{N - 1}, got {off!r}")
        ts = ng.diffusers_spacing(kind, N, n, int(off), bool(p.get("rounded", False)))
        if float(ts[0]) > N - 1 or not bool((ts[1:] < ts[:-1]).all()):
            raise ValueError(
                f"grid kind {kind!r} with {n} steps on {N} training steps lists timesteps "
                f"{ts[0]:g} .. {ts[-1]:g} that are not strictly decreasing below {N}"
            )
        return ts
    return ng.comfy_discrete(kind, N, n)
