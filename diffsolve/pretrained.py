"""Loaders for the small models shipped in ``diffsolve/weights`` (trained by scripts/train_digits.py).

    model = diffsolve.pretrained.load("digits-vp")     # a DiffusionModel; samples have shape [1, 16, 16]

Each model folder holds ``unet/`` (a diffusers UNet2DModel) and ``card.json``, which names the
schedule, the prediction, the network's time input and, for digits-mr, the condition and the
degradation. diffusers is imported here (lazily), never at ``import diffsolve``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .models.model import DiffusionModel, as_dtype, timestep_input
from .schedules import MeanReverting, RectifiedFlow, Schedule, VPDiscrete

Tensor = torch.Tensor

WEIGHTS = Path(__file__).resolve().parent / "weights"

#: shipped generators and the shape of one sample
SHIPPED = {
    "digits-vp": (1, 16, 16),
    "digits-vp-cond": (1, 16, 16),
    "digits-flow": (1, 16, 16),
    "digits-mr": (1, 16, 16),
}


def path_of(name: str) -> Path:
    if name not in SHIPPED and name != "digits-sigma":
        raise ValueError(f"unknown shipped model {name!r}; available: {', '.join(SHIPPED)}")
    p = WEIGHTS / name
    if not (p / "card.json").exists():
        raise FileNotFoundError(f"{p} is missing; train it with scripts/train_digits.py --model {name}")
    return p


def card(name: str) -> dict:
    """The json card of a shipped model (schedule, prediction, training settings, metric)."""
    return json.loads((path_of(name) / "card.json").read_text())


def schedule_from_card(spec: dict) -> Schedule:
    """The schedule a card's ``schedule`` entry describes."""
    kind = spec.get("type")
    if kind == "VPDiscrete":
        return VPDiscrete.from_diffusers_config(spec["diffusers"])
    if kind == "RectifiedFlow":
        return RectifiedFlow(shift=spec.get("shift", 1.0))
    if kind == "MeanReverting":
        return MeanReverting(**{k: v for k, v in spec.items() if k != "type"})
    raise ValueError(
        f"schedule type {kind!r} in a model card is unknown; allowed: VPDiscrete, RectifiedFlow, MeanReverting"
    )


def _unet(path: Path, device, dtype):
    """The UNet2DModel in ``path`` on ``device`` in ``dtype`` (None: torch's default device / dtype)."""
    from diffusers import UNet2DModel

    dtype = torch.get_default_dtype() if dtype is None else as_dtype(dtype)
    device = torch.get_default_device() if device is None else device
    unet = UNet2DModel.from_pretrained(path, low_cpu_mem_usage=False, torch_dtype=dtype).to(device).eval()
    unet.requires_grad_(False)
    return unet


class UNetNetwork(torch.nn.Module):
    """A shipped UNet as a DiffusionModel's network, ``net(x, t)``: a module, so the model reads its
    dtype and device from the UNet and :meth:`DiffusionModel.to` converts it. ``inputs`` names what
    it needs besides (x, t): ``"mu"`` (the degraded image, concatenated to its input) or
    ``"class_labels"`` (``num_classes`` digits and the null class ``num_classes``)."""

    def __init__(self, unet, name: str, inputs: tuple[str, ...] = (), num_classes: int | None = None):
        super().__init__()
        self.unet, self.inputs, self.num_classes = unet, inputs, num_classes
        self.__name__ = f"UNet2DModel[{name}]"

    def forward(self, x: Tensor, t: Tensor, **inputs) -> Tensor:
        missing = set(self.inputs) - set(inputs)
        if missing or set(inputs) - set(self.inputs):
            raise TypeError(
                f"{self.__name__} takes (x, t) and {', '.join(self.inputs) or 'no other inputs'}; "
                f"got {', '.join(inputs) or 'none'}"
            )
        kw = {}
        x_in = torch.cat([x, inputs["mu"].to(x.dtype).expand_as(x)], dim=1) if "mu" in inputs else x
        if "class_labels" in inputs:
            n = self.num_classes
            if n is None:
                raise ValueError(f"{self.__name__} takes class_labels but has no num_classes")
            y = torch.as_tensor(inputs["class_labels"], device=x.device).long().reshape(-1).expand(x.shape[0])
            if bool(((y < 0) | (y > n)).any()):
                raise ValueError(f"class_labels must be in 0..{n - 1}, or {n} (the null class: unconditional)")
            kw["class_labels"] = y
        return self.unet(x_in, timestep_input(t, x), **kw).sample


def load_diffusers_ddpm(
    path: str | Path, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None
) -> DiffusionModel:
    """A diffusers DDPM-style folder (``unet/`` + ``scheduler/``) as a DiffusionModel.

    The schedule is :class:`VPDiscrete` built from the scheduler config, the network time the
    diffusers timestep, the prediction from ``prediction_type`` (epsilon, sample or v_prediction).
    The UNet is loaded on ``device`` in ``dtype`` (a name such as ``"float64"`` or a torch dtype;
    default: torch's default device and dtype).
    """
    path = Path(path)
    cfg = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
    kinds = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}
    pt = cfg.get("prediction_type", "epsilon")
    if pt not in kinds:
        raise ValueError(f"prediction_type {pt!r} in {path} is not supported; allowed: {', '.join(kinds)}")
    net = UNetNetwork(_unet(path / "unet", device, dtype), path.name)
    return DiffusionModel(net, VPDiscrete.from_diffusers_config(cfg), kinds[pt], time_input="timestep")


def gaussian(name: str):
    """The Gaussian of a shipped generator's training data (the 1497 images of the digits16 train
    split: their mean and covariance), for analytical teleportation (``ds.sample(teleport=...)``,
    :class:`~diffsolve.models.Gaussian`)."""
    from .data import digits16
    from .models.gaussian import Gaussian

    if name not in SHIPPED:
        raise ValueError(f"{name!r} is not a generator; shipped generators: {', '.join(SHIPPED)}")
    return Gaussian.from_samples(digits16("train")[0])


def classes(name: str) -> dict | None:
    """For a class-conditional shipped model, {"num_classes", "null_class", "label_dropout"}; else None.
    Its network takes ``class_labels`` (an int or [B]); the null class gives the unconditional model."""
    return card(name).get("class_labels")


def load(name: str, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None) -> DiffusionModel:
    """A shipped generator as a DiffusionModel (see :data:`SHIPPED`). digits-mr needs ``mu=``,
    digits-vp-cond ``cond={"class_labels": ...}`` (see :func:`classes`); runs without them are refused
    (:attr:`DiffusionModel.requires`). The UNet is loaded on ``device`` in ``dtype`` (``"float32"``,
    ``"float64"``, ``"float16"``, ``"bfloat16"`` or the torch dtypes; default: torch's default device
    and dtype); runs sample in that dtype and on that device, and ``model.to(...)`` converts it later."""
    path = path_of(name)
    if name not in SHIPPED:
        raise ValueError(f"{name!r} is not a generator; shipped generators: {', '.join(SHIPPED)}")
    c = card(name)
    if (path / "scheduler").exists():
        return load_diffusers_ddpm(path, device, dtype)
    labels = c.get("class_labels")
    inputs = ("mu",) if c.get("condition") else ("class_labels",) if labels else ()
    net = UNetNetwork(_unet(path / "unet", device, dtype), name, inputs, labels["num_classes"] if labels else None)
    return DiffusionModel(
        net, schedule_from_card(c["schedule"]), c["prediction"], time_input=c["time_input"], requires=inputs
    )


def load_noise_classifier(name: str = "digits-sigma"):
    """The shipped noise-level classifier (Denoising MCMC's q(k | x_t)) and its level times.

    Returns (classifier, times): ``classifier(x)`` gives logits over the levels, ``times[k]`` is the
    time of level k on the card's schedule (class 0 is the noisiest).
    """
    from safetensors.torch import load_file

    from .quality import NoiseLevelClassifier

    c = card(name)
    net = NoiseLevelClassifier(c["levels"])
    net.load_state_dict(load_file(str(path_of(name) / "model.safetensors")))
    net.eval().requires_grad_(False)
    return net, torch.tensor(c["level_times"], dtype=torch.float64)
