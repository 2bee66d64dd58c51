"""Small data sets shipped inside the package (no downloads)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

_HERE = Path(__file__).resolve().parent


def load_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """The 1797 8x8 handwritten digits with values 0..16, and their labels 0..9.

    These are the UCI "Optical Recognition of Handwritten Digits" test images as distributed with
    scikit-learn (``sklearn.datasets.load_digits``), stored as ``digits.npz`` (uint8) by
    ``scripts/make_digits_file.py``. Returns (images [1797, 8, 8] uint8, labels [1797] int64).
    """
    with np.load(_HERE / "digits.npz") as f:
        images = torch.from_numpy(f["images"].copy())
        labels = torch.from_numpy(f["labels"].astype(np.int64))
    return images, labels


SPLITS = ("train", "heldout", "all")


def digits16(split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """The digits upsampled to 16x16 (bilinear), one channel, in [-1, 1]: ([N, 1, 16, 16] float32, labels).

    ``split``: ``"heldout"`` is every sixth digit (index % 6 == 0, 300 images), ``"train"`` the other
    1497, ``"all"`` all 1797. The shipped models are trained on ``"train"`` only.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    images, labels = load_digits()
    x = images[:, None].to(torch.float32) / 8.0 - 1.0
    x = torch.nn.functional.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False).clamp(-1, 1)
    idx = torch.arange(len(x))
    keep = {"train": idx % 6 != 0, "heldout": idx % 6 == 0, "all": idx >= 0}[split]
    return x[keep].contiguous(), labels[keep]


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Blur images [N, C, H, W] with a normalised Gaussian kernel (radius 3 sigma, reflect padding)."""
    r = max(1, int(3 * sigma + 0.5))
    u = torch.arange(-r, r + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-0.5 * (u / sigma) ** 2)
    k = k / k.sum()
    c = x.shape[1]
    x = torch.nn.functional.pad(x, (r, r, r, r), mode="reflect")
    x = torch.nn.functional.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return torch.nn.functional.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def degrade(x: torch.Tensor, spec: dict, generator: torch.Generator | None = None) -> torch.Tensor:
    """Apply a recorded degradation to clean images in [-1, 1].

    ``spec = {"type": "blur-noise", "blur_sigma": s, "noise_std": n}``: Gaussian blur of std s
    pixels, then additive N(0, n^2) noise drawn from ``generator``.
    """
    kind = spec.get("type")
    if kind != "blur-noise":
        raise ValueError(f"degradation type {kind!r} is unknown; allowed: 'blur-noise'")
    y = gaussian_blur(x, float(spec["blur_sigma"]))
    noise = torch.randn(y.shape, generator=generator, dtype=y.dtype).to(y.device)
    return y + float(spec["noise_std"]) * noise
