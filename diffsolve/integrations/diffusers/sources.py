"""What the diffusers scheduler being replaced does: its schedule, where it places the steps and what
the network sees.

A published scheduler config names its class (``_class_name``) and its options. A :class:`Source`
reads them once and answers what :class:`~diffsolve.integrations.diffusers.DiffsolveScheduler` needs
to be a drop-in replacement:

- ``schedule``: the forward process as a diffsolve schedule (VPDiscrete from the betas, RectifiedFlow
  for flow matching, EDM for the EDM-preconditioned schedulers);
- :meth:`Source.place`: the source's own steps for N inference steps, as a descending grid of
  diffsolve times (ending where the source ends) and the network timestep the source lists at each
  of them. The steps are computed by the source class itself (every sigma option of diffusers:
  Karras, exponential, beta, Lu lambdas, flow sigmas and shifts, ``final_sigmas_type``,
  ``timestep_spacing``, ``steps_offset``, zero terminal SNR), and the solver steps on exactly the
  source's sigmas while the network is called at exactly the source's (possibly rounded) timesteps;
- :meth:`Source.net_timestep`: the network timestep of a query between grid points (the source's
  own map from noise level to timestep);
- :meth:`Source.c_in` and :meth:`Source.prediction`: the input scaling and the output's meaning
  (EDM preconditioning, learned-variance channels, ``clip_sample`` and ``thresholding``).

Options that diffsolve cannot honour are refused with an error that names the key.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ...guidance.hooks import dynamic_threshold
from ...models.model import Prediction
from ...models.parameterization import Coefs, to_x0_eps
from ...schedules import EDM, RectifiedFlow, VPDiscrete
from ...schedules.base import Schedule
from ...schedules.vp import (
    _diffusers_betas,
    diffusers_alphas_cumprod,
    rescale_zero_terminal_snr,
)
from .config import PREDICTIONS

Tensor = torch.Tensor

# the diffusers schedulers whose steps diffsolve reproduces, by family
VP_SOURCES = (
    "DDIMScheduler",
    "DDIMParallelScheduler",
    "DDPMScheduler",
    "DDPMParallelScheduler",
    "PNDMScheduler",
    "LMSDiscreteScheduler",
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "HeunDiscreteScheduler",
    "KDPM2DiscreteScheduler",
    "KDPM2AncestralDiscreteScheduler",
    "DPMSolverMultistepScheduler",
    "DPMSolverSinglestepScheduler",
    "DPMSolverSDEScheduler",
    "DEISMultistepScheduler",
    "UniPCMultistepScheduler",
    "SASolverScheduler",
    "LCMScheduler",
    "TCDScheduler",
    "UnCLIPScheduler",
    "CogVideoXDDIMScheduler",
    "CogVideoXDPMScheduler",
)
FLOW_SOURCES = (
    "FlowMatchEulerDiscreteScheduler",
    "FlowMatchHeunDiscreteScheduler",
    "FlowMatchLCMScheduler",
    "FlowMapEulerDiscreteScheduler",
    "MiniMaxH3Scheduler",
    "LTXEulerAncestralRFScheduler",
)
# flow sources whose network sees the time 1 - sigma (scaled by ``num_train_timesteps``, 1 where the
# config has none) and predicts the data-ward velocity (x0 - noise): the time and sign conventions
_FLIPPED_TIME = ("MiniMaxH3Scheduler",)
# sources known by their ``_class_name`` (or scheduler object) only: their options are among those of
# other flow schedulers (FlowMatchHeun's), so a config made in code without a class name is not theirs
_NAMED_ONLY = ("FlowMapEulerDiscreteScheduler", "MiniMaxH3Scheduler", "LTXEulerAncestralRFScheduler")
EDM_SOURCES = {
    "EDMEulerScheduler": "edm",
    "EDMDPMSolverMultistepScheduler": "edm",
    "CosineDPMSolverMultistepScheduler": "cosine",
}
REFUSED = {
    "DDPMWuerstchenScheduler": "Stable Cascade's pipelines condition the network on r in [0, 1] only "
    "for this class (found by isinstance) and compute r from the betas of any "
    "other scheduler; no drop-in reproduces that (use it as it is)",
    "HeliosScheduler": "its grid is stage-wise (set_timesteps(n, stage_index) per stage, each with "
    "its own network-time map; the pipeline re-noises between stages); step each stage with "
    "diffsolve's euler / unipc on RectifiedFlow and the stage's sigmas (tests/test_catalog_helios.py)",
    "HeliosDMDScheduler": "its grid is stage-wise and its step re-noises with the stage's start "
    "latent (dmd_noisy_tensor); step each stage with diffsolve's lcm on RectifiedFlow "
    "(tests/test_catalog_helios.py)",
}
# sources that step from a timestep to it minus num_train_timesteps // N
_STRIDE_STEP = (
    "DDIMScheduler",
    "DDIMParallelScheduler",
    "CogVideoXDDIMScheduler",
    "CogVideoXDPMScheduler",
    "PNDMScheduler",
)
# sources whose last step returns the clean estimate whatever set_alpha_to_one says
_CLEAN_END = ("DDPMScheduler", "DDPMParallelScheduler", "LCMScheduler", "TCDScheduler", "UnCLIPScheduler")


def source_class(config: Mapping[str, Any]) -> str | None:
    """The diffusers scheduler class a config belongs to: its ``_class_name``, or else (a scheduler
    made in code has none) the class with the most options that are all among the config's keys
    (a config made from another scheduler's keeps that one's keys too); None when that is not one
    class."""
    name = config.get("_class_name")
    if name:
        return str(name)
    import diffusers

    keys = {k for k in config if not k.startswith("_")}
    fits = {
        n: len(p)
        for n in (*VP_SOURCES, *FLOW_SOURCES, *EDM_SOURCES)
        if n not in _NAMED_ONLY and (p := set(_params(getattr(diffusers, n, None)))) and p <= keys
    }
    if not fits:
        return None
    most = max(fits.values())
    best = [n for n, k in fits.items() if k == most]
    return best[0] if len(best) == 1 else None


def _params(cls) -> list[str]:
    if cls is None:
        return []
    return [k for k in inspect.signature(cls.__init__).parameters if k not in ("self", "kwargs")]


@dataclass
class Placement:
    """A source's steps: ``grid`` (descending diffsolve times, the final point included),
    ``timesteps`` (grid time -> the network timestep the source lists there), ``init_noise_sigma``
    (the scale of the pipeline's initial noise) and ``identity_last`` (the source's last listed call
    steps from a noise level to itself, DDIM with ``set_alpha_to_one=False`` ending at timestep 0: a
    call whose step leaves the sample unchanged)."""

    grid: Tensor
    timesteps: dict[float, float]
    init_noise_sigma: float = 1.0
    identity_last: bool = False
    read_listed: bool = False  # the source reads each output at its own noise level of the listed timestep
    over_alpha: bool = False  # the source's latents are x/alpha (k-diffusion style), not x


class Source:
    """A scheduler config as diffsolve reads it (see the module docstring)."""

    schedule: Schedule
    kind: str
    flow: bool = False

    def __init__(self, config: Mapping[str, Any], name: str):
        self.config, self.name = dict(config), name
        self.clip = float(config.get("clip_sample_range", 1.0)) if config.get("clip_sample", False) else None
        self.threshold = (
            (float(config.get("dynamic_thresholding_ratio", 0.995)), float(config.get("sample_max_value", 1.0)))
            if config.get("thresholding", False)
            else None
        )
        self.learned_variance = config.get("variance_type") in ("learned", "learned_range")

    # -- the source's steps
    def reference(self):
        """The source scheduler itself, built from the config (its own defaults for absent keys)."""
        import diffusers

        cls = getattr(diffusers, self.name)
        keys = set(_params(cls)) - set(self.config.get("_use_default_values", []))
        return cls.from_config({k: v for k, v in self.config.items() if k in keys})

    def place(self, n: int, timesteps=None, sigmas=None, mu: float | None = None) -> Placement:
        raise NotImplementedError

    def net_timestep(self, t: float) -> float:
        raise NotImplementedError

    @property
    def t_min(self) -> float:
        """The smallest training noise level, as a time."""
        raise NotImplementedError

    def prior_scale(self, t0: float) -> float:
        """The scale of the initial noise at time t0 on diffsolve's own grids."""
        return 1.0

    def listed_sigma(self, t: float) -> float:
        """The noise level the source lists in ``sigmas`` at time t (sigma/alpha)."""
        a, s = self.schedule.at(t)
        return 0.0 if s == 0 else s / a

    def t_of_net(self, k: float) -> float:
        """The time of a network timestep (the inverse of :meth:`net_timestep`)."""
        raise NotImplementedError

    def c_in(self, t: float) -> float:
        """The factor of the source's ``scale_model_input`` at time t (the latents here are x)."""
        return 1.0

    # -- the network's answer
    def prediction(self, x: Tensor, t, output: Tensor, read: float | None = None) -> Prediction:
        """The model output of the pipeline at (x, t) as a diffsolve Prediction, with the source's
        post-processing of x0 (``clip_sample``, ``thresholding``); learned-variance channels are
        dropped, as diffusers' deterministic schedulers do. ``read``: the source's timestep the
        output is read at (``Placement.read_listed``), handed to the solver as an (x0, eps) pair at t."""
        if self.learned_variance and output.shape[1] == 2 * x.shape[1]:
            output = output[:, : x.shape[1]]
        if read is not None:
            x0, eps = self._read_at(x, read, output)
            pred = Prediction.from_pair(x, t, x0, eps, self.schedule)
        else:
            pred = self._raw(x, t, output)
        if self.clip is None and self.threshold is None:
            return pred
        x0 = pred.x0
        if self.threshold is not None:
            x0 = dynamic_threshold(x0, *self.threshold)
        if self.clip is not None:
            x0 = x0.clamp(-self.clip, self.clip)
        return Prediction.from_pair(x, t, x0, pred.eps, self.schedule)

    def _raw(self, x: Tensor, t, output: Tensor) -> Prediction:
        return Prediction(x, t, output, self.kind, self.schedule)

    def _read_at(self, x: Tensor, k: float, output: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError


def _place_with(ref, n: int, kw: dict) -> None:
    """The source's own set_timesteps; where it fails (UnCLIP at one step), a ValueError saying so."""
    try:
        ref.set_timesteps(n, **kw) if kw else ref.set_timesteps(n)
    except (ZeroDivisionError, IndexError) as e:
        raise ValueError(f"{type(ref).__name__} cannot place num_inference_steps={n} ({type(e).__name__}: {e})") from e


def _unique_desc(values: Tensor) -> Tensor:
    return torch.unique_consecutive(values.to(torch.float64))


class VPSource(Source):
    """DDPM-style configs (betas): VPDiscrete, eps / x0 / v prediction. k-diffusion-style sources
    (Euler, Heun, DPM-Solver, ...) list sigma = sigma/alpha; DDIM-style ones (DDIM, PNDM, DDPM) list
    integer timesteps."""

    schedule: VPDiscrete

    def __init__(self, config, name):
        super().__init__(config, name)
        pt = config.get("prediction_type", "epsilon")
        if pt not in PREDICTIONS or pt == "flow_prediction":
            raise ValueError(
                f"prediction_type {pt!r} is not supported with this config; allowed: epsilon, sample, "
                "v_prediction (flow_prediction needs use_flow_sigmas=True)"
            )
        self.kind = PREDICTIONS[pt]
        tt = config.get("timestep_type", "discrete")
        if tt not in ("discrete", "continuous"):
            raise ValueError(f"timestep_type {tt!r} is not supported; allowed: 'discrete', 'continuous'")
        self.continuous = tt == "continuous"
        self.acp = vp_alphas_cumprod(config, name)  # as the source holds them (float32; 0 at zero SNR)
        # at zero terminal SNR, sources that list sigmas (k-diffusion style) hold alphas_cumprod at
        # 2**-24; DDIM-style ones (DDIM, DDPM, ...) step from exactly 0, which 1e-20 approaches to
        # within their float32 rounding
        k_style = getattr(self.reference(), "sigmas", None) is not None
        self.schedule = VPDiscrete(alphas_cumprod=self.acp, zero_snr_floor=2.0**-24 if k_style else 1e-20)

    def place(self, n, timesteps=None, sigmas=None, mu=None):
        ref = self.reference()
        kw = {k: v for k, v in (("timesteps", timesteps), ("sigmas", sigmas)) if v is not None}
        takes = inspect.signature(ref.set_timesteps).parameters
        if sigmas is not None and "sigmas" not in takes:
            raise ValueError(f"sigmas: {self.name} takes no explicit sigmas; give timesteps= or num_inference_steps")
        if timesteps is not None and "timesteps" not in takes:
            return self._given(ref, timesteps)
        _place_with(ref, n, kw)
        ts = torch.as_tensor(ref.timesteps, dtype=torch.float64).cpu()
        ref_sigmas = getattr(ref, "sigmas", None)
        s = self.schedule
        if ref_sigmas is not None and len(ref_sigmas) > len(_unique_desc(ts)):  # k-diffusion style: sigma/alpha
            sig = torch.as_tensor(ref_sigmas, dtype=torch.float64).cpu()
            t_of = {float(v): (0.0 if v == 0 else float(s.t_of_log_snr(-torch.log(v)))) for v in _unique_desc(sig)}
            grid = torch.tensor(list(t_of.values()), dtype=torch.float64)
            net = {t_of[float(v)]: float(k) for v, k in zip(sig, ts)}
            init = float(getattr(ref, "init_noise_sigma", 1.0))
            # the last listed call steps from a sigma to itself (DEIS, UniPC, DPM-Solver with
            # use_karras_sigmas and the like repeat the last sigma): a call that leaves the sample as it is
            same = len(sig) >= 2 and float(sig[-1]) == float(sig[-2]) and len(ts) == len(sig) - 1
            if init == 1.0:  # the latents are x
                return Placement(grid, net, init, identity_last=same)
            # k-diffusion style: the latents are x/alpha; the run starts at x and ends back in x/alpha
            return Placement(grid, net, init * float(s.alpha(grid[0])), identity_last=same, over_alpha=True)
        listed = _unique_desc(ts)
        if len(getattr(ref, "prk_timesteps", ())):  # PNDM's Runge-Kutta warm-up lists its half steps too
            listed = _unique_desc(torch.as_tensor(ref._timesteps, dtype=torch.float64).sort(descending=True).values)
        end = 0.0 if self._clean_end(ref) else float(s.t_of_timestep(0))
        # DDIM-style sources step from each listed timestep to it minus 1000 // N, then read the next
        # call at the next listed timestep (the two differ by one with trailing / linspace spacing)
        stride = len(self.schedule.alphas_cumprod) // n if self.name in _STRIDE_STEP else None
        ends = listed[1:] if stride is None else (listed[:-1] - stride).clamp_min(-1)
        state_t = torch.cat([s.t_of_timestep(listed[:1]), s.t_of_timestep(ends)])
        net = {float(a): float(k) for a, k in zip(state_t, listed)}
        identity_last = end == float(state_t[-1])
        grid = state_t if identity_last else torch.cat([state_t, state_t.new_tensor([end])])
        return Placement(grid, net, 1.0, identity_last, read_listed=True)

    def _given(self, ref, timesteps) -> Placement:
        """Explicit timesteps for a source that takes none (DDIM, PNDM): used as given, each a
        network timestep at diffsolve's time t = (k + 1) / N, ending where the source ends."""
        ts = torch.as_tensor(timesteps, dtype=torch.float64).cpu().reshape(-1)
        if len(ts) < 1 or not bool((ts[1:] < ts[:-1]).all()) or not bool(torch.isfinite(ts).all()):
            raise ValueError(f"timesteps must be finite and strictly decreasing, got {ts.tolist()}")
        t = self.schedule.t_of_timestep(ts)
        end = 0.0 if self._clean_end(ref) else self.t_min
        grid = t if float(t[-1]) == end else torch.cat([t, t.new_tensor([end])])
        return Placement(grid, {float(a): float(k) for a, k in zip(t, ts)}, 1.0, float(t[-1]) == end)

    def _clean_end(self, ref) -> bool:
        return (
            self.name in _CLEAN_END
            or bool(self.config.get("set_alpha_to_one", True))
            or "set_alpha_to_one" not in _params(type(ref))
        )

    def net_timestep(self, t):
        """Between the source's listed points, diffsolve's own map: timestep N t - 1 for discrete
        networks (as driver mode calls them), 0.25 log sigma for continuous ones."""
        if not self.continuous:
            return float(self.schedule.timestep(t))
        # at the clean end (queried by no step that uses the answer) the smallest training level
        lam = float(self.schedule.log_snr(torch.tensor(max(t, self.t_min), dtype=torch.float64)))
        return 0.25 * -lam

    @property
    def t_min(self):
        return float(self.schedule.t_of_timestep(0))

    def _read_at(self, x, k, output):
        a2 = self.acp[int(k)].to(torch.float64)
        c = Coefs(a2.sqrt().to(x), (1 - a2).sqrt().to(x))
        return to_x0_eps(self.kind, output, x, c)

    def t_of_net(self, k):
        if not self.continuous:
            return float(self.schedule.t_of_timestep(k))
        return float(self.schedule.t_of_log_snr(torch.tensor(-4.0 * k, dtype=torch.float64)))


def vp_alphas_cumprod(config: Mapping[str, Any], name: str | None = None) -> Tensor:
    """The alphas_cumprod of a DDPM-style config as diffusers builds them (float32): its betas, zero
    terminal SNR, and CogVideoX's SNR shift (``snr_shift_scale``) for its schedulers."""
    if name is None or not name.startswith("CogVideoX"):
        return diffusers_alphas_cumprod(config)
    acp = torch.cumprod(1.0 - _diffusers_betas(config), dim=0)
    k = float(config.get("snr_shift_scale", 3.0))
    acp = acp / (k + (1 - k) * acp)  # the SNR shift, before the rescaling
    return rescale_zero_terminal_snr(acp) if config.get("rescale_betas_zero_snr", False) else acp


class FlowSource(Source):
    """Flow matching (FlowMatch* schedulers, and DPM-Solver / UniPC with ``flow_prediction`` and
    ``use_flow_sigmas``): RectifiedFlow with t = sigma; the network timestep is the source's (sigma
    times ``num_train_timesteps``). Mochi's ``invert_sigmas`` lists 1 - sigma and wants minus the
    velocity; MiniMax-H3 lists sigma but conditions its network on 1 - sigma (in [0, 1]) and wants
    minus the velocity too."""

    kind = "velocity"
    flow = True

    def __init__(self, config, name):
        super().__init__(config, name)
        pt = config.get("prediction_type", "flow_prediction")
        if pt != "flow_prediction":
            raise ValueError(f"prediction_type {pt!r} is not supported for flow matching; allowed: flow_prediction")
        if config.get("scale_factors"):  # FlowMatchLCM's resizing of x0 between steps: not a solver step
            raise ValueError(
                "scale_factors is not supported: the state's size changes between steps (upscale_mode); "
                "use the diffusers scheduler"
            )
        self.schedule = RectifiedFlow()
        self.inverted = bool(config.get("invert_sigmas", False))  # the listed sigmas are 1 - sigma
        flipped = name in _FLIPPED_TIME
        self.flip_time = self.inverted or flipped  # the network time is 1 - sigma
        self.sign = -1.0 if self.flip_time else 1.0  # the data-ward velocity x0 - noise
        self.n_train = int(config.get("num_train_timesteps", 1 if flipped else 1000))

    def place(self, n, timesteps=None, sigmas=None, mu=None):
        ref = self.reference()
        kw = {k: v for k, v in (("timesteps", timesteps), ("sigmas", sigmas), ("mu", mu)) if v is not None}
        if self.config.get("use_dynamic_shifting", False) and mu is None:
            raise ValueError("this flow scheduler uses dynamic shifting (use_dynamic_shifting): set_timesteps needs mu")
        _place_with(ref, n, kw)
        sig = torch.as_tensor(ref.sigmas, dtype=torch.float64).cpu()
        ts = torch.as_tensor(ref.timesteps, dtype=torch.float64).cpu()
        t_all = 1.0 - sig if self.inverted else sig
        grid = _unique_desc(t_all)
        net = {float(a): float(k) for a, k in zip(t_all, ts)}
        return Placement(grid, net, float(getattr(ref, "init_noise_sigma", 1.0)))

    def net_timestep(self, t):
        return (1.0 - t if self.flip_time else t) * self.n_train

    @property
    def t_min(self):
        return 1.0 / max(self.n_train, 1000)

    def listed_sigma(self, t):
        return 1.0 - t if self.inverted else t

    def t_of_net(self, k):
        return 1.0 - k / self.n_train if self.flip_time else k / self.n_train

    def _raw(self, x, t, output):
        return Prediction(x, t, self.sign * output, "velocity", self.schedule)


class EDMSource(Source):
    """EDM-preconditioned schedulers (EDMEuler, EDMDPMSolverMultistep; CosineDPMSolverMultistep with
    its cosine noise conditioning): the EDM schedule (alpha = 1, sigma = t) and

        c_in = 1/sqrt(s^2 + sd^2),  x0 = sd^2/(s^2 + sd^2) x + c_out F,  c_out = +-s sd/sqrt(s^2 + sd^2)

    (+ for epsilon, - for v_prediction), network time c_noise = log(s)/4 (cosine: 2 atan(s)/pi).
    The steps are Karras' (``sigma_schedule="karras"``, ``rho``) or exponential, placed here as the
    source places them (CosineDPMSolverMultistep cannot be built without torchsde)."""

    kind = "x0"

    def __init__(self, config, name):
        super().__init__(config, name)
        pt = config.get("prediction_type", "epsilon")
        if pt not in ("epsilon", "v_prediction"):
            raise ValueError(
                f"prediction_type {pt!r} is not supported with EDM preconditioning; allowed: epsilon, v_prediction"
            )
        self.sign = 1.0 if pt == "epsilon" else -1.0
        self.noise = EDM_SOURCES[name]
        defaults = {"edm": (0.002, 80.0, 0.5), "cosine": (0.3, 500.0, 1.0)}[self.noise]
        self.s_min = float(config.get("sigma_min", defaults[0]))
        self.s_max = float(config.get("sigma_max", defaults[1]))
        self.sd = float(config.get("sigma_data", defaults[2]))
        self.rho = float(config.get("rho", 7.0))
        self.kind_of_sigmas = config.get("sigma_schedule", "karras" if self.noise == "edm" else "exponential")
        if self.kind_of_sigmas not in ("karras", "exponential"):
            raise ValueError(f"sigma_schedule {self.kind_of_sigmas!r} is not supported; allowed: karras, exponential")
        self.final = config.get("final_sigmas_type", "zero")
        if self.final not in ("zero", "sigma_min"):
            raise ValueError(f"final_sigmas_type {self.final!r} is not supported; allowed: zero, sigma_min")
        self.schedule = EDM(self.s_min, self.s_max)

    def place(self, n, timesteps=None, sigmas=None, mu=None):
        if timesteps is not None:
            raise ValueError(f"{self.name} takes no explicit timesteps")
        if sigmas is not None:
            sig = torch.as_tensor(sigmas, dtype=torch.float32)
        else:
            ramp = torch.linspace(0, 1, n, dtype=torch.float32)
            if self.kind_of_sigmas == "karras":
                lo, hi = self.s_min ** (1 / self.rho), self.s_max ** (1 / self.rho)
                sig = (hi + ramp * (lo - hi)) ** self.rho
            else:
                sig = torch.linspace(math.log(self.s_min), math.log(self.s_max), n).exp().flip(0)
        sig = sig.to(torch.float32)
        last = 0.0 if self.final == "zero" else float(sig[-1])
        grid = _unique_desc(torch.cat([sig.to(torch.float64), torch.tensor([last], dtype=torch.float64)]))
        net = {float(v): self._c_noise(float(v), torch.float32) for v in sig.to(torch.float64)}
        # final_sigmas_type="sigma_min" repeats the last sigma: the source's last call steps from
        # sigma_min to itself and leaves the sample as it is
        return Placement(grid, net, (self.s_max**2 + 1) ** 0.5, identity_last=last == float(sig[-1]))

    def _c_noise(self, s: float, dtype=torch.float64) -> float:
        v = torch.tensor(s, dtype=dtype)
        return float(0.25 * torch.log(v) if self.noise == "edm" else v.atan() / math.pi * 2)

    def net_timestep(self, t):
        return self._c_noise(max(t, self.s_min))  # the clean end: c_out = 0 there

    @property
    def t_min(self):
        return self.s_min

    def prior_scale(self, t0):
        return (t0 * t0 + 1) ** 0.5

    def t_of_net(self, k):
        return math.exp(4.0 * k) if self.noise == "edm" else math.tan(k * math.pi / 2)

    def c_in(self, t):
        return 1.0 / math.sqrt(t * t + self.sd**2)

    def _raw(self, x, t, output):
        s = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        s = s.reshape(-1, *([1] * (x.ndim - 1))) if s.ndim else s
        d = s * s + self.sd**2
        x0 = (self.sd**2 / d) * x + (self.sign * self.sd) * (s / d.sqrt()) * output
        return Prediction(x, t, x0, "x0", self.schedule)


def make_source(config: Mapping[str, Any], name: str | None, flow: bool = False) -> Source:
    """The :class:`Source` of a scheduler config (``name``: its class; None: DDIM's placement, or
    FlowMatchEuler's when ``flow``)."""
    if name in REFUSED:
        raise ValueError(f"_class_name {name!r} is not supported: {REFUSED[name]}")
    if name in EDM_SOURCES:
        return EDMSource(config, name)
    if (
        flow
        or name in FLOW_SOURCES
        or (config.get("prediction_type") == "flow_prediction" and config.get("use_flow_sigmas", False))
    ):
        return FlowSource(config, name or "FlowMatchEulerDiscreteScheduler")
    if name is not None and name not in VP_SOURCES:
        known = ", ".join(sorted((*VP_SOURCES, *FLOW_SOURCES, *EDM_SOURCES)))
        raise ValueError(f"_class_name {name!r} is not a scheduler DiffsolveScheduler knows; known: {known}")
    return VPSource(config, name or "DDIMScheduler")
