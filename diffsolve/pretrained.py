"""Loaders for the small models shipped in ``diffsolve/weights`` (trained by scripts/train_digits.py).

    model = diffsolve.pretrained.load("digits-vp")     # a DiffusionModel, samples of shape [1, 16, 16]

diffusers is imported here (lazily), never at ``import diffsolve``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .models.model import DiffusionModel
from .schedules.vp import VPDiscrete

WEIGHTS = Path(__file__).resolve().parent / "weights"

#: shipped generators and the shape of one sample
SHIPPED = {"digits-vp": (1, 16, 16)}


def path_of(name: str) -> Path:
    if name not in SHIPPED:
        raise ValueError(f"unknown shipped model {name!r}; available: {', '.join(SHIPPED)}")
    p = WEIGHTS / name
    if not p.exists():
        raise FileNotFoundError(f"{p} is missing; train it with scripts/train_digits.py --model {name}")
    return p


def card(name: str) -> dict:
    """The json card of a shipped model (schedule, prediction, training settings, metric)."""
    return json.loads((path_of(name) / "card.json").read_text())


def load_diffusers_ddpm(path: str | Path, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32) -> DiffusionModel:
    """A diffusers DDPM-style folder (``unet/`` + ``scheduler/``) as a DiffusionModel.

    The schedule is :class:`VPDiscrete` built from the scheduler config, the network time the
    diffusers timestep, the prediction from ``prediction_type`` (epsilon, sample or v_prediction).
    """
    from diffusers import UNet2DModel

    path = Path(path)
    cfg = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
    kinds = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}
    pt = cfg.get("prediction_type", "epsilon")
    if pt not in kinds:
        raise ValueError(f"prediction_type {pt!r} in {path} is not supported; allowed: {', '.join(kinds)}")
    unet = UNet2DModel.from_pretrained(path / "unet").to(device=device, dtype=dtype).eval()
    unet.requires_grad_(False)

    def net(x, t):
        return unet(x, t.to(x.dtype)).sample

    net.__name__ = f"UNet2DModel[{path.name}]"
    return DiffusionModel(net, VPDiscrete.from_diffusers_config(cfg), prediction=kinds[pt], time_input="timestep")


def load(name: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> DiffusionModel:
    """A shipped model as a DiffusionModel (see :data:`SHIPPED`)."""
    return load_diffusers_ddpm(path_of(name), device=device, dtype=dtype)
