"""Grid kinds by the names other samplers give them (k-diffusion, ComfyUI, diffusers).

Each function here is one kind: it takes ``u``, ``steps + 1`` evenly spaced values from 0 (the
``t_max`` end) to 1 (the ``t_min`` end), and returns either noise levels or a fraction of the time
range; :func:`diffsolve.schedules.grids.make_grid` turns those into the schedule's own times.

Noise levels are the EDM noise level s = sigma/alpha = exp(-lambda) (what k-diffusion, ComfyUI and
diffusers' ``sigmas`` mean on a diffusion model), converted to times with the schedule's inverse
log-SNR: t = ``schedule.t_of_log_snr(-log s)``. ``s_max`` and ``s_min`` are the noise levels at
``t_max`` and ``t_min``. Where the source's list has ``steps`` noise levels and a trailing 0, ours
has ``steps + 1``: the source's n is our ``steps + 1`` and its ramp i/(n - 1) is our ``u``.

Tabulated kinds (Align Your Steps) and kinds read off a discrete model's sigma table are at the end.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .tables import AYS_TABLES, GITS_TABLES, OPTIMAL_STEPS_TABLES

Tensor = torch.Tensor

__all__ = ["AYS_TABLES", "GITS_TABLES", "OPTIMAL_STEPS_TABLES"]  # re-exported: the tables live in .tables


def polyexponential(u: Tensor, s_max: float, s_min: float, rho: float = 1.0) -> Tensor:
    """k-diffusion's ``get_sigmas_polyexponential`` (ComfyUI's PolyexponentialScheduler):
    log s = log s_min + (1 - u)^rho (log s_max - log s_min). rho = 1 is ``exponential``."""
    if not rho > 0:
        raise ValueError(f"rho must be > 0, got {rho}")
    lo, hi = math.log(s_min), math.log(s_max)
    return torch.exp(lo + (1.0 - u) ** rho * (hi - lo))


def karras(u: Tensor, s_max: float, s_min: float, rho: float = 7.0) -> Tensor:
    """Karras et al. 2022, eq. 5 (k-diffusion ``get_sigmas_karras``, diffusers ``use_karras_sigmas``):
    s = (s_max^(1/rho) + u (s_min^(1/rho) - s_max^(1/rho)))^rho."""
    if not rho > 0:
        raise ValueError(f"rho must be > 0, got {rho}")
    a, b = s_max ** (1 / rho), s_min ** (1 / rho)
    return (a + u * (b - a)) ** rho


def _vp_sde_time(s: float, beta_d: float, beta_min: float) -> float:
    """The time of the VP SDE with s = sqrt(exp(beta_d t^2/2 + beta_min t) - 1) (stable root)."""
    L = math.log1p(s * s)
    return 2.0 * L / (beta_min + math.sqrt(beta_min * beta_min + 2.0 * beta_d * L))


def vp(u: Tensor, s_max: float, s_min: float, beta_d: float = 19.9, beta_min: float = 0.1) -> Tensor:
    """k-diffusion's ``get_sigmas_vp`` (ComfyUI's VPScheduler; the VP SDE of Song et al. 2021):
    s = sqrt(exp(beta_d tau^2/2 + beta_min tau) - 1) with tau uniform from tau(s_max) to tau(s_min).

    k-diffusion runs tau from 1 to eps_s = 1e-3; here the ends are where the VP SDE's noise level
    equals the schedule's at ``t_max`` and ``t_min``, which is the same list when those are
    s(1) = 152.9 and s(1e-3) = 0.0100 (and is uniform in t on :class:`VPLinear` with its defaults).
    """
    if not (beta_d >= 0 and beta_min >= 0 and beta_d + beta_min > 0):
        raise ValueError(f"beta_d, beta_min must be >= 0 and not both 0, got {beta_d}, {beta_min}")
    hi, lo = _vp_sde_time(s_max, beta_d, beta_min), _vp_sde_time(s_min, beta_d, beta_min)
    tau = hi + u * (lo - hi)
    return torch.sqrt(torch.expm1(0.5 * beta_d * tau * tau + beta_min * tau))


def kl_optimal(u: Tensor, s_max: float, s_min: float) -> Tensor:
    """Align Your Steps (Sabour, Fidler, Kreis 2024), Thm 3.1, as ComfyUI's ``kl_optimal`` (via
    A1111 PR #15608): s = tan((1 - u) atan s_max + u atan s_min)."""
    return torch.tan((1.0 - u) * math.atan(s_max) + u * math.atan(s_min))


def laplace(u: Tensor, s_max: float, s_min: float, mu: float = 0.0, beta: float = 0.5) -> Tensor:
    """ComfyUI's ``get_sigmas_laplace`` (Hang, Gu et al. 2024, "Improved Noise Schedule for Diffusion
    Training", arXiv 2407.03297): log s = mu - beta sign(1/2 - u) log(1 - 2 |1/2 - u| + 1e-5),
    clamped to [s_min, s_max]. The clamp makes repeated levels near the ends when the range is
    narrow or the steps many; :func:`make_grid` then refuses the grid (it is not strictly decreasing).
    """
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    d = 0.5 - u
    lam = mu - beta * torch.sign(d) * torch.log(1.0 - 2.0 * d.abs() + 1e-5)
    return torch.exp(lam).clamp(min=s_min, max=s_max)


def beta_sigmas(u: Tensor, s_max: float, s_min: float, alpha: float = 0.6, beta: float = 0.6) -> Tensor:
    """diffusers' ``use_beta_sigmas`` (Lee et al. 2024, "Beta Sampling is All You Need",
    arXiv 2407.12173): s = s_min + F^-1(1 - u) (s_max - s_min), F the Beta(alpha, beta) CDF.

    ComfyUI's ``beta`` scheduler differs (it rounds F^-1 to training timesteps of the model's table).
    """
    from scipy.special import betaincinv

    if not (alpha > 0 and beta > 0):
        raise ValueError(f"alpha and beta must be > 0, got alpha={alpha}, beta={beta}")
    ppf = torch.as_tensor(betaincinv(alpha, beta, (1.0 - u).numpy()), dtype=torch.float64)
    return s_min + ppf * (s_max - s_min)


def linear_quadratic(steps: int, threshold: float = 0.025, linear_steps: int | None = None) -> Tensor:
    """Genmo Mochi 1's schedule (ComfyUI's ``linear_quadratic``) as the fraction f of the time range
    (1 at ``t_max``, 0 at ``t_min``): 1 - f rises linearly from 0 to ``threshold`` over the first
    ``linear_steps`` (default steps // 2) steps, then quadratically to 1.

    ComfyUI multiplies 1 - f by the model's sigma_max; here t = t_min + f (t_max - t_min), the same
    list on a rectified flow with t in [0, 1].
    """
    if steps == 1:
        return torch.tensor([1.0, 0.0], dtype=torch.float64)
    m = steps // 2 if linear_steps is None else int(linear_steps)
    if not 0 < m < steps:
        raise ValueError(f"linear_steps must be in 1..steps-1, got {m}")
    if not 0 < threshold < 1:
        raise ValueError(f"threshold must be in (0, 1), got {threshold}")
    q = steps - m
    diff = m - threshold * steps
    quad = diff / (m * q * q)
    lin = threshold / m - 2.0 * diff / (q * q)
    const = quad * m * m
    i = torch.arange(steps, dtype=torch.float64)
    x = torch.where(i < m, i * threshold / m, quad * i * i + lin * i + const)
    return 1.0 - torch.cat([x, torch.ones(1, dtype=torch.float64)])


# ---------------------------------------------------------------- tabulated kinds, a discrete model's table
def loglinear(table: Sequence[float], steps: int) -> Tensor:
    """A table of descending noise levels at any step count, as ComfyUI's tabulated schedulers (Align
    Your Steps, GITS past 20 steps, OptimalSteps) stretch theirs: the table's points sit evenly on
    [0, 1] and log s is interpolated linearly at ``steps + 1`` even positions (the table itself when
    it has ``steps + 1`` points). Returns ``steps + 1`` descending noise levels."""
    xs = torch.linspace(0.0, 1.0, len(table), dtype=torch.float64)
    ys = torch.log(torch.tensor(table, dtype=torch.float64))
    x = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64)
    j = torch.searchsorted(xs, x).clamp(1, len(xs) - 1)
    w = (x - xs[j - 1]) / (xs[j] - xs[j - 1])
    return torch.exp(ys[j - 1] + w * (ys[j] - ys[j - 1]))


def comfy_discrete(kind: str, num_train_timesteps: int, steps: int) -> Tensor:
    """ComfyUI's schedulers on a discrete model's table of N = ``num_train_timesteps`` noise levels
    (``comfy/samplers.py``), as diffusers timesteps tau in [0, N - 1] of the ``steps`` noisy points
    (ComfyUI then appends the noise level 0):

    - ``simple``: table entries N - 1 - floor(i N/steps), i = 0 .. steps - 1;
    - ``sgm-uniform``: ``steps + 1`` timesteps uniform from N - 1 to 0, the last dropped (Stability's
      sgm code);
    - ``normal``: ``steps`` timesteps uniform from N - 1 to 0;
    - ``ddim-uniform``: table entries 1, 1 + c, 1 + 2c, ... below N, c = floor(N/steps), reversed
      (this list has ``steps`` entries only when ceil((N - 1)/c) = steps; otherwise it is refused).
    """
    n = num_train_timesteps
    if kind == "simple":
        ss = n / steps
        return torch.tensor([float(n - 1 - int(i * ss)) for i in range(steps)], dtype=torch.float64)
    if kind == "sgm-uniform":
        return torch.linspace(n - 1, 0, steps + 1, dtype=torch.float64)[:-1]
    if kind == "normal":
        return torch.linspace(n - 1, 0, steps, dtype=torch.float64)
    if kind == "ddim-uniform":
        c = max(n // steps, 1)
        k = list(range(1, n, c))[::-1]
        if len(k) != steps:
            raise ValueError(
                f"grid kind 'ddim-uniform' gives {len(k)} steps, not {steps}, on {n} training steps (as ComfyUI's "
                f"ddim_uniform: table entries 1, 1 + {c}, ... below {n}); ask for {len(k)} steps"
            )
        return torch.tensor(k, dtype=torch.float64)
    raise AssertionError(kind)


#: Align Your Steps' own name for :func:`loglinear`
ays = loglinear


def gits(steps: int, coeff: float = 1.20) -> Tensor:
    """GITS (Chen et al. 2024) as ComfyUI's GITSScheduler: the published row of ``steps`` steps
    (2 .. 20) for the DP coefficient ``coeff`` (0.80, 0.85, .., 1.50), and past 20 steps the 20-step
    row stretched by :func:`loglinear`. Returns ``steps + 1`` descending noise levels sigma/alpha."""
    key = round(float(coeff), 2)
    if key not in GITS_TABLES or not math.isclose(key, float(coeff), abs_tol=1e-9):
        raise ValueError(f"coeff must be one of {', '.join(f'{k:.2f}' for k in GITS_TABLES)}, got {coeff}")
    if steps < 2:
        raise ValueError(f"grid kind 'gits' is tabulated from 2 steps, got steps={steps}")
    rows = GITS_TABLES[key]
    if steps - 2 < len(rows):
        return torch.tensor(rows[steps - 2], dtype=torch.float64)
    return loglinear(rows[-1], steps)


def optimal_steps(steps: int, model: str = "flux") -> Tensor:
    """OptimalSteps (Pei et al. 2025) as ComfyUI's OptimalStepsScheduler: the model's published table
    of flow noise levels sigma in [0, 1] (FLUX 10 steps, Wan 20, Chroma 40), stretched by
    :func:`loglinear` to other step counts. Returns ``steps + 1`` descending flow sigmas; the last
    (0.001 in the tables) stands for the clean end, which ComfyUI sets to 0."""
    key = str(model).strip().lower()
    if key not in OPTIMAL_STEPS_TABLES:
        raise ValueError(f"model must be one of {', '.join(OPTIMAL_STEPS_TABLES)}, got {model!r}")
    return loglinear(OPTIMAL_STEPS_TABLES[key], steps)


def comfy_beta(num_train_timesteps: int, steps: int, alpha: float = 0.6, beta: float = 0.6) -> Tensor:
    """ComfyUI's ``beta`` scheduler (Lee et al. 2024, "Beta Sampling is All You Need", arXiv
    2407.12173) as diffusers timesteps: tau_i = rint(F^-1(1 - i/steps) (N - 1)), i = 0 .. steps - 1,
    F the Beta(alpha, beta) CDF, consecutive repeats dropped (so fewer than ``steps`` when the
    quantiles crowd closer than one training step). Unlike diffusers' ``use_beta_sigmas``
    (:func:`beta_sigmas`, linear in sigma) this places the quantiles in timestep."""
    from scipy.special import betaincinv

    if not (alpha > 0 and beta > 0):
        raise ValueError(f"alpha and beta must be > 0, got alpha={alpha}, beta={beta}")
    q = 1.0 - torch.arange(steps, dtype=torch.float64) / steps
    tau = torch.round(
        torch.as_tensor(betaincinv(alpha, beta, q.numpy()), dtype=torch.float64) * (num_train_timesteps - 1)
    )
    return torch.unique_consecutive(tau)


def sd_turbo(steps: int) -> Tensor:
    """ComfyUI's SDTurboScheduler (SD-Turbo, Sauer et al. 2023, adversarial diffusion distillation):
    the first ``steps`` (at most 10) of the timesteps 999, 899, .., 99."""
    if steps > 10:
        raise ValueError(f"grid kind 'sd-turbo' has 10 timesteps (999, 899, .., 99); got steps={steps}")
    return torch.arange(999, 98, -100, dtype=torch.float64)[:steps]


def diffusers_spacing(
    kind: str, num_train_timesteps: int, steps: int, steps_offset: int = 0, rounded: bool = False
) -> Tensor:
    """diffusers' ``timestep_spacing`` (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample
    Steps are Flawed", Table 2) as the ``steps`` timesteps ``set_timesteps`` lists, N = ``num_train_timesteps``:

    - ``leading``: k floor(N/steps) + ``steps_offset``, k = steps - 1 .. 0 (DDIM's default);
    - ``trailing``: round(N - k N/steps) - 1, k = 0 .. steps - 1 (starts at N - 1);
    - ``linspace``: ``steps`` values uniform from N - 1 to 0, as EulerDiscreteScheduler lists them
      (in float32), or rounded to integers as DDIMScheduler does (``rounded=True``).
    """
    n = num_train_timesteps
    if kind == "leading":
        stride = n // steps
        if stride < 1:
            raise ValueError(f"grid kind 'leading' needs steps <= {n}, got {steps}")
        return torch.arange(steps - 1, -1, -1, dtype=torch.float64) * stride + int(steps_offset)
    if kind == "trailing":
        ratio = n / steps
        return torch.round(n - torch.arange(steps, dtype=torch.float64) * ratio) - 1.0
    if kind == "linspace":
        if rounded:
            return torch.linspace(0, n - 1, steps, dtype=torch.float64).round().flip(0)
        return torch.linspace(0, n - 1, steps, dtype=torch.float64).to(torch.float32).to(torch.float64).flip(0)
    raise AssertionError(kind)
