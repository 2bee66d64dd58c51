"""A Gaussian fitted to the data: its exact denoiser and the closed form of its probability-flow ODE,
for analytical teleportation (Wang & Vastola 2024, "The Unreasonable Effectiveness of Gaussian Score
Approximation for Diffusion Models and its Applications", TMLR).

For data x_0 ~ N(m, C) and x_t = alpha_t x_0 + (1 - alpha_t) mu + sigma_t eps the marginal is
N(alpha_t m + (1 - alpha_t) mu, alpha_t^2 C + sigma_t^2 I). With C = U diag(lambda) U^T,

    denoiser:  E[x_0 | x_t] = m + U diag(alpha lambda / (alpha^2 lambda + sigma^2)) U^T (x_t - mean_t)
    flow:      U^T (x_t - mean_t) = diag(sqrt((alpha_t^2 lambda + sigma_t^2) / (alpha_s^2 lambda + sigma_s^2)))
               U^T (x_s - mean_s)

(the whitened coordinates are constant along the probability-flow ODE, since every marginal
covariance shares C's eigenvectors). At high noise the marginal of any data distribution with
mean m and covariance C is close to this Gaussian's, so its flow carries x_T to an intermediate time
at no model call; a solver takes over from there (``ds.sample(teleport=...)``; the hand-over time is
searched by ``ds.optimize_grid(teleport=...)``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch

from ..schedules.base import Schedule
from .analytic import _flat_state, _Oracle

Tensor = torch.Tensor


class Gaussian(_Oracle):
    """Data ~ N(``mean``, ``cov``) over ``event_shape`` (the shape of one sample; default: flat),
    in float64. :meth:`from_samples` fits one to samples (the training data, or the model's own
    samples). As an oracle (``.model(schedule)``) it is an exact x0-predicting network."""

    def __init__(self, mean, cov, event_shape: Sequence[int] | None = None):
        m = torch.as_tensor(mean, dtype=torch.float64).reshape(-1)
        c = torch.as_tensor(cov, dtype=torch.float64)
        d = m.shape[0]
        if c.shape != (d, d):
            raise ValueError(f"cov must be a {d} x {d} matrix for a mean of {d} numbers, got shape {tuple(c.shape)}")
        if not bool(torch.isfinite(c).all()) or not bool(torch.isfinite(m).all()):
            raise ValueError("mean and cov must be finite")
        if not torch.allclose(c, c.T, rtol=1e-8, atol=1e-10 * float(c.abs().max().clamp_min(1e-300))):
            raise ValueError("cov must be symmetric")
        evals, evecs = torch.linalg.eigh(c)
        if float(evals.min()) < -1e-8 * max(float(evals.max()), 1e-300):
            raise ValueError(
                f"cov must be positive semi-definite (its smallest eigenvalue is {float(evals.min()):.3g})"
            )
        self.mean, self.cov = m, c
        self.evals, self.evecs = evals.clamp_min(0.0), evecs
        self.event_shape = tuple(event_shape) if event_shape is not None else (d,)
        if int(torch.tensor(self.event_shape).prod()) != d:
            raise ValueError(f"event_shape {self.event_shape} does not hold {d} numbers")

    @classmethod
    def from_samples(cls, x: Tensor, shrinkage: float = 0.0) -> Gaussian:
        """The sample mean and covariance of ``x`` ([N, ...], N >= 2), the covariance shrunk toward
        (trace / d) I by ``shrinkage`` in [0, 1] (for N not much above the dimension)."""
        x = torch.as_tensor(x)
        if x.ndim < 2 or x.shape[0] < 2:
            raise ValueError(f"x must hold at least 2 samples, shape [N, ...], got {tuple(x.shape)}")
        if not 0.0 <= shrinkage <= 1.0:
            raise ValueError(f"shrinkage must be in [0, 1], got {shrinkage!r}")
        f = x.detach().reshape(x.shape[0], -1).to(torch.float64).cpu()
        m = f.mean(0)
        c = torch.cov(f.T).reshape(m.shape[0], m.shape[0])
        if shrinkage:
            c = (1 - shrinkage) * c + shrinkage * (torch.trace(c) / c.shape[0]) * torch.eye(c.shape[0], dtype=c.dtype)
        return cls(m, (c + c.T) / 2, event_shape=tuple(x.shape[1:]))

    @property
    def dim(self) -> int:
        return self.mean.shape[0]

    def fingerprint(self) -> str:
        """A short digest of the mean and covariance (an optimised grid records which Gaussian it
        hands over from)."""
        h = hashlib.sha256()
        h.update(self.mean.numpy().tobytes())
        h.update(self.cov.numpy().tobytes())
        return h.hexdigest()[:16]

    def _centred(self, x: Tensor, t, schedule: Schedule, mu):
        """(x - mean_t as float64 [B, D], alpha [B, 1], sigma [B, 1], mu as [B, D] or 0.0)."""
        xf, a, sg, mu_f = _flat_state(x, t, schedule, mu)
        return xf - a * self.mean.to(x.device) - (1 - a) * mu_f, a, sg, mu_f

    def denoise(self, x: Tensor, t, schedule: Schedule, mu=None) -> Tensor:
        """E[x_0 | x_t = x] (module docstring); t a scalar or one time per sample."""
        z, a, s, _ = self._centred(x, t, schedule, mu)
        lam, u = self.evals.to(x.device), self.evecs.to(x.device)
        gain = a * lam / (a * a * lam + s * s)
        return (self.mean.to(x.device) + ((z @ u) * gain) @ u.T).reshape(x.shape).to(x.dtype)

    def flow_map(self, x_s: Tensor, s, t, schedule: Schedule, mu=None) -> Tensor:
        """The exact probability-flow ODE solution of this Gaussian's marginals from time ``s`` to
        time ``t`` (module docstring; each a scalar or one time per sample)."""
        z, a_s, sg_s, mu_f = self._centred(x_s, s, schedule, mu)
        _, a_t, sg_t, _ = _flat_state(x_s, t, schedule, None)
        lam, u = self.evals.to(x_s.device), self.evecs.to(x_s.device)
        scale = torch.sqrt((a_t * a_t * lam + sg_t * sg_t) / (a_s * a_s * lam + sg_s * sg_s))
        out = a_t * self.mean.to(x_s.device) + (1 - a_t) * mu_f + ((z @ u) * scale) @ u.T
        return out.reshape(x_s.shape).to(x_s.dtype)

    def __repr__(self) -> str:
        return f"Gaussian(dim={self.dim}, event_shape={self.event_shape}, fingerprint={self.fingerprint()})"
