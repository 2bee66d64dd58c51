"""The device of a run: ``--device`` checked to be usable here, and under torchrun each process's own GPU."""

from __future__ import annotations

import os

import torch

from .errors import CLIError


def check_device(name: str) -> torch.device:
    """``--device name`` as a torch device that works here (a CLIError otherwise)."""
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError, TypeError) as e:
        raise CLIError(f"unknown device {name!r}: {e}") from None
    try:
        torch.empty(1, device=dev)
    except (RuntimeError, AssertionError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CLIError(f"device {name!r} is not usable here: {first}") from None
    return dev


def rank_device(name: str) -> str:
    """The device this process runs on: under torchrun with several processes, a CUDA device is the
    process's own GPU, cuda:LOCAL_RANK (chosen before the model is loaded onto it); else ``name``."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return name
    try:
        cuda = torch.device(name).type == "cuda"
    except (RuntimeError, ValueError, TypeError):
        return name  # check_device names the error
    return f"cuda:{int(os.environ.get('LOCAL_RANK', os.environ.get('RANK', '0')))}" if cuda else name
