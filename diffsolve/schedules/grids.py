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
- kinds read off a model's own noise levels (:data:`MODEL_GRID_KINDS`): ComfyUI's ``"simple"``,
  ``"sgm-uniform"``, ``"normal"`` and ``"ddim-uniform"`` on a :class:`~diffsolve.schedules.VPDiscrete`
  schedule's table, and Align Your Steps' tables ``"ays-sd1"``, ``"ays-sdxl"`` (Stable Diffusion's
  discrete schedule, 14.6146 .. 0.0292) and ``"ays-svd"`` (EDM noise levels 700 .. 0.002),
  log-linearly interpolated to any step count. These start where the kind starts (``t_max`` may
  not be moved) and end, as ComfyUI's lists do, at noise level 0 (t = 0) unless ``t_min`` is given;
  any other schedule is refused.
- an explicit list or tensor of times (checked to be finite and strictly decreasing).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence

import torch

from . import named_grids as ng
from .base import Schedule, as_time
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
#: kinds read off one model's noise levels (a discrete table, or Align Your Steps' tables)
MODEL_GRID_KINDS = ("simple", "sgm-uniform", "normal", "ddim-uniform", *ng.AYS_TABLES)
ALL_GRID_KINDS = GRID_KINDS + RANGE_GRID_KINDS + MODEL_GRID_KINDS
#: other names of the same grids
GRID_ALIASES = {"exponential": "log-snr"}


def grid_kind_name(kind: str) -> str:
    """The canonical name of a grid kind: lower case, hyphens for ComfyUI's underscores
    (``"kl_optimal"`` -> ``"kl-optimal"``); raises a ValueError for unknown kinds."""
    name = kind.strip().lower().replace("_", "-")
    if name not in ALL_GRID_KINDS:
        raise ValueError(
            f"grid kind {kind!r} is unknown; allowed: {', '.join(ALL_GRID_KINDS)} or an explicit list of times"
        )
    return name


GridSpec = str | Sequence[float] | torch.Tensor


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
    rho: float | None = None,
    shift: float = 3.0,
    mu: float = 0.0,
    beta: float | None = None,
    alpha: float = 0.6,
) -> torch.Tensor:
    """A descending grid of ``steps + 1`` times for ``schedule`` (see the module docstring).

    Options of some kinds: ``rho`` (``"karras"``: 7, ``"polyexponential"``: 1), ``shift``
    (``"flow-shift"``), ``mu`` and ``beta`` (``"laplace"``: 0 and 0.5), ``alpha`` and ``beta``
    (``"beta-sigmas"``: 0.6 and 0.6).

    ``kind`` defaults to ``schedule.default_grid``. An explicit grid ignores ``steps``, ``t_max``
    and ``t_min`` (but if ``steps`` is given it must match).
    """
    if kind is None:
        kind = schedule.default_grid
    if not isinstance(kind, str):
        g = check_grid(kind)
        if steps is not None and _check_steps(steps) != len(g) - 1:
            raise ValueError(f"steps={steps} does not match the explicit grid of {len(g)} times ({len(g) - 1} steps)")
        check_times_in(schedule, g, ["grid"])
        return g
    kind = grid_kind_name(kind)
    kind = GRID_ALIASES.get(kind, kind)
    if steps is None:
        raise ValueError("steps is required unless an explicit grid is given")
    n = _check_steps(steps)
    if kind in MODEL_GRID_KINDS:
        return _model_grid(schedule, n, kind, t_max, t_min)
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
        if shift <= 0:
            raise ValueError(f"shift must be > 0, got {shift}")
        v = 1.0 - u
        v = shift * v / (1.0 + (shift - 1.0) * v)
        g = t_min + v * (t_max - t_min)
    elif kind == "linear-quadratic":
        g = t_min + ng.linear_quadratic(n) * (t_max - t_min)
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
                s = ng.karras(u, s_max, s_min, 7.0 if rho is None else rho)
            elif kind == "polyexponential":
                s = ng.polyexponential(u, s_max, s_min, 1.0 if rho is None else rho)
            elif kind == "vp":
                s = ng.vp(u, s_max, s_min)
            elif kind == "kl-optimal":
                s = ng.kl_optimal(u, s_max, s_min)
            elif kind == "laplace":
                s = ng.laplace(u, s_max, s_min, mu, 0.5 if beta is None else beta)
            else:  # beta-sigmas
                s = ng.beta_sigmas(u, s_max, s_min, alpha, 0.6 if beta is None else beta)
            lam = -torch.log(s)
        g = schedule.t_of_log_snr(lam)
    g = g.to(torch.float64).cpu()
    g[0], g[-1] = t_max, t_min
    if not bool((g[1:] < g[:-1]).all()):
        raise ValueError(f"grid {kind!r} with {n} steps is not strictly decreasing (too many steps for the range?)")
    return g


def _noise_level(schedule: Schedule, t: float) -> float:
    a, s = schedule.at(float(t))
    return s / a


def _model_grid(schedule: Schedule, n: int, kind: str, t_max: float | None, t_min: float | None) -> torch.Tensor:
    """A grid of :data:`MODEL_GRID_KINDS` (see the module docstring)."""
    if kind in ng.AYS_TABLES:
        table = ng.AYS_TABLES[kind]
        hi, lo = _noise_level(schedule, schedule.t_max), _noise_level(schedule, schedule.t_min)
        if not (math.isclose(hi, table[0], rel_tol=2e-3) and math.isclose(lo, table[-1], rel_tol=2e-3)):
            raise ValueError(
                f"grid kind {kind!r} is Align Your Steps' table for noise levels sigma/alpha from {table[0]:g} "
                f"to {table[-1]:g}, but {schedule!r} runs from {hi:.6g} to {lo:.6g}; it holds only for the "
                "model it was tuned on (ays-sd1 / ays-sdxl: Stable Diffusion's discrete scaled-linear "
                "schedule; ays-svd: EDM(sigma_min=0.002, sigma_max=700))"
            )
        start = float(schedule.t_max)
        inner = schedule.t_of_log_snr(-torch.log(ng.ays(table, n)[1:-1])).to(torch.float64)
    else:
        if not isinstance(schedule, VPDiscrete):
            raise ValueError(
                f"grid kind {kind!r} is read off a discrete model's table of noise levels; it needs a "
                f"VPDiscrete schedule, not {schedule!r}"
            )
        pts = schedule.t_of_timestep(ng.comfy_discrete(kind, schedule.num_train_timesteps, n)).to(torch.float64)
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
