"""``diffsolve sample --latent``: reading a latent that ``diffsolve invert`` (or ``Latent.save``) wrote,
and the settings it decides."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch

import diffsolve as ds

from ..errors import CLIError, warn
from ..jsonform import decode_options
from ..models import DEFAULT_MODEL
from ..output import LATENT_FILES
from ..parser import flags
from .common import given


def load_latent(path: str) -> tuple[ds.Latent, dict, Path]:
    """A latent written by `diffsolve invert` or ``Latent.save`` (a latent.safetensors file or the folder
    holding it with its manifest.json), read by :meth:`ds.Latent.load`: (the latent, with its options
    and dtype; its manifest, with ``dtype`` by name; its tensors file). Latents from older versions
    load too: their option objects, saved in the CLI's JSON form or as a repr, are rebuilt, and a dtype
    saved by name becomes the torch dtype."""
    from safetensors import SafetensorError

    p = Path(path)
    p = p / LATENT_FILES[0] if p.is_dir() else p
    if not p.exists():
        raise CLIError(f"--latent {path!r}: no such file (expected {LATENT_FILES[0]} from `diffsolve invert`)")
    try:
        lat = ds.Latent.load(p)
        meta = json.loads((p.parent / LATENT_FILES[1]).read_text())
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as e:
        raise CLIError(
            f"--latent {path!r} is not a latent written by `diffsolve invert` or Latent.save ({type(e).__name__}: {e})"
        ) from None
    dtype = lat.dtype
    if isinstance(dtype, str):  # older latents name it
        dtype = getattr(torch, dtype, None)
        if not isinstance(dtype, torch.dtype):
            raise CLIError(f"--latent {path!r}: unknown dtype {lat.dtype!r}")
    lat = dataclasses.replace(lat, options=decode_options(lat.options), dtype=dtype)
    meta["dtype"] = None if dtype is None else str(dtype).removeprefix("torch.")
    return lat, meta, p


def latent_defaults(args: argparse.Namespace, latent: ds.Latent, meta: dict) -> None:
    """Fill in what --latent decides: its model, solver and dtype unless given; its sample count and
    steps always (with a warning where --steps / --num-samples were given)."""
    for name in ("t_max", "t_min"):
        if getattr(args, name) is not None:
            raise CLIError(
                f"{flags([name])} does not apply with --latent: the latent's grid sets the time range "
                f"({float(latent.grid[0]):.6g} to {float(latent.grid[-1]):.6g})"
            )
    ignored = [n for n in ("steps", "num_samples") if n in given(args)]
    if ignored:
        warn(f"{flags(ignored)} ignored: the latent sets the steps (its grid) and the number of samples")
    recorded = meta.get("model")
    if args.model is None:
        args.model = recorded or DEFAULT_MODEL
    elif recorded and args.model != recorded:
        warn(f"the latent was made with --model {recorded}; sampling it with --model {args.model}")
    args.solver = args.solver or latent.solver
    args.dtype = args.dtype or meta.get("dtype") or "float32"
    args.num_samples, args.steps = latent.x.shape[0], len(latent.grid) - 1


def check_latent_solver(latent: ds.Latent, solver: str, path: str) -> None:
    """An exact latent (two states) samples back only with the solver that made it."""
    if latent.aux is not None and latent.solver != solver:
        raise CLIError(
            f"--latent {path!r} was made by {latent.solver!r}; its second state means nothing to "
            f"{solver!r} (sample it with --solver {latent.solver})"
        )
