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
