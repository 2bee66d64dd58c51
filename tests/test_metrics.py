import math

import torch

from diffsolve.data import degrade, digits16, gaussian_blur
from diffsolve.metrics import mmd2, psnr, sliced_wasserstein, ssim


def test_psnr_matches_formula():
    x = torch.zeros(2, 1, 4, 4)
    y = x + 0.1
    assert torch.allclose(psnr(y, x), torch.full((2,), 10 * math.log10(4 / 0.01), dtype=torch.float64))


def test_ssim_properties():
    x = digits16("heldout")[0][:20]
    assert torch.allclose(ssim(x, x), torch.ones(20, dtype=torch.float64))
    mild = degrade(x, {"type": "blur-noise", "blur_sigma": 0.7, "noise_std": 0.02}, torch.Generator().manual_seed(0))
    hard = degrade(x, {"type": "blur-noise", "blur_sigma": 1.5, "noise_std": 0.2}, torch.Generator().manual_seed(0))
    assert (ssim(hard, x) < ssim(mild, x)).all() and (ssim(mild, x) < 1).all()
    assert (psnr(hard, x) < psnr(mild, x)).all()


def test_blur_preserves_constants_and_mass():
    c = torch.full((1, 1, 16, 16), 0.3)
    assert torch.allclose(gaussian_blur(c, 1.5), c, atol=1e-6)
    x = torch.zeros(1, 1, 16, 16)
    x[0, 0, 8, 8] = 1
    assert abs(float(gaussian_blur(x, 1.0).sum()) - 1.0) < 1e-5


def test_two_sample_distances_detect_a_shift():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(500, 2, generator=g), torch.randn(500, 2, generator=g)
    c = torch.randn(500, 2, generator=g) + 0.5
    assert mmd2(a, b) < mmd2(a, c)
    assert sliced_wasserstein(a, b) < sliced_wasserstein(a, c)
