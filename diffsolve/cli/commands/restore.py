"""``diffsolve restore``: solve an inverse problem (inpainting, deblurring) on the first held-out
digits with DPS, EnKG, Inpaint, RePaint or D-Flow, beside unguided samples of the same seeds; writes
restored.safetensors, restore.png (rows: degraded / restored / unguided / clean) and manifest.json."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch

from ..errors import CLIError, refusals_of
from ..jsonform import jsonable
from ..models import MODELS, build_target
from ..output import RESTORE_FILES, check_out, default_out, write_atomically, write_bundle, wrote
from ..render import panel_image
from .common import command_line, psnr, resolve_solver, versions


def check_method_options(method: str, options: dict) -> None:
    """``-o`` names only options of ``method`` (a CLIError otherwise, before any model is loaded)."""
    from diffsolve.guidance.tasks import DEFAULTS, MORE_OPTIONS

    allowed = {*DEFAULTS[method][1], *MORE_OPTIONS.get(method, ())}
    unknown = set(options) - allowed
    if unknown:
        raise CLIError(f"options {sorted(unknown)} are not options of method {method!r}; allowed: {sorted(allowed)}")


def run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """`diffsolve restore`: returns the exit code."""
    from diffsolve.data import digits16
    from diffsolve.guidance.tasks import DEFAULT_STEPS, DEFAULTS, inverse_problem, restore

    options = dict(args.options)
    steps = DEFAULT_STEPS.get(args.method, 50) if args.steps is None else args.steps
    if args.solver is not None:
        resolve_solver(args.solver, {})
    check_method_options(args.method, options)
    defaults = getattr(args, "defaults", {})
    settings = {
        n: getattr(args, n)
        for n in ("model", "solver", "steps", "num_samples", "seed")
        if getattr(args, n) != defaults.get(n, getattr(args, n))
    }
    out = (
        Path(args.out)
        if args.out
        else default_out(f"restore-{args.task}-{args.method}", {**settings, "options": options})
    )
    check_out(out, RESTORE_FILES, args.force)
    if args.model not in MODELS or args.model == "gmm-2d":
        raise CLIError(
            f"--model must be a digit model ({', '.join(n for n in MODELS if n != 'gmm-2d')}), got {args.model!r}"
        )
    target = build_target(args.model)
    if target.condition is not None or target.classes is not None:
        raise CLIError(f"--model {args.model}: restore needs an unconditional digit model (e.g. digits-vp)")
    if args.method in ("inpaint", "repaint") and args.task != "inpaint":
        raise CLIError(f"--method {args.method} works only with --task inpaint")
    clean = digits16("heldout")[0]
    if args.num_samples > len(clean):
        raise CLIError(f"--num-samples {args.num_samples}: there are only {len(clean)} held-out digits")
    clean = clean[: args.num_samples]
    if tuple(clean.shape[1:]) != target.event_shape:
        clean = torch.nn.functional.interpolate(
            clean, size=target.event_shape[1:], mode="bilinear", align_corners=False
        )
    prob = inverse_problem(args.task, clean, seed=args.seed)
    with refusals_of(options):  # an option's value is checked as the method is built
        restored, res = restore(
            target.model,
            prob,
            args.method,
            steps=steps,
            solver=args.solver,
            seed=args.seed,
            progress=not args.no_progress,
            **options,
        )
    plain_solver = args.solver or DEFAULTS[args.method][0]
    plain, _ = restore(target.model, prob, "none", steps=steps, solver=plain_solver, seed=args.seed, progress=False)
    restored, plain = restored.clamp(-1, 1), plain.clamp(-1, 1)
    scores = {"restored": psnr(restored, clean), "unguided": psnr(plain, clean), "degraded": psnr(prob.display, clean)}
    rows = [
        ("degraded", prob.display),
        (f"{args.method} ({res.solver})", restored),
        (f"unguided ({plain_solver})", plain),
        ("clean", clean),
    ]
    image, cols = panel_image(rows)
    manifest = {
        "task": args.task,
        "method": args.method,
        "model": args.model,
        "solver": res.solver,
        "options": jsonable(options),
        "steps": steps,
        "seed": args.seed,
        "num_samples": len(clean),
        "nfe": res.nfe,
        "wall_time": res.wall_time,
        "psnr_db": scores,
        "png_rows": [name for name, _ in rows],
        "png_columns": cols,
        "command": command_line(argv),
        "versions": versions(),
    }

    tensors = {"restored": restored, "degraded": prob.display, "unguided": plain, "clean": clean}
    names = write_atomically(out, lambda tmp: write_bundle(tmp, RESTORE_FILES, tensors, image, manifest))
    print(
        f"{args.method} ({res.solver}, {steps} steps, NFE {res.nfe}): {args.task} of {len(clean)} held-out "
        f"digits; PSNR {scores['restored']:.2f} dB (unguided {scores['unguided']:.2f}, "
        f"degraded {scores['degraded']:.2f})"
    )
    wrote(out, names)
    return 0
