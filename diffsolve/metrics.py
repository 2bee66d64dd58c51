"""Two-sample distances between sample sets (for tests and benchmarks against exact samples)."""

from __future__ import annotations

import torch

Tensor = torch.Tensor


def _flat64(x: Tensor) -> Tensor:
    return x.reshape(x.shape[0], -1).to(torch.float64)


def mmd2(x: Tensor, y: Tensor, bandwidths: tuple[float, ...] | None = None) -> float:
    """Unbiased squared maximum mean discrepancy with a sum of Gaussian kernels.

    ``bandwidths`` default to (0.5, 1, 2) times the median pairwise distance of the pooled samples.
    """
    x, y = _flat64(x), _flat64(y)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must have the same dimension, got {x.shape[1]} and {y.shape[1]}")
    n, m = x.shape[0], y.shape[0]
    if n < 2 or m < 2:
        raise ValueError("mmd2 needs at least 2 samples in each set")
    z = torch.cat([x, y])
    d2 = torch.cdist(z, z).pow(2)
    if bandwidths is None:
        med = d2[torch.triu_indices(len(z), len(z), 1).unbind()].median().sqrt().item()
        bandwidths = tuple(f * med for f in (0.5, 1.0, 2.0))
    widths = iter(bandwidths)
    first = next(widths, None)
    if first is None:
        raise ValueError("bandwidths must hold at least one bandwidth")
    k = torch.exp(-d2 / (2 * first * first))
    for b in widths:
        k = k + torch.exp(-d2 / (2 * b * b))
    kxx, kyy, kxy = k[:n, :n], k[n:, n:], k[:n, n:]
    sxx = (kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1))
    syy = (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
    return float(sxx + syy - 2 * kxy.mean())


def sliced_wasserstein(x: Tensor, y: Tensor, n_projections: int = 256, seed: int = 0) -> float:
    """Sliced 2-Wasserstein distance (equal sample sizes), over random unit directions."""
    x, y = _flat64(x), _flat64(y)
    if x.shape != y.shape:
        raise ValueError(f"sliced_wasserstein needs equal shapes, got {tuple(x.shape)} and {tuple(y.shape)}")
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(x.shape[1], n_projections, generator=g, dtype=torch.float64)
    dirs = dirs / dirs.norm(dim=0, keepdim=True)
    px, _ = (x @ dirs).sort(dim=0)
    py, _ = (y @ dirs).sort(dim=0)
    return float(((px - py) ** 2).mean().sqrt())


def psnr(x: Tensor, ref: Tensor, data_range: float = 2.0) -> Tensor:
    """Per-image PSNR in dB of images [N, ...] against ``ref`` (x clipped to ref's range [-1, 1] by default)."""
    x64, r64 = x.to(torch.float64), ref.to(torch.float64)
    if data_range == 2.0:
        x64 = x64.clamp(-1, 1)
    mse = ((x64 - r64) ** 2).flatten(1).mean(1)
    return 10 * torch.log10(data_range**2 / mse.clamp(min=1e-20))


def ssim(x: Tensor, ref: Tensor, data_range: float = 2.0, window: int = 7, sigma: float = 1.5) -> Tensor:
    """Per-image SSIM (Wang et al. 2004) of images [N, C, H, W] with a Gaussian window (7x7, sigma 1.5:
    the standard 11x11 does not fit well in 16x16 images), valid windows only, averaged over channels."""
    x64, r64 = x.to(torch.float64), ref.to(torch.float64)
    if data_range == 2.0:
        x64 = x64.clamp(-1, 1)
    u = torch.arange(window, dtype=torch.float64) - (window - 1) / 2
    g = torch.exp(-0.5 * (u / sigma) ** 2)
    g = g / g.sum()
    c = x64.shape[1]
    k = (g[:, None] * g[None, :]).expand(c, 1, window, window)

    def filt(z):
        return torch.nn.functional.conv2d(z, k, groups=c)

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mx, my = filt(x64), filt(r64)
    sxx = filt(x64 * x64) - mx * mx
    syy = filt(r64 * r64) - my * my
    sxy = filt(x64 * r64) - mx * my
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return s.flatten(1).mean(1)
