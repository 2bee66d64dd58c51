"""Variance-preserving schedules (alpha^2 + sigma^2 = 1) and sub-VP.

References: Ho et al. 2020 (DDPM); Song et al. 2021, "Score-Based Generative Modeling through SDEs"
(VP and sub-VP SDEs, beta_min = 0.1, beta_max = 20); Nichol & Dhariwal 2021 (cosine schedule);
Lu et al. 2022, DPM-Solver (continuous-time interpolation of a discrete schedule, closed-form
inverse of the log-SNR).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .base import Schedule, Tensor, as_time, check_range, check_times


def _vp_t_of_log_alpha(log_alpha: Tensor, beta_min: float, beta_max: float) -> Tensor:
    """Solve (beta_max - beta_min) t^2 / 4 + beta_min t / 2 = -log_alpha for t >= 0 (stable root)."""
    d = beta_max - beta_min
    if d == 0:
        return -2.0 * log_alpha / beta_min
    tmp = -4.0 * d * log_alpha
    return tmp / ((beta_min**2 + tmp).sqrt() + beta_min) / d


def _log_alpha_of_log_snr_vp(lam: Tensor) -> Tensor:
    # alpha^2 / (1 - alpha^2) = exp(2 lam)  =>  log alpha = -1/2 log(1 + exp(-2 lam)), written with
    # exp and log1p: torch.logaddexp's vectorised and scalar paths differ in the last bit, which
    # would make a row's result depend on its batch
    return -0.5 * (torch.log1p(torch.exp(-(2.0 * lam).abs())) + (-2.0 * lam).clamp_min(0.0))


class _VPFromLogAlpha(Schedule):
    """alpha = exp(log_alpha(t)), sigma = sqrt(1 - alpha^2)."""

    def log_alpha(self, t) -> Tensor:
        raise NotImplementedError

    def alpha(self, t) -> Tensor:
        return torch.exp(self.log_alpha(as_time(t)))

    def sigma(self, t) -> Tensor:
        return torch.sqrt(-torch.expm1(2.0 * self.log_alpha(as_time(t))))

    def log_snr(self, t) -> Tensor:
        la = self.log_alpha(as_time(t))
        return la - 0.5 * torch.log(-torch.expm1(2.0 * la))

    def sigma_dot(self, t) -> Tensor:
        t = as_time(t)
        return -self.alpha(t) * self.alpha_dot(t) / self.sigma(t)


class VPLinear(_VPFromLogAlpha):
    """Continuous VP-SDE with linear beta(t) = beta_min + t (beta_max - beta_min) (Song et al. 2021).

    log alpha(t) = -(beta_max - beta_min) t^2 / 4 - beta_min t / 2,   sigma = sqrt(1 - alpha^2)
    """

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, t_min: float = 1e-3, t_max: float = 1.0):
        self.beta_min = check_range("beta_min", beta_min, 0.0, None, strict_low=False)
        self.beta_max = check_range("beta_max", beta_max, 0.0)
        if self.beta_max < self.beta_min:
            raise ValueError(f"beta_max must be >= beta_min, got beta_min={beta_min}, beta_max={beta_max}")
        self.t_min, self.t_max = check_times(t_min, t_max, 0.0)

    def beta(self, t) -> Tensor:
        return self.beta_min + as_time(t) * (self.beta_max - self.beta_min)

    def log_alpha(self, t) -> Tensor:
        t = as_time(t)
        return -0.25 * t * t * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

    def alpha_dot(self, t) -> Tensor:
        t = as_time(t)
        return -0.5 * self.beta(t) * self.alpha(t)

    def t_of_log_snr(self, lam) -> Tensor:
        return _vp_t_of_log_alpha(_log_alpha_of_log_snr_vp(as_time(lam)), self.beta_min, self.beta_max)

    def _repr_fields(self) -> dict:
        return {"beta_min": self.beta_min, "beta_max": self.beta_max, **super()._repr_fields()}


class VPCosine(_VPFromLogAlpha):
    """Cosine VP schedule (Nichol & Dhariwal 2021) in continuous time, as in DPM-Solver.

        alpha(t) = cos((t + s)/(1 + s) * pi/2) / cos(s/(1 + s) * pi/2),   sigma = sqrt(1 - alpha^2)

    ``t_max`` defaults to 0.9946 (DPM-Solver's clip), where the log-SNR is still finite.
    """

    def __init__(self, s: float = 0.008, t_min: float = 1e-3, t_max: float = 0.9946):
        self.s = check_range("s", s, 0.0, None, strict_low=False)
        self.t_min, self.t_max = check_times(t_min, t_max, 0.0, 1.0)
        self._log_alpha0 = math.log(math.cos(self.s / (1.0 + self.s) * math.pi / 2.0))

    def log_alpha(self, t) -> Tensor:
        t = as_time(t)
        return torch.log(torch.cos((t + self.s) / (1.0 + self.s) * math.pi / 2.0)) - self._log_alpha0

    def alpha_dot(self, t) -> Tensor:
        t = as_time(t)
        k = math.pi / (2.0 * (1.0 + self.s))
        return -k * torch.sin(k * (t + self.s)) / math.exp(self._log_alpha0)

    def t_of_log_snr(self, lam) -> Tensor:
        la = _log_alpha_of_log_snr_vp(as_time(lam))
        return 2.0 * (1.0 + self.s) / math.pi * torch.arccos(torch.exp(la + self._log_alpha0)) - self.s

    def _repr_fields(self) -> dict:
        return {"s": self.s, **super()._repr_fields()}


def _diffusers_betas(cfg: Mapping[str, Any]) -> torch.Tensor:
    """Betas exactly as diffusers' DDPM-style schedulers build them (float32)."""
    n = int(cfg.get("num_train_timesteps", 1000))
    trained = cfg.get("trained_betas")
    if trained is not None:
        return torch.tensor(trained, dtype=torch.float32)
    kind = cfg.get("beta_schedule", "linear")
    start = float(cfg.get("beta_start", 0.0001))
    end = float(cfg.get("beta_end", 0.02))
    if kind == "linear":
        return torch.linspace(start, end, n, dtype=torch.float32)
    if kind == "scaled_linear":
        return torch.linspace(start**0.5, end**0.5, n, dtype=torch.float32) ** 2
    if kind == "squaredcos_cap_v2":

        def abar(u: float) -> float:
            return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = [min(1 - abar((i + 1) / n) / abar(i / n), 0.999) for i in range(n)]
        return torch.tensor(betas, dtype=torch.float32)
    raise ValueError(
        f"beta_schedule {kind!r} is not supported; allowed: 'linear', 'scaled_linear', 'squaredcos_cap_v2' "
        "(or pass trained_betas)"
    )


def rescale_zero_terminal_snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2024, Algorithm 1: shift and scale sqrt(alphas_cumprod) so the last one is 0."""
    sq = alphas_cumprod.sqrt()
    first, last = sq[0].clone(), sq[-1].clone()
    sq = (sq - last) * first / (first - last)
    return sq**2


def _rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """The betas of :func:`rescale_zero_terminal_snr`'s alphas_cumprod."""
    acp = rescale_zero_terminal_snr(torch.cumprod(1.0 - betas, dim=0))
    alphas = torch.cat([acp[0:1], acp[1:] / acp[:-1]])
    return 1.0 - alphas


def diffusers_alphas_cumprod(config: Mapping[str, Any]) -> torch.Tensor:
    """alphas_cumprod of a DDPM-style diffusers config, in float32 exactly as diffusers builds them
    (betas, then zero terminal SNR if ``rescale_betas_zero_snr``)."""
    betas = _diffusers_betas(config)
    if config.get("rescale_betas_zero_snr", False):
        betas = _rescale_zero_terminal_snr(betas)
    return torch.cumprod(1.0 - betas, dim=0)


class VPDiscrete(_VPFromLogAlpha):
    """A discrete DDPM-style schedule (betas or alphas_cumprod of N steps) in continuous time.

    As in DPM-Solver's ``NoiseScheduleVP('discrete')``: step k = 0..N-1 sits at t_k = (k + 1)/N and
    log alpha is interpolated piecewise linearly in t between those points (linear extrapolation
    beyond them), so alpha(t_k)^2 == alphas_cumprod[k] exactly. t = 0 is added as the clean end
    (alpha = 1, sigma = 0), so a grid may end there as diffusers' schedulers do. The network time is
    the diffusers timestep ``N t - 1`` (0 at t = 1/N, N - 1 at t = 1). ``t_min`` defaults to 1/N
    (where the log-SNR is still finite), ``t_max`` to 1.
    """

    default_grid = "log-snr"

    def __init__(
        self,
        betas: Sequence[float] | Tensor | None = None,
        alphas_cumprod: Sequence[float] | Tensor | None = None,
        t_min: float | None = None,
        t_max: float = 1.0,
        zero_snr_floor: float = 2.0**-24,
    ):
        if (betas is None) == (alphas_cumprod is None):
            raise ValueError("VPDiscrete: pass exactly one of `betas` or `alphas_cumprod`")
        if betas is not None:
            b = torch.as_tensor(betas)
            if b.ndim != 1 or len(b) < 2:
                raise ValueError(f"betas must be a 1-D sequence of length >= 2, got shape {tuple(b.shape)}")
            if not bool(((b >= 0) & (b < 1)).all()):
                raise ValueError("betas must lie in [0, 1)")
            acp = torch.cumprod(1.0 - b, dim=0)
        else:
            acp = torch.as_tensor(alphas_cumprod)
            if acp.ndim != 1 or len(acp) < 2:
                raise ValueError(f"alphas_cumprod must be a 1-D sequence of length >= 2, got shape {tuple(acp.shape)}")
        acp = acp.to(torch.float64)
        # zero terminal SNR: alphas_cumprod[-1] = 0 becomes ``zero_snr_floor`` (2**-24 as diffusers'
        # k-diffusion-style schedulers; smaller to approach DDIM's and DDPM's exact 0)
        acp = acp.clamp(min=check_range("zero_snr_floor", zero_snr_floor, 0.0, 2.0**-24, strict_low=True))
        if not bool(((acp > 0) & (acp <= 1)).all()) or not bool((acp[1:] <= acp[:-1]).all()):
            raise ValueError("alphas_cumprod must be non-increasing and lie in (0, 1]")
        if bool((acp == 1).any()):
            raise ValueError("alphas_cumprod must be < 1 (a zero beta at the first step gives sigma = 0)")
        self.alphas_cumprod = acp
        self.num_train_timesteps = n = len(acp)
        # step k sits at t = (k + 1)/N; t = 0 is the clean data (alpha = 1, sigma = 0), the point
        # diffusers' schedulers step to last ("final_alpha_cumprod = 1", "final_sigmas_type = zero")
        self._t = torch.arange(0, n + 1, dtype=torch.float64) / n
        self._log_alpha = torch.cat([torch.zeros(1, dtype=torch.float64), 0.5 * torch.log(acp)])
        t_min = 1.0 / n if t_min is None else t_min
        self.t_min, self.t_max = check_times(t_min, t_max, 0.0)

    @classmethod
    def from_diffusers_config(cls, config: Any, **kwargs) -> VPDiscrete:
        """Build from a diffusers DDPM-style scheduler config (a dict, a FrozenDict or a scheduler).

        Reads ``num_train_timesteps``, ``beta_start``, ``beta_end``, ``beta_schedule`` ('linear',
        'scaled_linear', 'squaredcos_cap_v2'), ``trained_betas`` and ``rescale_betas_zero_snr``, and
        builds the betas and their cumulative product in float32 exactly as diffusers does.
        """
        cfg = getattr(config, "config", config)
        if not isinstance(cfg, Mapping):
            raise TypeError(f"from_diffusers_config expects a mapping or a scheduler, got {type(config).__name__}")
        return cls(alphas_cumprod=diffusers_alphas_cumprod(cfg), **kwargs)

    @staticmethod
    def _interp(x: Tensor, xp: Tensor, fp: Tensor) -> Tensor:
        """Piecewise-linear interpolation of (xp, fp) at x, xp ascending, linear extrapolation."""
        xp = xp.to(x.device)
        fp = fp.to(x.device)
        idx = torch.searchsorted(xp, x.detach().contiguous()).clamp(1, len(xp) - 1)
        x0, x1 = xp[idx - 1], xp[idx]
        f0, f1 = fp[idx - 1], fp[idx]
        return f0 + (x - x0) * (f1 - f0) / (x1 - x0)

    def log_alpha(self, t) -> Tensor:
        t = as_time(t)
        return self._interp(t, self._t, self._log_alpha)

    def alpha_dot(self, t) -> Tensor:
        return self._derivative(self.alpha, t)

    def t_of_log_snr(self, lam) -> Tensor:
        la = _log_alpha_of_log_snr_vp(as_time(lam))
        # log alpha decreases in t: interpolate on the flipped (ascending) arrays
        return self._interp(la, self._log_alpha.flip(0), self._t.flip(0))

    def timestep(self, t) -> Tensor:
        """diffusers' discrete timestep: N t - 1 (so t_k = (k + 1)/N gives k)."""
        return as_time(t) * self.num_train_timesteps - 1.0

    def t_of_timestep(self, k) -> Tensor:
        """Inverse of :meth:`timestep`."""
        return (as_time(k) + 1.0) / self.num_train_timesteps

    def _repr_fields(self) -> dict:
        return {"num_train_timesteps": self.num_train_timesteps, **super()._repr_fields()}


class SubVP(VPLinear):
    """Sub-VP SDE (Song et al. 2021): VP's alpha with sigma = 1 - alpha^2 (sigma is the std).

    dx = -beta(t)/2 x dt + sqrt(beta(t) (1 - exp(-2 beta_min t - (beta_max - beta_min) t^2))) dw
    """

    def sigma(self, t) -> Tensor:
        return -torch.expm1(2.0 * self.log_alpha(as_time(t)))

    def log_snr(self, t) -> Tensor:
        la = self.log_alpha(as_time(t))
        return la - torch.log(-torch.expm1(2.0 * la))

    def sigma_dot(self, t) -> Tensor:
        t = as_time(t)
        a = self.alpha(t)
        return -2.0 * a * self.alpha_dot(t)

    def t_of_log_snr(self, lam) -> Tensor:
        lam = as_time(lam)
        # e^lam (1 - a^2) = a  =>  a = 2 e^lam / (1 + sqrt(1 + 4 e^{2 lam}))   (stable root)
        e = torch.exp(lam)
        a = 2.0 * e / (1.0 + torch.sqrt(1.0 + 4.0 * e * e))
        return _vp_t_of_log_alpha(torch.log(a), self.beta_min, self.beta_max)
