"""Oracle models with exact answers: the backbone of the tests and benchmarks.

- :class:`GaussianMixture`: data ~ sum_k w_k N(m_k, diag(s_k^2)). Under any schedule
  x_t = alpha x_0 + (1 - alpha) mu + sigma eps the marginal is again a mixture,
  N(alpha m_k + (1 - alpha) mu, alpha^2 s_k^2 + sigma^2), so the denoiser E[x_0 | x_t] is exact,
  and for one component the probability-flow ODE has the closed-form solution
  (x_t - mean_t) / std_t = const (per dimension).
- :class:`Empirical`: the optimal denoiser of a finite data set (the posterior mean over the data
  points), e.g. the 1797 8x8 digits shipped with diffsolve.

Both act as x0-predicting networks; ``.model(schedule)`` wraps them as a DiffusionModel.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..schedules.base import Schedule, as_time
from .model import DiffusionModel

Tensor = torch.Tensor


def _flat(x: Tensor) -> Tensor:
    return x.reshape(x.shape[0], -1)


def _per_sample(v: Tensor, b: int) -> Tensor:
    v = v.to(torch.float64)
    return v.expand(b) if v.ndim == 0 else v


def _flat_state(x: Tensor, t, schedule: Schedule, mu):
    """(x as float64 [B, D], alpha [B, 1], sigma [B, 1], mu as [B, D] or 0.0) for per-sample or scalar t."""
    xf = _flat(x).to(torch.float64)
    tt = _per_sample(as_time(t, like=x), xf.shape[0]).to(x.device)
    a = schedule.alpha(tt).to(x.device)[:, None]
    sg = schedule.sigma(tt).to(x.device)[:, None]
    return xf, a, sg, _mu_flat(mu, x)


def _mu_flat(mu, x: Tensor) -> Tensor | float:
    if mu is None:
        return 0.0
    mu = torch.as_tensor(mu, dtype=torch.float64, device=x.device)
    return mu.expand_as(x).reshape(x.shape[0], -1)


class _OracleNet:
    """net(x, t, mu=None) -> E[x_0 | x_t = x] for a fixed schedule (t is the continuous time)."""

    def __init__(self, oracle, schedule: Schedule):
        self.oracle = oracle
        self.schedule = schedule
        self.__name__ = type(oracle).__name__

    def __call__(self, x: Tensor, t: Tensor, mu: Tensor | None = None, class_labels=None) -> Tensor:
        event = tuple(self.oracle.event_shape)
        if math.prod(x.shape[1:]) != math.prod(event):
            raise ValueError(
                f"shape: the {self.__name__} oracle's samples have shape {event}, got states of "
                f"shape {tuple(x.shape)} (batch first)"
            )
        if class_labels is None:
            return self.oracle.denoise(x, t, self.schedule, mu)
        return self.oracle.denoise(x, t, self.schedule, mu, class_labels=class_labels)


class _Oracle:
    def model(self, schedule: Schedule) -> DiffusionModel:
        """This oracle as an x0-predicting DiffusionModel under ``schedule`` (time input: t)."""
        return DiffusionModel(_OracleNet(self, schedule), schedule, prediction="x0", time_input="t")

    def denoise(self, x: Tensor, t, schedule: Schedule, mu=None) -> Tensor:
        raise NotImplementedError


class GaussianMixture(_Oracle):
    """A Gaussian mixture over D dimensions with diagonal covariances.

    Parameters: ``means`` [K, D]; ``stds`` a scalar, [K] or [K, D]; ``weights`` [K] (default equal).
    Samples may carry any event shape whose size is D (e.g. images flattened to D pixels);
    ``event_shape`` sets the shape :meth:`sample` returns (default (D,)).

    ``labels`` [K] (optional) gives each component a class: the model then takes ``class_labels``
    (an int or [B]; -1 means unconditional) and is the exact conditional denoiser E[x_0 | x_t, y],
    and :meth:`class_log_prob` is the exact noisy classifier log p(y | x_t).
    """

    def __init__(self, means, stds=1.0, weights=None, event_shape: Sequence[int] | None = None, labels=None):
        m = torch.as_tensor(means, dtype=torch.float64)
        if m.ndim == 1:
            m = m[None]
        if m.ndim != 2:
            raise ValueError(f"means must have shape [K, D], got {tuple(m.shape)}")
        k, d = m.shape
        s = torch.as_tensor(stds, dtype=torch.float64)
        if s.ndim == 0:
            s = s.expand(k, d)
        elif s.ndim == 1 and s.shape[0] == k:
            s = s[:, None].expand(k, d)
        elif s.shape != (k, d):
            raise ValueError(f"stds must be a scalar, [K] or [K, D] with K={k}, D={d}; got {tuple(s.shape)}")
        if not bool((s > 0).all()):
            raise ValueError("stds must be > 0")
        w = (
            torch.full((k,), 1.0 / k, dtype=torch.float64)
            if weights is None
            else torch.as_tensor(weights, dtype=torch.float64)
        )
        if w.shape != (k,) or not bool((w > 0).all()):
            raise ValueError(f"weights must be {k} positive numbers")
        self.means = m
        self.stds = s.clone()
        self.weights = w / w.sum()
        self.event_shape = tuple(event_shape) if event_shape is not None else (d,)
        self.labels = None if labels is None else torch.as_tensor(labels, dtype=torch.long)
        if self.labels is not None and (self.labels.shape != (k,) or bool((self.labels < 0).any())):
            raise ValueError(f"labels must be {k} non-negative class indices, one per component")
        if math.prod(self.event_shape) != d:
            raise ValueError(
                f"event_shape {self.event_shape} has {math.prod(self.event_shape)} elements, expected D={d}"
            )

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @classmethod
    def gmm_2d(cls) -> GaussianMixture:
        """The 2-D example mixture: 6 components on a circle of radius 2, std 0.3, unequal weights."""
        ang = torch.arange(6, dtype=torch.float64) * (2 * math.pi / 6)
        means = 2.0 * torch.stack([ang.cos(), ang.sin()], dim=1)
        return cls(means, 0.3, weights=[1, 2, 1, 2, 1, 2])

    # -------------------------------------------------------------------- exact sampling
    def sample(self, n: int, generator: torch.Generator | None = None, dtype=torch.float64) -> Tensor:
        """n exact samples of the data distribution."""
        comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        x = self.means[comp] + self.stds[comp] * z
        return x.reshape(n, *self.event_shape).to(dtype)

    def marginal(self, t, schedule: Schedule, mu=None) -> GaussianMixture:
        """The mixture of x_t (a scalar time), for mu = 0 or a constant mu of shape [D]."""
        t = as_time(t)
        a, s = float(schedule.alpha(t)), float(schedule.sigma(t))
        mu_v = 0.0 if mu is None else torch.as_tensor(mu, dtype=torch.float64).reshape(-1)
        return GaussianMixture(
            a * self.means + (1 - a) * mu_v,
            torch.sqrt(a * a * self.stds**2 + s * s),
            self.weights,
            self.event_shape,
            self.labels,
        )

    def conditional(self, label: int) -> GaussianMixture:
        """The data distribution of one class (a labelled mixture's components of that label)."""
        if self.labels is None:
            raise ValueError("this GaussianMixture has no component labels")
        keep = self.labels == int(label)
        if not bool(keep.any()):
            raise ValueError(f"label must be one of {sorted(set(self.labels.tolist()))}, got {label!r}")
        return GaussianMixture(
            self.means[keep], self.stds[keep], self.weights[keep], self.event_shape, self.labels[keep]
        )

    # -------------------------------------------------------------------- exact denoiser
    def _components(self, x: Tensor, t, schedule: Schedule, mu):
        xf, a, sg, mu_f = _flat_state(x, t, schedule, mu)
        a, sg = a[:, None], sg[:, None]  # [B,1,1]
        m = self.means.to(x.device)[None]  # [1,K,D]
        s2 = (self.stds.to(x.device) ** 2)[None]
        mu_f = mu_f[:, None, :] if isinstance(mu_f, Tensor) else mu_f
        mean = a * m + (1 - a) * mu_f  # [B,K,D]
        var = a * a * s2 + sg * sg
        diff = xf[:, None, :] - mean
        logp = torch.log(self.weights.to(x.device))[None] - 0.5 * (
            (diff * diff / var) + torch.log(2 * math.pi * var)
        ).sum(-1)
        return xf, a, m, s2, var, diff, logp

    def _restrict(self, logp: Tensor, class_labels) -> Tensor:
        """Component log-weights restricted to each row's class (rows with label -1 keep all)."""
        if self.labels is None:
            raise ValueError("class_labels given, but this GaussianMixture has no component labels")
        y = torch.as_tensor(class_labels, device=logp.device).reshape(-1).expand(logp.shape[0])
        keep = (self.labels.to(logp.device)[None] == y[:, None]) | (y[:, None] < 0)
        if not bool(keep.any(1).all()):
            raise ValueError(f"class_labels must be -1 or one of {sorted(set(self.labels.tolist()))}")
        return logp.masked_fill(~keep, -math.inf)

    def class_log_prob(self, x: Tensor, t, schedule: Schedule, class_labels, mu=None) -> Tensor:
        """log p(y | x_t = x), the exact noisy classifier of a labelled mixture ([B])."""
        logp = self._components(x, t, schedule, mu)[-1]
        return torch.logsumexp(self._restrict(logp, class_labels), 1) - torch.logsumexp(logp, 1)

    def denoise(self, x: Tensor, t, schedule: Schedule, mu=None, class_labels=None) -> Tensor:
        """E[x_0 | x_t = x] under ``schedule`` (t scalar or [B]); given ``class_labels``, E[x_0 | x_t, y]."""
        _, a, m, s2, var, diff, logp = self._components(x, t, schedule, mu)
        if class_labels is not None:
            logp = self._restrict(logp, class_labels)
        r = torch.softmax(logp, dim=1)[..., None]  # [B,K,1]
        post = m + a * s2 / var * diff
        return (r * post).sum(1).reshape(x.shape).to(x.dtype)

    def log_prob(self, x: Tensor, t, schedule: Schedule, mu=None) -> Tensor:
        """log p_t(x), the exact marginal log-density."""
        logp = self._components(x, t, schedule, mu)[-1]
        return torch.logsumexp(logp, dim=1).to(x.dtype)

    def flow_map(self, x_s: Tensor, s, t, schedule: Schedule, mu=None) -> Tensor:
        """Exact probability-flow ODE solution from time s to time t (one component only).

        For Gaussian data the standardised variable (x_t - mean_t) / std_t is constant along the flow.
        """
        if self.means.shape[0] != 1:
            raise ValueError("flow_map is exact only for a single Gaussian component (K = 1)")
        xf = _flat(x_s).to(torch.float64)
        mu_f = _mu_flat(mu, x_s)
        m, s2 = self.means[0].to(x_s.device), self.stds[0].to(x_s.device) ** 2

        def moments(tau):
            a, sg = float(schedule.alpha(as_time(tau))), float(schedule.sigma(as_time(tau)))
            return a * m + (1 - a) * mu_f, torch.sqrt(a * a * s2 + sg * sg)

        mean_s, std_s = moments(s)
        mean_t, std_t = moments(t)
        return (mean_t + std_t / std_s * (xf - mean_s)).reshape(x_s.shape).to(x_s.dtype)


class Empirical(_Oracle):
    """The exact optimal denoiser of a finite data set {x_n}: E[x_0 | x_t] = sum_n w_n(x_t) x_n with
    w_n proportional to exp(-|x_t - alpha x_n - (1 - alpha) mu|^2 / (2 sigma^2))."""

    def __init__(self, data: Tensor, labels: Tensor | None = None):
        data = torch.as_tensor(data)
        if data.ndim < 2 or data.shape[0] < 1:
            raise ValueError(f"data must have shape [N, ...] with N >= 1, got {tuple(data.shape)}")
        self.data = data.to(torch.float64)
        self.labels = labels
        self.event_shape = tuple(data.shape[1:])
        self._flat = self.data.reshape(self.data.shape[0], -1)
        self._sq = (self._flat**2).sum(1)

    @classmethod
    def digits(cls) -> Empirical:
        """The 1797 8x8 handwritten digits (UCI, as in scikit-learn), shape [1797, 1, 8, 8], in [-1, 1]."""
        from ..data import load_digits

        images, labels = load_digits()
        return cls(images[:, None].to(torch.float64) / 8.0 - 1.0, labels)

    def sample(self, n: int, generator: torch.Generator | None = None, dtype=torch.float64) -> Tensor:
        """n draws (with replacement) from the data set."""
        idx = torch.randint(0, self.data.shape[0], (n,), generator=generator)
        return self.data[idx].to(dtype)

    def denoise(self, x: Tensor, t, schedule: Schedule, mu=None) -> Tensor:
        xf, a, sg, mu_f = _flat_state(x, t, schedule, mu)
        z = xf - (1 - a) * mu_f
        data = self._flat.to(x.device)
        d2 = (z * z).sum(1, keepdim=True) - 2 * a * (z @ data.T) + a * a * self._sq.to(x.device)[None]
        w = torch.softmax(-d2 / (2 * sg * sg), dim=1)
        return (w @ data).reshape(x.shape).to(x.dtype)
