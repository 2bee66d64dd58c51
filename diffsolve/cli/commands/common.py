"""What the run commands (sample, invert, restore) share: the solver and grid the user asked for,
checked before any model is loaded; steps; and the small facts their manifests and folder names
record."""

from __future__ import annotations

import argparse
import platform
import shlex
from collections.abc import Sequence
from typing import Any

import torch

import diffsolve as ds

from ..errors import PROG, user_input, warn
from ..jsonform import jsonable

#: ``--grid`` as parsed: a kind, a kind with its parameters, explicit times, or None
GridArg = str | tuple[str, dict[str, Any]] | list[float] | None


def given(args: argparse.Namespace) -> set[str]:
    """The options given on the command line or in --config (set by main; empty otherwise)."""
    return getattr(args, "given", set())


def resolve_solver(name: str, options: dict) -> ds.samplers.Solver:
    """``--solver name`` with its ``-o`` options, built as a run will build it (an unknown name, option
    or option value is a CLIError)."""
    with user_input():
        return ds.get_solver(name, **options)


def solver_name(name: str) -> str:
    """The registered name of ``--solver name`` (an unknown one is a CLIError)."""
    with user_input():
        return ds.samplers.solver_info(name).name


def non_default_options(solver: str, options: dict) -> dict:
    """The options of ``solver`` (as it resolves them) that differ from its defaults."""
    resolved, default = resolve_solver(solver, options).options(), resolve_solver(solver, {}).options()
    return {k: v for k, v in resolved.items() if jsonable(v) != jsonable(default.get(k))}


def adaptive(solver: str) -> bool:
    """Whether ``solver`` chooses its own steps."""
    return not ds.samplers.solver_info(solver).fixed_grid


def steps_label(steps: int | None) -> str:
    """The steps in default folder names: "20steps", or "adaptive"."""
    return "adaptive" if steps is None else f"{steps}steps"


def run_steps(args: argparse.Namespace, solver: str) -> int | None:
    """The steps a run takes: ``args.steps``, or None for an adaptive solver (which chooses its own;
    a warning says so when --steps was given)."""
    if not adaptive(solver):
        return args.steps
    if "steps" in given(args):
        warn(f"--steps is ignored: {solver} is adaptive and chooses its own steps from t_max to t_min")
    return None


def check_grid_spec(grid: GridArg) -> None:
    """An explicit ``--grid`` of times: finite and strictly decreasing (a CLIError otherwise)."""
    if grid is not None and not ds.schedules.is_grid_kind(grid):
        with user_input():
            ds.schedules.check_grid(grid)


def check_time_grid(
    schedule: ds.schedules.Schedule,
    steps: int | None,
    grid: GridArg,
    t_max: float | None,
    t_min: float | None,
) -> None:
    """``--grid``, ``--steps``, ``--t-max`` and ``--t-min`` against the model's schedule, before the run
    (a CLIError where the library refuses them): an explicit grid's times and step count, else a time
    range inside the schedule's, t_min below t_max. What only a solver knows (an end it cannot start
    from) is checked by the run itself (:func:`~diffsolve.cli.errors.refusals_of`)."""
    with user_input():
        if grid is not None and not ds.schedules.is_grid_kind(grid):
            ds.schedules.make_grid(schedule, steps, grid)
        else:
            ds.schedules.make_grid(schedule, 1, "uniform", t_max=t_max, t_min=t_min)


def grid_kind(grid: GridArg) -> str:
    """The grid as manifests name it: its kind, "explicit" or "default"."""
    if isinstance(grid, str):
        return grid
    if grid is not None and ds.schedules.is_grid_kind(grid):
        return str(grid[0])
    return "explicit" if grid else "default"


def psnr(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Mean PSNR (dB) over images in [-1, 1]."""
    return float(ds.metrics.psnr(x, ref).mean())


def command_line(argv: Sequence[str]) -> str:
    """The command as the user typed it, for manifests."""
    return shlex.join([PROG, *argv])


def versions(python: bool = False) -> dict[str, Any]:
    """The versions a manifest records."""
    return {
        "diffsolve": ds.__version__,
        "torch": torch.__version__,
        **({"python": platform.python_version()} if python else {}),
    }


def device_of(name: str) -> torch.device:
    """``--device name`` checked by ``diffsolve.cli._check_device``, looked up on the package at each
    call: that is the name callers replace (the torchrun test fakes a GPU with it)."""
    from diffsolve import cli

    return cli._check_device(name)
