"""`diffsolve optimize-grid`: fit a step grid to a built-in model and a solver (:func:`diffsolve.optimize_grid`)
and save it as a JSON file that `diffsolve sample --grid FILE` (and ``ds.sample(grid=FILE)``) takes."""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from pathlib import Path

import torch

import diffsolve as ds

from ..errors import CLIError, user_input
from ..jsonform import decode_options
from ..models import DEFAULT_MODEL, build_target, model_label, teleport_gaussian
from .common import resolve_solver

DEFAULT_SOLVER = "dpmpp-2m"


def run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """`diffsolve optimize-grid`: returns the exit code (0; usage errors are CLIErrors)."""
    options = decode_options(dict(args.options))
    solver = resolve_solver(args.solver, options)
    model_name = args.model or DEFAULT_MODEL
    out = Path(args.out or f"diffsolve-out/grid-{model_label(model_name)}-{solver.name}-{args.steps}steps.json")
    if out.exists() and not args.force:
        raise CLIError(f"{out} exists; pass --force to overwrite it")
    target = build_target(model_name, "cpu", torch.float32)
    model, cond, uncond = target.model, {}, None
    k = args.samples
    if target.classes is not None:
        n, null = target.classes["num_classes"], target.classes["null_class"]
        scale = 1.0 if args.guidance_scale is None else args.guidance_scale
        if not math.isfinite(scale):
            raise CLIError(f"--guidance-scale must be a finite number, got {scale}")
        cond = {"class_labels": torch.arange(k) % n}  # every class alike
        uncond = {"class_labels": torch.tensor(null)}
        if scale != 1:
            model = ds.guidance.ClassifierFreeGuidance(model, scale)
    elif args.guidance_scale is not None:
        raise CLIError(f"--guidance-scale needs a class-conditional model; {model_name} is not one")
    mu = target.condition(k, args.seed)[0] if target.condition is not None else None
    with user_input():
        grid = ds.optimize_grid(
            model,
            args.solver,
            args.steps,
            shape=(k, *target.event_shape),
            seed=args.seed,
            candidates=args.candidates,
            refine=not args.no_refine,
            cond=cond,
            uncond=uncond if isinstance(model, ds.guidance.ClassifierFreeGuidance) else None,
            mu=mu,
            stop_early=args.stop_early,
            teleport=teleport_gaussian(model_name) if args.teleport else None,
            tune_calls=args.tune_calls,
            **options,
        )
    grid.search["command"] = {"model": model_name, "guidance_scale": args.guidance_scale}
    grid.save(out, force=args.force)
    secs = grid.search["seconds"]["total"]
    print(
        f"{grid.solver}, {grid.steps} steps on {model_name}: held-out error {grid.heldout_error:.4g} against "
        f"{grid.baseline['heldout_error']:.4g} on the default grid ({grid.baseline['grid']}); "
        f"{' + '.join(grid.search['tiers'])} in {secs:.1f} s"
    )
    print("grid (t):", ", ".join(f"{t:.6g}" for t in grid.grid))
    if grid.teleport is not None:
        print(f"hands over at t={grid.teleport['to']:.6g} from the training data's Gaussian (no model call)")
    if grid.calls is not None:
        print("model asked at (t):", ", ".join(f"{t:.6g}" for t in grid.calls["times"]))
        print("data weights:", ", ".join(f"{w:.4g}" for w in grid.calls["data_weights"]))
    print(f"wrote {out}; sample with: diffsolve sample --model {model_name} --grid {out}")
    return 0
