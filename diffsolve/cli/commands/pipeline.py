"""``diffsolve sample --pipeline PATH``: driver mode on a local diffusers pipeline folder (any
DiffusionPipeline), with a registered solver; writes the images, the latents and a manifest."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..errors import TIME_RANGE, CLIError, refusals_of, user_input, warn
from ..jsonform import decode_options, jsonable
from ..output import OUTPUT_FILES, check_out, default_out, write_atomically, write_bundle, wrote
from ..parser import DEFAULT_NUM_SAMPLES, DEFAULT_STEPS, flags
from ..render import image_grid
from .common import (
    check_grid_spec,
    command_line,
    device_of,
    given,
    grid_kind,
    non_default_options,
    resolve_solver,
    run_steps,
    steps_label,
    versions,
)


def run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """`diffsolve sample --pipeline`: returns the exit code."""
    if args.latent is not None:
        raise CLIError(
            "--latent does not apply with --pipeline (invert a pipeline's latents in Python with "
            "ds.integrations.diffusers.invert_pipeline)"
        )
    ignored = [n for n in ("model", "label", "shard_size", "compile") if n in given(args)]
    if ignored:
        warn(f"{flags(ignored)} ignored: not used with --pipeline")
    from diffusers import DiffusionPipeline

    from diffsolve.integrations.diffusers import sample_pipeline

    options = decode_options(dict(args.options))
    solver = args.solver or "dpmpp-2m"
    name = resolve_solver(solver, options).name
    check_grid_spec(args.grid)
    args.steps = DEFAULT_STEPS if args.steps is None else args.steps
    steps = run_steps(args, name)
    dtype = args.dtype or "float32"
    device = device_of(args.device)
    path = Path(args.pipeline)
    if not (path / "model_index.json").exists():
        raise CLIError(f"--pipeline {args.pipeline!r} is not a diffusers pipeline folder (no model_index.json)")
    settings = {
        "pipeline": str(path.resolve()),
        "prompt": args.prompt,
        "guidance_scale": args.guidance_scale,
        "num_samples": None if args.num_samples == DEFAULT_NUM_SAMPLES else args.num_samples,
        "options": non_default_options(name, options),
        "dtype": None if dtype == "float32" else dtype,
        "grid": args.grid,
        "t_max": args.t_max,
        "t_min": args.t_min,
    }
    out = (
        Path(args.out)
        if args.out
        else default_out(f"{path.name}-{name}-{steps_label(steps)}-seed{args.seed}", settings)
    )
    check_out(out, OUTPUT_FILES, args.force)
    with user_input(OSError, ValueError, prefix=f"--pipeline {args.pipeline!r}: "):
        pipe = DiffusionPipeline.from_pretrained(
            str(path), local_files_only=True, torch_dtype=getattr(torch, dtype)
        ).to(device)
    pipe.set_progress_bar_config(disable=True)
    gens = [torch.Generator(device).manual_seed(args.seed + i) for i in range(args.num_samples)]
    kw = {"prompt": args.prompt} if args.prompt is not None else {}
    if args.guidance_scale is not None:
        kw["guidance_scale"] = args.guidance_scale
    with refusals_of((*TIME_RANGE, *options)):
        res = sample_pipeline(
            pipe,
            solver,
            num_inference_steps=args.steps,
            num_images_per_prompt=args.num_samples,
            generator=gens,
            output_type="np",
            progress=not args.no_progress,
            grid=args.grid,
            t_max=args.t_max,
            t_min=args.t_min,
            **kw,
            **options,
        )
    images = torch.from_numpy(np.asarray(res.images)).permute(0, 3, 1, 2).contiguous()
    manifest = {
        "pipeline": str(path),
        "pipeline_class": type(pipe).__name__,
        "prompt": args.prompt,
        "guidance_scale": args.guidance_scale,
        "solver": name,
        "options": jsonable(options),
        "steps": steps,
        "seed": args.seed,
        "num_samples": args.num_samples,
        "dtype": dtype,
        "grid_kind": grid_kind(args.grid),
        "t_max": args.t_max,
        "t_min": args.t_min,
        "nfe": res.result.nfe,
        "wall_time": res.result.wall_time,
        "images": "in [0, 1], [N, C, H, W]",
        "command": command_line(argv),
        "versions": versions(),
    }
    image = image_grid((images * 2 - 1).numpy())
    tensors = {"images": images, "latents": res.latents.detach().float().cpu()}
    names = write_atomically(out, lambda tmp: write_bundle(tmp, OUTPUT_FILES, tensors, image, manifest))
    print(
        f"{name}: {args.num_samples} images from {type(pipe).__name__} ({path.name}), NFE {res.result.nfe}, "
        f"{res.result.wall_time:.2f} s"
    )
    wrote(out, names)
    return 0
