"""``diffsolve invert``: map samples (as ``diffsolve sample`` writes them) to the latent at t_max with a
deterministic or reversible solver; writes latent.safetensors and manifest.json, which
``diffsolve sample --latent`` samples back."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch

import diffsolve as ds

from ..errors import TIME_RANGE, CLIError, refusals_of, user_input
from ..jsonform import decode_options, file_digest
from ..models import DEFAULT_MODEL, build_target, model_label, model_path
from ..output import LATENT_FILES, OUTPUT_FILES, check_out, default_out, umask_mode, write_atomically, wrote
from .common import (
    check_grid_spec,
    check_time_grid,
    command_line,
    grid_kind,
    non_default_options,
    resolve_solver,
    run_steps,
    steps_label,
    versions,
)


def run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """`diffsolve invert`: returns the exit code."""
    from safetensors import SafetensorError, safe_open

    options = decode_options(dict(args.options))
    solver = resolve_solver(args.solver, options)
    with user_input():
        ds.samplers.check_invertible(solver)  # before any file is read or model loaded
    name = solver.name
    check_grid_spec(args.grid)
    steps = run_steps(args, name)
    src = Path(args.input)
    src = src / OUTPUT_FILES[0] if src.is_dir() else src
    if not src.exists():
        raise CLIError(f"--input {args.input!r}: no such file")
    with (
        user_input(OSError, SafetensorError, prefix=f"--input {args.input!r}: "),
        safe_open(str(src), framework="pt") as f,
    ):
        if "samples" not in set(f.keys()):
            raise CLIError(f"--input {args.input!r} holds no 'samples' tensor (write one with `diffsolve sample`)")
        x0, recorded = f.get_tensor("samples"), (f.metadata() or {}).get("model")
    args.model = args.model or recorded or DEFAULT_MODEL
    settings = {
        "input": file_digest(src),
        "model_path": model_path(args.model),
        "options": non_default_options(name, options),
        "dtype": None if args.dtype == "float32" else args.dtype,
        "grid": args.grid,
        "t_max": args.t_max,
        "t_min": args.t_min,
    }
    out = (
        Path(args.out)
        if args.out
        else default_out(f"{model_label(args.model)}-{name}-{steps_label(steps)}-latent", settings)
    )
    check_out(out, LATENT_FILES, args.force)
    dtype = getattr(torch, args.dtype)
    target = build_target(args.model, torch.device("cpu"), dtype)
    if target.condition is not None:
        raise CLIError(f"--model {args.model}: inverting a conditional (restoration) model is not supported here")
    with user_input(prefix=f"--model {args.model}: "):
        target.model.check_inputs(None, {})  # a model that needs inputs invert does not give
    if tuple(x0.shape[1:]) != target.event_shape:
        raise CLIError(
            f"--input {args.input!r} holds samples of shape {tuple(x0.shape[1:])} (made with --model "
            f"{recorded or '?'}); --model {args.model} samples {target.event_shape}"
        )
    check_time_grid(target.model.schedule, steps, args.grid, args.t_max, args.t_min)
    x0 = x0.to(dtype)
    with refusals_of((*TIME_RANGE, *options)):
        lat = ds.invert(
            target.model,
            args.solver,
            x0,
            steps,
            grid=args.grid,
            t_max=args.t_max,
            t_min=args.t_min,
            progress=not args.no_progress,
            **options,
        )
    # Latent.save writes the latent's own fields (x, aux, grid, solver, options, nfe, dtype); the rest
    # of the run goes into its manifest beside them
    extra = {
        "model": args.model,
        "input": str(src),
        "steps": steps,
        "grid_kind": grid_kind(args.grid),
        "t_max": args.t_max,
        "t_min": args.t_min,
        "shape": list(lat.x.shape),
        "exact": lat.aux is not None,
        "command": command_line(argv),
        "versions": versions(),
    }

    def write(tmp: Path) -> list[str]:
        lat.save(tmp, manifest=extra)
        umask_mode(tmp, LATENT_FILES[0], LATENT_FILES[1])
        return list(LATENT_FILES)

    names = write_atomically(out, write)
    kind = "an exact latent (two states)" if lat.aux is not None else "a latent (approximate inversion)"
    how = f"in {steps} steps" if steps is not None else "(adaptive steps)"
    print(f"{lat.solver}: {kind} for {len(x0)} samples {how}, NFE {lat.nfe}")
    wrote(out, names)
    return 0
