"""``diffsolve eval``: digit sample quality (digits-FD against the held-out digits, classifier
confidence) of what ``sample``, ``sample --pipeline`` and ``restore`` write."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

import diffsolve as ds

from ..errors import CLIError, user_input

EVAL_FILES = ("samples.safetensors", "restored.safetensors")
EVAL_TENSORS = ("samples", "restored", "images")  # sample, restore, sample --pipeline (images in [0, 1])


def check_digits(x: torch.Tensor, where: str) -> None:
    """What eval scores: at least 2 digit images, [N, 1, H, W] or [N, H, W] (a CLIError otherwise)."""
    shape = tuple(x.shape)
    if not (len(shape) == 3 or (len(shape) == 4 and shape[1] == 1)):
        raise CLIError(f"{where}: eval scores digit images of shape [N, 1, H, W] or [N, H, W], got {shape}")
    if shape[0] < 2:
        raise CLIError(f"{where}: eval needs at least 2 samples, got {shape[0]}")


def run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """`diffsolve eval`: returns the exit code."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(args.samples)
    if path.is_dir():
        found = [path / n for n in EVAL_FILES if (path / n).exists()]
        if not found:
            raise CLIError(
                f"{path} holds none of {', '.join(EVAL_FILES)} (written by `diffsolve sample` and `diffsolve restore`)"
            )
        path = found[0]
    if not path.exists():
        raise CLIError(f"no samples at {path}")
    with user_input(OSError, SafetensorError, prefix=f"{path}: "):
        tensors = load_file(str(path))
    key = args.tensor or next((n for n in EVAL_TENSORS if n in tensors), None)
    if key not in tensors:
        held = ", ".join(sorted(tensors))
        raise CLIError(
            f"{path} holds {held}; choose one with --tensor"
            if key
            else f"{path} holds none of {', '.join(EVAL_TENSORS)} (it has {held})"
        )
    samples = tensors[key]
    check_digits(samples, f"{path} [{key}]")
    if key == "images":
        samples = samples * 2 - 1
    res = ds.quality.evaluate(samples)
    if args.json:
        print(json.dumps({**res, "file": str(path), "tensor": key}, indent=2), flush=True)
    else:
        print(f"{path} [{key}]: {res['num_samples']} samples")
        print(f"digits-FD   {res['digits_fd']:.3f}   (vs held-out real digits; lower is better)")
        print(f"confidence  {res['confidence']:.3f}   (mean max class probability)")
        print(f"classes     {res['class_histogram']}", flush=True)
    print(
        "note: digits-FD depends on the sample count (digits-vp, dpmpp-2m, 20 steps: 327 from 64 samples, 94 "
        "from 2048); compare scores of equally many samples (benchmarks/digits_fd.md uses 300)",
        file=sys.stderr,
    )
    return 0
