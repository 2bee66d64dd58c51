"""The model catalogue of the command line: name -> builder of a :class:`Target`, what ``sample``,
``invert`` and ``restore`` run on. Add new models to :data:`MODELS`; ``--model`` also takes the path
of a diffusers DDPM-style folder."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

import diffsolve as ds

from .errors import CLIError, user_input

Condition = Callable[[int, int], tuple[torch.Tensor, torch.Tensor]]


class Target:
    """What `diffsolve sample` samples: a model, the shape of one sample, and for conditional
    (restoration) models a function making the condition mu and the clean originals."""

    def __init__(
        self,
        model: ds.DiffusionModel,
        event_shape: tuple[int, ...],
        condition: Condition | None = None,
        classes: dict | None = None,
    ):
        self.model, self.event_shape, self.condition = model, tuple(event_shape), condition
        self.classes = classes  # class-conditional models: {"num_classes", "null_class"}


Builder = Callable[..., Target]  # (device="cpu", dtype=torch.float32) -> Target


def _gmm_2d(device="cpu", dtype=torch.float32) -> Target:
    return Target(ds.models.GaussianMixture.gmm_2d().model(ds.schedules.VPLinear()), (2,))


def _digits_oracle(device="cpu", dtype=torch.float32) -> Target:
    return Target(ds.models.Empirical.digits().model(ds.schedules.VPLinear()), (1, 8, 8))


def _restoration_condition(card: dict) -> Condition:
    """Degrade the first K held-out digits as the model's card records (noise seeded by --seed)."""
    from diffsolve.data import degrade, digits16

    def make(k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        clean = digits16("heldout")[0]
        if k > len(clean):
            raise CLIError(f"--num-samples {k}: there are only {len(clean)} held-out digits to restore")
        clean = clean[:k]
        return degrade(clean, card["degradation"], torch.Generator().manual_seed(seed)), clean

    return make


def _shipped(name: str) -> Builder:
    def build(device="cpu", dtype=torch.float32) -> Target:
        c = ds.pretrained.card(name)
        cond = _restoration_condition(c) if c.get("degradation") else None
        return Target(
            ds.pretrained.load(name, device, dtype), ds.pretrained.SHIPPED[name], cond, ds.pretrained.classes(name)
        )

    return build


def diffusers_folder(path: str, device="cpu", dtype=torch.float32) -> Target:
    """A diffusers DDPM-style folder (unet/ and scheduler/) as a Target."""
    cfg_file = Path(path) / "unet" / "config.json"
    if not cfg_file.exists():
        raise CLIError(
            f"--model {path!r} is neither a known model ({', '.join(MODELS)}) nor a diffusers "
            "folder with unet/ and scheduler/"
        )
    cfg = json.loads(cfg_file.read_text())
    size = cfg.get("sample_size", 32)
    size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
    return Target(ds.pretrained.load_diffusers_ddpm(path, device, dtype), (cfg.get("in_channels", 3), *size))


MODELS: dict[str, Builder] = {
    **{name: _shipped(name) for name in ds.pretrained.SHIPPED},
    "gmm-2d": _gmm_2d,
    "digits-oracle": _digits_oracle,
}
DEFAULT_MODEL = "digits-vp"


def build_target(name: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> Target:
    """``--model name``: the catalogue's model, else the diffusers folder at that path. A missing
    weights file, and a folder that does not load, are the user's to fix (a CLIError)."""
    if name in MODELS:
        with user_input(FileNotFoundError):  # shipped weights not trained yet: the message says how
            return MODELS[name](device, dtype)
    with user_input(OSError, ValueError, TypeError, KeyError, prefix=f"--model {name!r}: "):
        return diffusers_folder(name, device, dtype)


def teleport_gaussian(name: str):
    """The Gaussian a ``--teleport`` run (or a grid fitted with one) hands over from: the training
    data's, for a shipped model."""
    if name not in ds.pretrained.SHIPPED:
        raise CLIError(
            f"--teleport needs a shipped model (its training data's Gaussian); {name} is not one "
            "(in Python, give ds.optimize_grid / ds.sample teleport=ds.models.Gaussian.from_samples(...))"
        )
    return ds.pretrained.gaussian(name)


def model_label(name: str) -> str:
    """The model's name in default output folders: its catalogue name, or its folder's name."""
    return name if name in MODELS else Path(name).name


def model_path(name: str) -> str | None:
    """The resolved folder of a --model path (a setting of the run), None for the catalogue's models."""
    return None if name in MODELS else str(Path(name).resolve())
