"""``diffsolve sample``: sample a catalogue model (or a diffusers folder) shard by shard, and write
samples.safetensors, samples.png and manifest.json into the output folder. ``--pipeline`` runs a
diffusers pipeline instead (:mod:`.pipeline`)."""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import math
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

import diffsolve as ds

from ..devices import rank_device
from ..errors import TIME_RANGE, CLIError, refusals_of
from ..jsonform import decode_options, file_digest, jsonable
from ..models import DEFAULT_MODEL, Target, build_target, model_label, model_path, teleport_gaussian
from ..output import OUTPUT_FILES, check_out, default_out, write_atomically, write_bundle, wrote
from ..parser import DEFAULT_CFGPP_GUIDANCE, DEFAULT_GUIDANCE, DEFAULT_NUM_SAMPLES, DEFAULT_STEPS
from ..render import panel_image, render_png
from ..shards import SHARD_DIR, after_failure, barrier, distributed, load_shards, prepare_shards, save_shard, shard_path
from .common import (
    adaptive,
    check_grid_spec,
    check_time_grid,
    command_line,
    device_of,
    grid_kind,
    non_default_options,
    psnr,
    resolve_solver,
    run_steps,
    solver_name,
    steps_label,
    versions,
)
from .latent import check_latent_solver, latent_defaults, load_latent


def run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """`diffsolve sample`: returns the exit code (0; usage errors are CLIErrors)."""
    if args.pipeline is not None:
        from .pipeline import run as run_pipeline

        return run_pipeline(args, argv)
    if args.prompt is not None:
        raise CLIError("--prompt needs --pipeline (a text-to-image diffusers pipeline folder)")
    options = decode_options(dict(args.options))
    latent = latent_file = None
    if args.latent:
        latent, meta, latent_file = load_latent(args.latent)
        latent_defaults(args, latent, meta)
        if solver_name(args.solver) == latent.solver:
            options = {**latent.options, **options}
    args.model = args.model or DEFAULT_MODEL
    args.dtype = args.dtype or "float32"
    optimized = None
    if ds.optimize.is_grid_file(args.grid):  # an optimized grid: its steps, its solver's options
        optimized = ds.OptimizedGrid.load(args.grid)
        args.solver = args.solver or optimized.solver
        if args.steps is not None and args.steps != optimized.steps:
            raise CLIError(
                f"--steps {args.steps} but --grid {args.grid} has {optimized.steps} steps: leave --steps out"
            )
        args.steps = optimized.steps
        if solver_name(args.solver) == optimized.solver and not options:
            options = dict(optimized.options)
    args.solver = args.solver or "dpmpp-2m"
    args.steps = DEFAULT_STEPS if args.steps is None else args.steps
    # a grid fitted with a teleport hands over from the model's training-data Gaussian
    teleport = teleport_gaussian(args.model) if optimized is not None and optimized.teleport else None
    # Validate the cheap things first: solver name and options, grid, device, output directory.
    solver = resolve_solver(args.solver, options)
    name = solver.name
    if latent is not None:
        check_latent_solver(latent, name, args.latent)
    check_grid_spec(args.grid)
    steps = (None if adaptive(name) else args.steps) if latent is not None else run_steps(args, name)
    device = device_of(rank_device(args.device))
    settings = {
        "model_path": model_path(args.model),
        "num_samples": None if latent is not None or args.num_samples == DEFAULT_NUM_SAMPLES else args.num_samples,
        "options": non_default_options(name, options),
        "dtype": None if args.dtype == "float32" else args.dtype,
        "grid": args.grid,
        "t_max": args.t_max,
        "t_min": args.t_min,
        "latent": None if latent_file is None else file_digest(latent_file),
        "class": args.label,
        "guidance_scale": None if args.guidance_scale in (None, DEFAULT_GUIDANCE) else args.guidance_scale,
    }
    out = (
        Path(args.out)
        if args.out
        else default_out(f"{model_label(args.model)}-{name}-{steps_label(steps)}-seed{args.seed}", settings)
    )
    check_out(out, OUTPUT_FILES, args.force)

    # the network lives where the samples are drawn, in their precision
    target = build_target(args.model, device, getattr(torch, args.dtype))
    if latent is not None and tuple(latent.x.shape[1:]) != target.event_shape:
        raise CLIError(
            f"--latent {args.latent!r} holds samples of shape {tuple(latent.x.shape[1:])} (made with "
            f"--model {meta.get('model', '?')}); --model {args.model} samples {target.event_shape}"
        )
    if latent is None:
        check_time_grid(target.model.schedule, steps, args.grid, args.t_max, args.t_min)
    if args.compile:
        target.model = target.model.compile()
    model, labels, uncond, scale = class_conditioning(target, args, solver)
    rank, world = distributed(device)
    k = args.num_samples
    size = min(k, args.shard_size)
    n_shards = math.ceil(k / size)
    mu = clean = None
    if target.condition is not None:
        mu, clean = target.condition(k, args.seed)
    shard_dir = out / SHARD_DIR
    spec = {
        "model": args.model,
        "solver": name,
        "options": jsonable(options),
        "steps": steps,
        "latent": args.latent,
        "seed": args.seed,
        "num_samples": k,
        "shard_size": size,
        "grid": jsonable(args.grid),
        "t_max": args.t_max,
        "t_min": args.t_min,
        "dtype": args.dtype,
        "device": device.type,
        "class": args.label,
        "guidance_scale": scale,
    }
    out_existed = out.exists()
    if rank == 0:
        done = prepare_shards(shard_dir, spec, args.force)
        if done:
            print(f"resuming {out}: {done} of {n_shards} shards already done")
    barrier(world)

    try:
        for j in range(rank, n_shards, world):
            path = shard_path(shard_dir, j)
            if path.exists():
                continue
            lo, hi = j * size, min(k, (j + 1) * size)
            start: dict[str, Any] = {"seed": [args.seed + i for i in range(lo, hi)]}
            if latent is not None:
                start["latent"] = dataclasses.replace(
                    latent,
                    x=latent.x[lo:hi].to(device),
                    aux=None if latent.aux is None else latent.aux[lo:hi].to(device),
                )
            else:
                start.update(
                    steps=steps,
                    shape=(hi - lo, *target.event_shape),
                    grid=args.grid,
                    t_max=args.t_max,
                    t_min=args.t_min,
                    teleport=teleport,
                )
            if labels is not None:
                start["cond"], start["uncond"] = {"class_labels": labels[lo:hi].to(device)}, uncond
            with refusals_of((*TIME_RANGE, *options)):
                result = ds.sample(
                    model,
                    args.solver,
                    device=device,
                    dtype=args.dtype,
                    progress=not args.no_progress,
                    mu=None if mu is None else mu[lo:hi],
                    **start,
                    **options,
                )
            save_shard(path, result)
    except BaseException as e:
        if rank == 0:
            saved = after_failure(out, shard_dir, out_existed)
            if isinstance(e, KeyboardInterrupt):
                raise KeyboardInterrupt(
                    f"{saved} of {n_shards} shards are saved in {shard_dir}; rerun the same command to resume"
                    if saved
                    else "no shard was finished, nothing is saved"
                ) from None
        raise
    barrier(world)
    if rank != 0:
        return 0

    samples, nfe_per_sample, metas = load_shards(shard_dir, n_shards)
    nfe = max(int(m["nfe"]) for m in metas)
    wall = sum(float(m["wall_time"]) for m in metas)
    manifest = {
        "solver": name,
        "options": json.loads(metas[0]["options"]),
        "model": args.model,
        "steps": steps,
        "seed": args.seed,
        "num_samples": k,
        "shape": list(samples.shape),
        "grid": json.loads(metas[0]["grid"]),
        "grid_kind": grid_kind(args.grid),
        "t_max": args.t_max,
        "t_min": args.t_min,
        **({"latent": args.latent} if latent is not None else {}),
        "nfe": nfe,
        "nfe_total": int(nfe_per_sample.sum()),
        "wall_time": wall,
        "shards": n_shards,
        "shard_size": size,
        "world_size": world,
        "device": str(device),
        "dtype": args.dtype,
        **(
            {"class": args.label if args.label is not None else "i mod num_classes", "guidance_scale": scale}
            if labels is not None
            else {}
        ),
        "versions": versions(python=True),
        "command": command_line(argv),
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if mu is not None and clean is not None:  # restoration: labelled rows of degraded / restored / clean digits
        rows = [("degraded", mu), (f"restored ({name})", samples), ("clean", clean)]
        image, cols = panel_image(rows)
        manifest["restoration"] = {
            "png_rows": [n for n, _ in rows],
            "png_columns": cols,
            "psnr_db": psnr(samples, clean),
            "psnr_degraded_db": psnr(mu, clean),
        }
    else:
        image = render_png(samples)

    def write(tmp: Path) -> list[str]:
        return write_bundle(
            tmp,
            OUTPUT_FILES,
            {"samples": samples, "nfe_per_sample": nfe_per_sample},
            image,
            manifest,
            metadata={
                "solver": name,
                "model": args.model,
                "steps": str(steps),
                "seed": str(args.seed),
                "dtype": args.dtype,
            },
        )

    check_out(out, OUTPUT_FILES, args.force)  # again: another run may have written meanwhile
    names = write_atomically(out, write)
    shutil.rmtree(shard_dir, ignore_errors=True)

    how = f"in {steps} steps" if steps is not None else "(adaptive steps)"
    print(
        f"{name}: {k} samples of {args.model} {how}, "
        f"NFE {nfe}, {wall:.2f} s ({device}, {args.dtype}, {n_shards} shard(s), {world} process(es))"
    )
    wrote(out, names)
    if image is None:
        print(f"(no samples.png: samples of shape {tuple(samples.shape)} are neither 2-D points nor images)")
    return 0


def class_conditioning(target: Target, args: argparse.Namespace, solver: ds.samplers.Solver):
    """(model to sample, per-sample labels or None, uncond inputs, guidance scale) from --class and
    --guidance-scale. A CFG++ solver name (``solver.cfg_pp``) always guides: ds.sample runs the
    ClassifierFreeGuidance as CFGPlusPlus, with --guidance-scale as lambda (default 0.6)."""
    if target.classes is None:
        if args.label is not None or args.guidance_scale is not None or solver.cfg_pp:
            conditional = [n for n in ds.pretrained.SHIPPED if ds.pretrained.classes(n)]
            what = f"--solver {args.solver}" if solver.cfg_pp else "--class and --guidance-scale"
            raise CLIError(
                f"{what} need{'s' * solver.cfg_pp} a class-conditional model ({', '.join(conditional)}); "
                f"{args.model} is not one"
            )
        return target.model, None, None, None
    n, null = target.classes["num_classes"], target.classes["null_class"]
    if args.label is not None and args.label >= n:
        raise CLIError(f"--class must be in 0..{n - 1}, got {args.label}")
    default = DEFAULT_CFGPP_GUIDANCE if solver.cfg_pp else DEFAULT_GUIDANCE
    scale = default if args.guidance_scale is None else args.guidance_scale
    if not math.isfinite(scale):
        raise CLIError(f"--guidance-scale must be a finite number, got {scale}")
    k = args.num_samples
    labels = torch.full((k,), args.label) if args.label is not None else torch.arange(k) % n
    uncond = {"class_labels": torch.tensor(null)}
    if scale == 1 and not solver.cfg_pp:
        return target.model, labels, uncond, scale
    model = ds.guidance.ClassifierFreeGuidance(target.model, scale)
    try:
        model.for_solver(solver)  # CFG++'s lambda checked before the run
    except ValueError as e:
        raise CLIError(f"--guidance-scale: {e}") from None
    return model, labels, uncond, scale
