"""Offline sample quality for 16x16 digits: a small digit classifier, its accuracy-confidence, and
the Frechet distance in its feature space (digits-FD) against held-out real digits.

The classifier is trained by ``scripts/train_digits.py`` and shipped in ``diffsolve/weights``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

WEIGHTS = Path(__file__).resolve().parent / "weights"


class DigitClassifier(nn.Module):
    """conv(1->32) -> conv(32->64, /2) -> conv(64->64, /2) -> 128 features -> 10 logits."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1),
            nn.SiLU(),
            nn.Conv2d(64, 64, 3, stride=2, padding=1),
            nn.SiLU(),
            nn.Flatten(),
            nn.Linear(64 * 4 * 4, 128),
            nn.SiLU(),
        )
        self.head = nn.Linear(128, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class NoiseLevelClassifier(nn.Module):
    """Denoising MCMC's noise-level classifier q(k | x) (Kim & Ye 2023, SimpleCNN) for 16x16 inputs:
    conv3x3 1->32->64->128, each with ReLU and 2x2 average pooling (16 -> 8 -> 4 -> 2), then linear."""

    def __init__(self, levels: int = 100):
        super().__init__()
        layers: list[nn.Module] = []
        for cin, cout in ((1, 32), (32, 64), (64, 128)):
            layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2)]
        self.net = nn.Sequential(*layers, nn.Flatten(), nn.Linear(128 * 2 * 2, levels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def load_classifier(path: str | Path | None = None) -> DigitClassifier:
    from safetensors.torch import load_file

    path = Path(path) if path is not None else WEIGHTS / "digits-classifier"
    file = path / "model.safetensors"
    if not file.exists():
        raise FileNotFoundError(
            f"no digit classifier at {file}; train it with scripts/train_digits.py --model classifier"
        )
    net = DigitClassifier()
    net.load_state_dict(load_file(str(file)))
    return net.eval()


def _frechet(mu1: np.ndarray, c1: np.ndarray, mu2: np.ndarray, c2: np.ndarray) -> float:
    from scipy import linalg

    covmean = linalg.sqrtm(c1 @ c2)
    covmean = covmean.real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(c1) + np.trace(c2) - 2 * np.trace(covmean))


@torch.no_grad()
def evaluate(
    samples: torch.Tensor, reference: torch.Tensor | None = None, classifier: DigitClassifier | None = None
) -> dict:
    """Quality of digit samples [N, 1, 16, 16] in [-1, 1] (8x8 samples are upsampled).

    Returns ``digits_fd`` (Frechet distance of classifier features to ``reference``, default the
    held-out digits), ``confidence`` (mean max softmax probability) and ``class_histogram``.
    """
    from .data import digits16

    clf = classifier if classifier is not None else load_classifier()
    x = torch.as_tensor(samples).detach().to("cpu", torch.float32)
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4 or x.shape[1] != 1:
        raise ValueError(f"samples must have shape [N, 1, H, W], got {tuple(x.shape)}")
    if x.shape[-1] != 16:
        x = torch.nn.functional.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False)
    x = x.clamp(-1, 1)
    ref = digits16("heldout")[0] if reference is None else torch.as_tensor(reference, dtype=torch.float32)
    if len(x) < 2:
        raise ValueError("evaluate needs at least 2 samples")
    f_s = clf.features(x).double().numpy()
    f_r = clf.features(ref).double().numpy()
    probs = torch.softmax(clf.head(torch.from_numpy(f_s).float()), dim=1)
    fd = _frechet(f_s.mean(0), np.cov(f_s, rowvar=False), f_r.mean(0), np.cov(f_r, rowvar=False))
    return {
        "digits_fd": fd,
        "confidence": float(probs.max(1).values.mean()),
        "class_histogram": torch.bincount(probs.argmax(1), minlength=10).tolist(),
        "num_samples": len(x),
    }


def card(name: str) -> dict:
    return json.loads((WEIGHTS / name / "card.json").read_text())
