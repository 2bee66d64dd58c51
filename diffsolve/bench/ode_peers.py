"""The peers of the ODE benchmark (:mod:`diffsolve.bench.ode`): diffusers' schedulers and k-diffusion's
samplers, every setting of each, run on the benchmark's oracle with exact call accounting.

A *setting* is one scheduler or sampler with one choice of options (spacing, sigmas, order, ...).
For an NFE budget B a setting gets the largest number of steps whose real count of model calls is
at most B (step counts are searched upward; the count is the one the loop really makes, read off the
scheduler's ``timesteps`` and checked by counting the calls, or counted with a cheap dry run for
k-diffusion). A setting that cannot fit B has no point there; one that raises or returns non-finite
values at B is recorded as failed at B.

diffusers (the Stable Diffusion loop: ``scale_model_input``, the eps-network, ``step``): DDIM, Euler,
Heun, LMS, KDPM2, DPM++ 2M / 3M (multistep), DPM++ 2S / 3S (singlestep), UniPC bh1 / bh2 at orders
2 and 3, DEIS 2 / 3, iPNDM and PNDM (PRK + PLMS, and PLMS only), each with the class's default
``timestep_spacing`` and ``"trailing"``, and with each sigma option its ``__init__`` has
(``use_karras_sigmas``, ``use_exponential_sigmas``, ``use_beta_sigmas``, ``use_lu_lambdas``; read with
:func:`inspect.signature`), one at a time. Every schedule ends at sigma = 0 (``final_sigmas_type =
"zero"``, ``set_alpha_to_one``); where a class has ``final_sigmas_type``, ``"sigma_min"`` is another
setting (it stops at the last training noise level). The oracle is queried at the noise level the
scheduler itself uses for that call (its ``sigmas`` entry; ``alphas_cumprod`` at the timestep for
DDIM and PNDM), and starts from x_T times ``init_noise_sigma``, as a pipeline does.

iPNDM has no spacing or sigma options and takes v, not eps: it runs on its own cosine schedule (which
starts at alpha = 0, pure noise; its noise levels above Stable Diffusion's highest, 14.6, query the
oracle there) and, as a second setting, on Stable Diffusion's noise levels at the trailing timesteps,
given as its ``trained_betas`` (which it reads as the list of sigmas of the steps, then 0).

k-diffusion (0.1.1, loaded from an installed ``k_diffusion`` or from the folder named by the
environment variable ``DIFFSOLVE_KDIFFUSION``, its ``sampling`` module only): euler, heun, dpm_2, lms,
dpmpp_2m, and the ancestral / SDE samplers with eta = 0 (deterministic): euler_ancestral, dpm_2_ancestral,
dpmpp_2s_ancestral, dpmpp_sde, dpmpp_2m_sde (midpoint, heun), dpmpp_3m_sde, each on
``get_sigmas_karras`` (rho 7), ``get_sigmas_exponential`` and ``get_sigmas_polyexponential`` (rho 1,
its default: the same list as exponential), from sigma_max = 14.6 to sigma_min = 0.0292 and then 0;
and dpm_fast (n calls exactly, from sigma_max to sigma_min: it stops at sigma_min).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import os
import sys
import types
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from diffsolve.core.protocol import per_row

SD: dict[str, Any] = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
}
SD_TRAILING = "sd-trailing"  # iPNDM's trained_betas: the SD noise levels at the trailing timesteps
SIGMA_OPTIONS = {
    "use_karras_sigmas": "Karras",
    "use_exponential_sigmas": "exponential",
    "use_beta_sigmas": "beta",
    "use_lu_lambdas": "lu-lambda",
}


class Failed(Exception):
    """A setting that raised or returned non-finite values."""


# ---------------------------------------------------------------------------------------- diffusers
def diffusers_classes() -> dict[str, tuple[type, dict[str, Any]]]:
    """name -> (class, fixed options) of every diffusers ODE scheduler of the peer set."""
    # from the defining modules: mypy reads diffusers' top-level names as its dummy placeholder classes
    from diffusers.schedulers.scheduling_ddim import DDIMScheduler
    from diffusers.schedulers.scheduling_deis_multistep import DEISMultistepScheduler
    from diffusers.schedulers.scheduling_dpmsolver_multistep import DPMSolverMultistepScheduler
    from diffusers.schedulers.scheduling_dpmsolver_singlestep import DPMSolverSinglestepScheduler
    from diffusers.schedulers.scheduling_euler_discrete import EulerDiscreteScheduler
    from diffusers.schedulers.scheduling_heun_discrete import HeunDiscreteScheduler
    from diffusers.schedulers.scheduling_ipndm import IPNDMScheduler
    from diffusers.schedulers.scheduling_k_dpm_2_discrete import KDPM2DiscreteScheduler
    from diffusers.schedulers.scheduling_lms_discrete import LMSDiscreteScheduler
    from diffusers.schedulers.scheduling_pndm import PNDMScheduler
    from diffusers.schedulers.scheduling_unipc_multistep import UniPCMultistepScheduler

    return {
        "DDIM": (DDIMScheduler, {"set_alpha_to_one": True}),
        "Euler": (EulerDiscreteScheduler, {}),
        "Heun": (HeunDiscreteScheduler, {}),
        "LMS": (LMSDiscreteScheduler, {}),
        "KDPM2": (KDPM2DiscreteScheduler, {}),
        "DPM++ 2M": (DPMSolverMultistepScheduler, {"solver_order": 2}),
        "DPM++ 3M": (DPMSolverMultistepScheduler, {"solver_order": 3}),
        "DPM++ 2S": (DPMSolverSinglestepScheduler, {"solver_order": 2}),
        "DPM++ 3S": (DPMSolverSinglestepScheduler, {"solver_order": 3}),
        "UniPC bh1 (2)": (UniPCMultistepScheduler, {"solver_type": "bh1", "solver_order": 2}),
        "UniPC bh1 (3)": (UniPCMultistepScheduler, {"solver_type": "bh1", "solver_order": 3}),
        "UniPC bh2 (2)": (UniPCMultistepScheduler, {"solver_type": "bh2", "solver_order": 2}),
        "UniPC bh2 (3)": (UniPCMultistepScheduler, {"solver_type": "bh2", "solver_order": 3}),
        "DEIS 2": (DEISMultistepScheduler, {"solver_order": 2}),
        "DEIS 3": (DEISMultistepScheduler, {"solver_order": 3}),
        "iPNDM": (IPNDMScheduler, {}),
        "iPNDM (SD noise levels)": (IPNDMScheduler, {"trained_betas": SD_TRAILING}),
        "PNDM (PRK + PLMS)": (PNDMScheduler, {"skip_prk_steps": False, "set_alpha_to_one": True}),
        "PNDM (PLMS)": (PNDMScheduler, {"skip_prk_steps": True, "set_alpha_to_one": True}),
    }


def diffusers_settings(quick: bool = False) -> dict[str, tuple[type, dict[str, Any]]]:
    """name -> (class, options): each class with its default spacing and ``"trailing"``, plain and with
    each sigma option its ``__init__`` has, and each ``final_sigmas_type`` ("zero", "sigma_min").
    ``quick``: trailing spacing, plain and Karras sigmas, final sigma zero."""
    out: dict[str, tuple[type, dict[str, Any]]] = {}
    for name, (cls, fixed) in diffusers_classes().items():
        params = inspect.signature(cls).parameters  # the class's __init__
        spacings = ["default", "trailing"] if "timestep_spacing" in params else ["default"]
        sigmas = [None] + [o for o in SIGMA_OPTIONS if o in params]
        finals = ["zero", "sigma_min"] if "final_sigmas_type" in params else [None]
        if quick:
            spacings = spacings[-1:]
            sigmas = [s for s in sigmas if s in (None, "use_karras_sigmas")]
            finals = finals[:1]
        for spacing in spacings:
            for sig in sigmas:
                for final in finals:
                    opts = dict(fixed)
                    label = [spacing]
                    if spacing == "trailing":
                        opts["timestep_spacing"] = "trailing"
                    if sig is not None:
                        opts[sig] = True
                        label.append(f"{SIGMA_OPTIONS[sig]} sigmas")
                    if final is not None:
                        opts["final_sigmas_type"] = final
                        if final != "zero":
                            label.append(f"final {final}")
                    out[f"{name}, {', '.join(label)}"] = (cls, opts)
    return out


def make_scheduler(cls, opts, steps: int):
    """The scheduler for ``steps`` steps; ``trained_betas=SD_TRAILING`` (iPNDM) becomes the list
    iPNDM reads as its noise levels: Stable Diffusion's sigma = sqrt(1 - alphas_cumprod) at the
    ``steps`` trailing timesteps, then 0."""
    if opts.get("trained_betas") == SD_TRAILING:
        n = SD["num_train_timesteps"]
        betas = torch.linspace(SD["beta_start"] ** 0.5, SD["beta_end"] ** 0.5, n, dtype=torch.float64) ** 2
        acp = torch.cumprod(1 - betas, 0)
        ts = torch.round(n - torch.arange(steps, dtype=torch.float64) * n / steps).long() - 1
        opts = {**opts, "trained_betas": (1 - acp[ts]).sqrt().tolist() + [0.0]}
    return cls.from_config({**SD, "prediction_type": "epsilon", "clip_sample": False, **opts})


def diffusers_calls(cls, opts, steps: int) -> int:
    """The model calls the Stable Diffusion loop makes with ``steps`` inference steps: one per entry
    of the scheduler's ``timesteps`` (Heun and KDPM2 list 2 steps - 1, PNDM with PRK more)."""
    sched = make_scheduler(cls, opts, steps)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sched.set_timesteps(steps)
    return len(sched.timesteps)


def _log_sigmas(sched) -> torch.Tensor:
    acp = sched.alphas_cumprod.double()
    return 0.5 * torch.log((1 - acp) / acp)


def _noise_level(sched, i: int, ts, k_style: bool, log_sig: torch.Tensor) -> float:
    """sigma/alpha at which the scheduler evaluates the model in call ``i`` (at timestep ``ts``)."""
    if k_style:  # Euler, Heun, LMS, KDPM2: the sigma scale_model_input divided by
        if hasattr(sched, "sigmas_interpol") and not sched.state_in_first_order:  # KDPM2's midpoint
            return float(sched.sigmas_interpol[sched.step_index])
        return float(sched.sigmas[sched.step_index])
    if type(sched).__name__ == "IPNDMScheduler":  # its own VP schedule: sigma = betas, alpha = alphas
        return float(sched.betas[i]) / max(float(sched.alphas[i]), 1e-8)
    sig = getattr(sched, "sigmas", None)
    if sig is not None and len(sig) == len(sched.timesteps) + 1:  # DPM-Solver, UniPC, DEIS: their sigmas
        return float(sig[i])
    # DDIM, PNDM: alphas_cumprod at the (integer) timestep; a fractional one log-linearly
    t = float(ts)
    lo = min(math.floor(t), len(log_sig) - 2)
    w = t - lo
    return math.exp(float((1 - w) * log_sig[lo] + w * log_sig[lo + 1]))


def run_diffusers(cls, opts, sd, model, x_T, steps: int) -> tuple[torch.Tensor, int]:
    """The Stable Diffusion loop (scale_model_input, model, step) with the oracle as eps-network (as
    v-network for iPNDM, which takes v); returns (x at the end, model calls made)."""
    sched = make_scheduler(cls, opts, steps)
    with warnings.catch_warnings():  # numpy deprecations and advice inside diffusers' schedulers
        warnings.simplefilter("ignore")
        sched.set_timesteps(steps)
        log_sig = _log_sigmas(sched) if hasattr(sched, "alphas_cumprod") else torch.zeros(2)
        x = x_T * float(sched.init_noise_sigma)
        k_style = hasattr(sched, "sigmas") and float(sched.init_noise_sigma) > 1.0
        ipndm = type(sched).__name__ == "IPNDMScheduler"
        t_hi, t_lo = float(sd.t_max), float(sd.t_min)
        calls = 0
        for i, ts in enumerate(sched.timesteps):
            inp = sched.scale_model_input(x, ts)
            s = _noise_level(sched, i, ts, k_style, log_sig)
            t = sd.t_of_log_snr(torch.tensor(-math.log(s), dtype=torch.float64)) if s > 0 else torch.tensor(t_lo)
            t = t.clamp(t_lo, t_hi)  # iPNDM starts at infinite noise: the model's highest level instead
            pred = model(inp.double(), t)
            calls += 1
            if ipndm:  # iPNDM takes v = alpha eps - sigma x0 (it forms eps = sigma x + alpha v itself)
                out = float(sched.alphas[i]) * pred.eps - float(sched.betas[i]) * pred.x0
            else:
                out = pred.eps
            x = sched.step(out, ts, x).prev_sample
    return x, calls


# ------------------------------------------------------------------------------------- k-diffusion
def load_kdiffusion() -> types.ModuleType | None:
    """k-diffusion's ``sampling`` module: importable as it is, or from the unpacked package in the
    folder ``$DIFFSOLVE_KDIFFUSION`` without the package's ``__init__`` (which imports training code);
    None when neither works."""
    try:
        return importlib.import_module("k_diffusion.sampling")
    except Exception as exc:
        reason = f"{type(exc).__name__}: {exc}"
    root = os.environ.get("DIFFSOLVE_KDIFFUSION")
    if not root:
        print(f"k-diffusion not importable ({reason}); skipping its samplers", flush=True)
        return None
    try:
        for name in [n for n in sys.modules if n == "k_diffusion" or n.startswith("k_diffusion.")]:
            del sys.modules[name]
        pkg = types.ModuleType("k_diffusion")
        pkg.__path__ = [str(Path(root) / "k_diffusion")]
        utils = types.ModuleType("k_diffusion.utils")
        # the sampling module takes only append_dims from utils: x with trailing singleton axes
        utils.append_dims = lambda x, n: x.reshape(*x.shape, *([1] * (n - x.ndim)))  # type: ignore[attr-defined]
        pkg.utils = utils  # type: ignore[attr-defined]
        sys.modules["k_diffusion"], sys.modules["k_diffusion.utils"] = pkg, utils
        spec = importlib.util.spec_from_file_location(
            "k_diffusion.sampling", Path(root) / "k_diffusion" / "sampling.py"
        )
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        sys.modules["k_diffusion.sampling"] = mod
        spec.loader.exec_module(mod)
        return mod
    except Exception as exc:
        print(f"k-diffusion not loadable from {root} ({type(exc).__name__}: {exc}); skipping it", flush=True)
        return None


def _no_noise(*_args):
    return 0.0


def kdiffusion_settings(K, quick: bool = False) -> dict[str, tuple[Callable, str | None]]:
    """name -> (sampler(denoiser, x, sigmas or (s_min, s_max, steps)), sigma kind or None for dpm_fast)."""
    zero = {"eta": 0.0, "noise_sampler": _no_noise}
    samplers: dict[str, Callable] = {
        "euler": K.sample_euler,
        "heun": K.sample_heun,
        "dpm_2": K.sample_dpm_2,
        "lms": K.sample_lms,
        "dpmpp_2m": K.sample_dpmpp_2m,
        "euler_ancestral (eta 0)": lambda m, x, s: K.sample_euler_ancestral(m, x, s, disable=True, **zero),
        "dpm_2_ancestral (eta 0)": lambda m, x, s: K.sample_dpm_2_ancestral(m, x, s, disable=True, **zero),
        "dpmpp_2s_ancestral (eta 0)": lambda m, x, s: K.sample_dpmpp_2s_ancestral(m, x, s, disable=True, **zero),
        "dpmpp_sde (eta 0)": lambda m, x, s: K.sample_dpmpp_sde(m, x, s, disable=True, **zero),
        "dpmpp_2m_sde (eta 0, midpoint)": lambda m, x, s: K.sample_dpmpp_2m_sde(m, x, s, disable=True, **zero),
        "dpmpp_2m_sde (eta 0, heun)": lambda m, x, s: K.sample_dpmpp_2m_sde(
            m, x, s, disable=True, solver_type="heun", **zero
        ),
        "dpmpp_3m_sde (eta 0)": lambda m, x, s: K.sample_dpmpp_3m_sde(m, x, s, disable=True, **zero),
    }
    kinds = ("karras", "exponential", "polyexponential") if not quick else ("karras",)
    if quick:
        samplers = {k: samplers[k] for k in ("euler", "heun", "dpmpp_2m")}
    out: dict[str, tuple[Callable, str | None]] = {}
    for name, fn in samplers.items():
        plain = fn if "(" in name else (lambda f: lambda m, x, s: f(m, x, s, disable=True))(fn)
        for kind in kinds:
            out[f"k {name}, {kind}"] = (plain, kind)
    if not quick:
        out["k dpm_fast (to sigma_min)"] = (
            lambda m, x, s: K.sample_dpm_fast(m, x, s[0], s[1], s[2], disable=True, eta=0.0, noise_sampler=_no_noise),
            None,
        )
    return out


def _kd_ends(sd) -> tuple[float, float]:
    s_max = float(sd.sigma(sd.t_max) / sd.alpha(sd.t_max))
    s_min = float(sd.sigma(sd.t_min) / sd.alpha(sd.t_min))
    return s_max, s_min


def _kd_sigmas(K, kind: str | None, steps: int, s_min: float, s_max: float):
    if kind is None:  # dpm_fast takes its ends and its call count
        return (s_min, s_max, steps)
    if kind == "karras":
        return K.get_sigmas_karras(steps, s_min, s_max, rho=7.0, device="cpu").double()
    if kind == "exponential":
        return K.get_sigmas_exponential(steps, s_min, s_max, device="cpu").double()
    return K.get_sigmas_polyexponential(steps, s_min, s_max, device="cpu").double()


def kdiffusion_calls(K, fn, kind, sd, steps: int) -> int:
    """The model calls the sampler makes with ``steps`` steps, counted on a dry run with a cheap
    denoiser on one sample (the count does not depend on the values for these samplers)."""
    s_max, s_min = _kd_ends(sd)
    n = 0

    def count(x, s):
        nonlocal n
        n += 1
        return 0.5 * x

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fn(count, torch.ones(1, 2, dtype=torch.float64), _kd_sigmas(K, kind, steps, s_min, s_max))
    return n


def run_kdiffusion(K, fn, kind, sd, model, x_T, steps: int) -> tuple[torch.Tensor, int]:
    """k-diffusion's sampler on our model through its variables (x/alpha, sigma/alpha); returns (x at
    the end, model calls counted)."""
    s_max, s_min = _kd_ends(sd)
    n = 0

    def denoiser(xk, sk):
        nonlocal n
        n += 1
        t = sd.t_of_log_snr(-torch.log(sk.double()))
        return model(xk * per_row(sd.alpha(t), xk), t).x0

    x = fn(denoiser, x_T * math.sqrt(1 + s_max**2), _kd_sigmas(K, kind, steps, s_min, s_max))
    return x, n


# ------------------------------------------------------------------------------------- the budgets
def fit_steps(
    count: Callable[[int], int], budget: int, cache: dict[int, int | None], start: int = 1, stop: bool = False
) -> tuple[int, int] | None:
    """The largest step count whose real call count is at most ``budget`` (searched upward from
    ``start``, to ``budget``: every sampler here makes at least one call a step; with ``stop``, up to
    the first count over the budget), with that count; None if none fits. A step count the setting
    refuses (raises) is skipped. ``cache``: step count -> calls (None: refused)."""
    found = None
    for steps in range(start, budget + 1):
        if steps not in cache:
            try:
                cache[steps] = int(count(steps))
            except Exception:
                cache[steps] = None
        c = cache[steps]
        if c is not None and c <= budget:
            found = (steps, c)
        elif c is not None and stop:
            break
    return found


def peer_points(run_one, count, budgets, ref, put, fail, name: str, group: str, start=None) -> None:
    """Run one setting at every budget (each step count once) and record its points or failures.
    ``start``: budget -> the step count to search upward from (then up to the first that costs too
    much); default every step count from 1."""
    cache: dict[int, int | None] = {}
    done: dict[int, tuple[int, float] | str] = {}
    for b in budgets:
        fit = fit_steps(count, b, cache) if start is None else fit_steps(count, b, cache, start(b), stop=True)
        if fit is None:
            continue
        steps, calls = fit
        if steps not in done:
            try:
                x, real = run_one(steps)
                if real != calls:
                    raise Failed(f"counted {real} model calls, expected {calls}")
                if not bool(torch.isfinite(x).all()):
                    raise Failed("non-finite samples")
                done[steps] = (real, float((x - ref).pow(2).mean().sqrt()))
            except Exception as exc:
                msg = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else ""
                done[steps] = type(exc).__name__ + (f": {msg}" if msg and not isinstance(exc, Failed) else "")
                if isinstance(exc, Failed):
                    done[steps] = msg
        res = done[steps]
        if isinstance(res, str):
            fail(group, name, b, steps, res)
        else:
            put(group, name, b, res[0], res[1], steps)


def run_peers(sd, model, x_T, ref, budgets, put, fail, quick: bool = False) -> bool:
    """Every peer setting at every budget; returns whether k-diffusion ran."""
    from diffusers.utils import logging as dlog

    level = dlog.get_verbosity()
    dlog.set_verbosity_error()  # the schedulers' advice on lower_order_final and unused config keys
    try:
        with warnings.catch_warnings():  # numpy 2 deprecations inside the schedulers, at every call
            warnings.simplefilter("ignore")
            return _run_peers(sd, model, x_T, ref, budgets, put, fail, quick)
    finally:
        dlog.set_verbosity(level)


def _run_peers(sd, model, x_T, ref, budgets, put, fail, quick: bool) -> bool:
    for name, (cls, opts) in diffusers_settings(quick).items():
        peer_points(
            lambda steps, cls=cls, opts=opts: run_diffusers(cls, opts, sd, model, x_T, steps),
            lambda steps, cls=cls, opts=opts: diffusers_calls(cls, opts, steps),
            budgets,
            ref,
            put,
            fail,
            name,
            "diffusers",
        )
    K = load_kdiffusion()
    if K is None:
        return False
    for name, (fn, kind) in kdiffusion_settings(K, quick).items():
        peer_points(
            lambda steps, fn=fn, kind=kind: run_kdiffusion(K, fn, kind, sd, model, x_T, steps),
            lambda steps, fn=fn, kind=kind: kdiffusion_calls(K, fn, kind, sd, steps),
            budgets,
            ref,
            put,
            fail,
            name,
            "k-diffusion",
        )
    return True
