"""The remaining diffusers schedulers of catalog section 2 against diffsolve's entries, each in a plain
diffusers loop and through DiffsolveScheduler made from its config (the same network, start, grid and
noise; the same number of model calls):

- CogVideoXDDIMScheduler (Yang et al. 2024): ``ddim`` on its SNR-shifted betas (``snr_shift_scale``
  divides the SNR; then zero terminal SNR);
- CogVideoXDPMScheduler: ``dpmpp-2m-sde`` (SDE-DPM-Solver++(2M), midpoint, Lu et al. 2023) on the same
  schedule, with diffusers' noise replayed;
- CosineDPMSolverMultistepScheduler (Stable Audio Open, Evans et al. 2024): ``dpmpp-2m-sde``
  (``solver_type="heun"``: ``mrs-sde`` with ``solver_type="taylor"``) on the EDM schedule with cosine
  noise conditioning, with its Brownian-tree noise replayed;
- MiniMaxH3Scheduler: ``euler`` on rectified flow with its exponential shift (network time 1 - sigma,
  data-ward velocity);
- FlowMapEulerDiscreteScheduler (AnyFlow, Gu et al.): ``euler`` on the shifted flow grid (a flow-map
  model's mean velocity to the next grid point is the model output the step takes).
"""

import json
import math
from pathlib import Path

import diffusers
import diffusers.schedulers.scheduling_dpm_cogvideox as cogvideox_dpm
import pytest
import torch

from diffsolve.integrations.diffusers import DiffsolveScheduler
from diffsolve.integrations.diffusers.sources import vp_alphas_cumprod

CONFIGS = Path(__file__).parent / "fixtures" / "scheduler_configs"
COGVIDEOX_2B = json.loads((CONFIGS / "cogvideox_2b.json").read_text())
STABLE_AUDIO = json.loads((CONFIGS / "stable_audio_open.json").read_text())
W = torch.randn(8, 8, generator=torch.Generator().manual_seed(0)) * 0.3


def net(x, t):
    """A smooth time-conditioned stand-in for the network."""
    return torch.tanh(x @ W + 0.3 * math.sin(float(t) / 300.0 + 0.1)) * 0.5 + 0.1 * x


def rel(a, b) -> float:
    return float((a - b).abs().max() / a.abs().max())


def start(seed=0, scale=1.0):
    return torch.randn(1, 4, 8, generator=torch.Generator().manual_seed(seed)) * scale


def loop(sched, n, x, generator=None, prepare=None, **kw):
    """The pipelines' loop: scale_model_input, the network at the listed timestep, step."""
    sched.set_timesteps(n)
    if prepare is not None:
        prepare(sched)
    calls = 0
    for t in sched.timesteps:
        out = net(getattr(sched, "scale_model_input", lambda x, t: x)(x, t), t)
        calls += 1
        extra = {"generator": generator} if generator is not None else {}
        x = sched.step(out, t, x, **extra, **kw).prev_sample
    return x, calls


# ------------------------------------------------------------------------------ CogVideoX DDIM
COGVIDEOX_OPTIONS = [
    {},  # CogVideoX-2b: v_prediction, zero terminal SNR, trailing, snr_shift_scale 3
    {"snr_shift_scale": 1.0},  # the fine-tunes' value
    {"rescale_betas_zero_snr": False, "prediction_type": "epsilon", "timestep_spacing": "leading"},
    {"set_alpha_to_one": False, "snr_shift_scale": 2.0},
]


def _ids(o):
    return ",".join(f"{k}={v}" for k, v in o.items()) or "cogvideox_2b"


def test_snr_shift_divides_the_snr():
    """alphas_cumprod / (k + (1 - k) alphas_cumprod) is SNR / k (checked on diffusers' float64
    alphas_cumprod), and diffsolve's alphas_cumprod are diffusers' to float32 rounding."""
    base = {**COGVIDEOX_2B, "rescale_betas_zero_snr": False}

    def snr(a):
        return a / (1 - a)

    plain = diffusers.CogVideoXDDIMScheduler.from_config({**base, "snr_shift_scale": 1.0}).alphas_cumprod.double()
    for k in (1.0, 3.0, 0.5):
        cfg = {**base, "snr_shift_scale": k}
        ours = vp_alphas_cumprod(cfg, "CogVideoXDDIMScheduler").double()
        theirs = diffusers.CogVideoXDDIMScheduler.from_config(cfg).alphas_cumprod.double()
        table = float(((ours - theirs) / theirs).abs().max())
        err = float((snr(theirs) / (snr(plain) / k) - 1).abs().max())
        print("snr_shift_scale", k, "relative error of SNR / k", err, "of diffsolve's alphas_cumprod", table)
        assert err < 1e-9 and table < 1e-5


@pytest.mark.parametrize("options", COGVIDEOX_OPTIONS, ids=_ids)
def test_cogvideox_ddim_parity(options):
    cfg = {**COGVIDEOX_2B, **options}
    for n in (4, 12, 50):
        a, ca = loop(diffusers.CogVideoXDDIMScheduler.from_config(cfg), n, start())
        b, cb = loop(DiffsolveScheduler.from_config(cfg, solver="ddim"), n, start())
        print("CogVideoXDDIM", options, n, "calls", ca, cb, "relative difference", rel(a, b))
        assert ca == cb == n
        assert rel(a, b) < 1e-5


# ------------------------------------------------------------------------------ CogVideoX DPM
def _cogvideox_dpm_loop(sched, n, x, seed, monkeypatch):
    """The CogVideoX pipeline's loop for CogVideoXDPMScheduler (it passes the last x0 estimate and the
    previous timestep). Its second-order steps draw a noise they discard before the one they use:
    that draw is answered with zeros, so that the generator's stream is the noise the steps use."""
    discard = {"next": False}
    draw = cogvideox_dpm.randn_tensor

    def randn_tensor(shape, generator=None, device=None, dtype=None, **kw):
        if discard["next"]:
            discard["next"] = False
            return torch.zeros(shape, dtype=dtype)
        return draw(shape, generator=generator, device=device, dtype=dtype)

    monkeypatch.setattr(cogvideox_dpm, "randn_tensor", randn_tensor)
    sched.set_timesteps(n)
    gen, old, calls = torch.Generator().manual_seed(seed), None, 0
    ts, stride = sched.timesteps, sched.config.num_train_timesteps // n
    for i, t in enumerate(ts):
        out = net(x, t)
        calls += 1
        discard["next"] = old is not None and int(t) - stride >= 0
        x, old = sched.step(out, old, t, ts[i - 1] if i > 0 else None, x, generator=gen, return_dict=False)
    return x, calls


def _cogvideox_dpm(options, n, monkeypatch, seed=3):
    cfg = {**COGVIDEOX_2B, "_class_name": "CogVideoXDPMScheduler", **options}
    a, ca = _cogvideox_dpm_loop(diffusers.CogVideoXDPMScheduler.from_config(cfg), n, start(), seed, monkeypatch)
    ours = DiffsolveScheduler.from_config(cfg, solver="dpmpp-2m-sde")
    b, cb = loop(ours, n, start(), generator=torch.Generator().manual_seed(seed))
    print("CogVideoXDPM", options, n, "calls", ca, cb, "relative difference", rel(a, b))
    assert ca == cb == n
    return rel(a, b)


@pytest.mark.parametrize(
    "options,steps",
    [
        ({"timestep_spacing": "leading"}, (5, 12, 50)),
        ({"rescale_betas_zero_snr": False}, (5, 10, 20, 50)),
        ({"rescale_betas_zero_snr": False, "snr_shift_scale": 1.0}, (10, 50)),
        ({"rescale_betas_zero_snr": False, "prediction_type": "epsilon"}, (5, 10, 50)),
        ({"rescale_betas_zero_snr": False, "set_alpha_to_one": False}, (5, 10)),
    ],
    ids=lambda v: _ids(v) if isinstance(v, dict) else "-".join(map(str, v)),
)
def test_cogvideox_dpm_parity_given_the_same_noise(options, steps, monkeypatch):
    """SDE-DPM-Solver++(2M) (midpoint): the same latents given the noise the steps use (CogVideoX-2b's
    own config, at zero terminal SNR, in test_cogvideox_dpm_measured_gaps)."""
    for n in steps:
        assert _cogvideox_dpm(options, n, monkeypatch) < 1e-5


def test_cogvideox_dpm_measured_gaps(monkeypatch):
    """Where diffsolve's step differs from CogVideoXDPMScheduler's, measured and bounded:
    - trailing spacing with 1000 // N not the listed spacing (N = 12): the source's ratio r of the
      last two log-SNR steps is taken from the listed timesteps, while the state sits at the previous
      timestep minus 1000 // N (one timestep away), where diffsolve takes it (3e-3);
    - zero terminal SNR (CogVideoX-2b's config): the first step starts at log SNR = -inf, which makes
      the source's second step first order (r = inf); diffsolve starts at alphas_cumprod = 1e-20, a
      finite r (3.4e-4 at 5 steps, 3.3e-5 at 10, 8e-7 at 50)."""
    assert _cogvideox_dpm({"rescale_betas_zero_snr": False}, 12, monkeypatch) < 1e-2
    for n, bound in ((5, 1e-3), (10, 1e-4), (50, 5e-5)):
        assert _cogvideox_dpm({}, n, monkeypatch) < bound


def test_cogvideox_dpm_draws_noise(monkeypatch):
    """The stochastic step: two seeds give different latents (the noise enters every step)."""
    cfg = {**COGVIDEOX_2B, "_class_name": "CogVideoXDPMScheduler", "rescale_betas_zero_snr": False}
    a, _ = loop(
        DiffsolveScheduler.from_config(cfg, solver="dpmpp-2m-sde"), 10, start(), torch.Generator().manual_seed(1)
    )
    b, _ = loop(
        DiffsolveScheduler.from_config(cfg, solver="dpmpp-2m-sde"), 10, start(), torch.Generator().manual_seed(2)
    )
    assert rel(a, b) > 1e-2


# ------------------------------------------------------------------------------ CosineDPMSolverMultistep
def _replayed(x, seed):
    """The source's Brownian-tree noise sampler replaced (after set_timesteps) by draws from a
    generator in step order: the noise DiffsolveScheduler draws from the same generator (one draw per
    step with noise)."""
    gen = torch.Generator().manual_seed(seed)

    def prepare(sched):
        sched.noise_sampler = lambda sigma, sigma_next: torch.randn(x.shape, generator=gen, dtype=x.dtype)

    return prepare


@pytest.mark.parametrize(
    "options,solver,solver_options",
    [
        ({}, "dpmpp-2m-sde", {}),
        ({"sigma_schedule": "karras"}, "dpmpp-2m-sde", {}),
        ({"prediction_type": "epsilon"}, "dpmpp-2m-sde", {}),
        ({"solver_type": "heun"}, "mrs-sde", {"solver_type": "taylor"}),
        # the source's last call steps from sigma_min to itself; its real last step is second order
        ({"final_sigmas_type": "sigma_min"}, "dpmpp-2m-sde", {"lower_order_final": False}),
    ],
    ids=lambda v: _ids(v) if isinstance(v, dict) else v,
)
def test_cosine_dpmsolver_parity_given_the_same_noise(options, solver, solver_options):
    cfg = {**STABLE_AUDIO, **options}
    for n in (5, 12, 30):
        ref = diffusers.CosineDPMSolverMultistepScheduler.from_config(cfg)
        x_T = start(scale=float(ref.init_noise_sigma))
        a, ca = loop(ref, n, x_T, prepare=_replayed(x_T, 3))
        ours = DiffsolveScheduler.from_config(cfg, solver=solver, solver_options=solver_options)
        b, cb = loop(ours, n, x_T, generator=torch.Generator().manual_seed(3))
        print("CosineDPMSolverMultistep", options, n, "calls", ca, cb, "relative difference", rel(a, b))
        assert ca == cb == n
        assert rel(a, b) < 1e-5


# ------------------------------------------------------------------------------ MiniMax-H3, FlowMapEuler
@pytest.mark.parametrize("shift", [12.0, 1.0, 5.0])
def test_minimax_h3_parity(shift):
    """n grid points, n - 1 calls at network time 1 - sigma, the data-ward velocity."""
    for n in (2, 5, 12, 30):
        ref = diffusers.MiniMaxH3Scheduler(shift=shift)
        a, ca = loop(ref, n, start())
        ours = DiffsolveScheduler.from_config(ref, solver="euler")
        b, cb = loop(ours, n, start())
        assert torch.allclose(ours.timesteps.double(), ref.timesteps.double(), rtol=0, atol=1e-7)
        print("MiniMaxH3", shift, n, "calls", ca, cb, "relative difference", rel(a, b))
        assert ca == cb == n - 1
        assert rel(a, b) < 1e-5 and rel(a, start()) > 1e-2


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_map_euler_parity(shift):
    """The pipeline's target r is the next listed timestep (given explicitly, as the pipeline does, or
    left to the scheduler): the Euler step to the next grid point."""
    for n in (1, 2, 5, 12, 30):
        ref = diffusers.FlowMapEulerDiscreteScheduler(shift=shift)
        a, ca = loop(ref, n, start())
        ref.set_timesteps(n)
        x, explicit = start(), list(ref.timesteps) + [0.0]
        for i, t in enumerate(ref.timesteps):
            x = ref.step(net(x, t), t, x, r_timestep=explicit[i + 1]).prev_sample
        ours = DiffsolveScheduler.from_config(ref, solver="euler")
        b, cb = loop(ours, n, start())
        assert torch.allclose(ours.timesteps.double(), ref.timesteps.double(), rtol=1e-6, atol=0)
        # the AnyFlow pipeline conditions the model on r = sigmas[i + 1] * num_train_timesteps
        assert torch.allclose(ours.sigmas.double(), ref.sigmas.double(), rtol=1e-6, atol=1e-7)
        print("FlowMapEuler", shift, n, "calls", ca, cb, "relative difference", rel(a, b), rel(x, b))
        assert ca == cb == n
        assert rel(a, b) < 1e-5 and rel(x, b) < 1e-5 and rel(a, start()) > 1e-2


@pytest.mark.parametrize("lower_order_final", [True, False])
def test_edm_sigma_min_end_keeps_the_last_call(lower_order_final):
    """EDM-style sources with final_sigmas_type="sigma_min" (EDMDPMSolverMultistep here; the cosine
    one above) list N calls, the last from sigma_min to itself: DiffsolveScheduler lists the same N
    (the last leaves the sample as it is), and the real last step is second order on both sides."""
    for n in (5, 12, 30):
        ref = diffusers.EDMDPMSolverMultistepScheduler(
            final_sigmas_type="sigma_min", lower_order_final=lower_order_final
        )
        ours = DiffsolveScheduler.from_config(ref, solver="dpmpp-2m", solver_options={"lower_order_final": False})
        x_T = start(scale=float(ref.init_noise_sigma))
        a, ca = loop(ref, n, x_T)
        b, cb = loop(ours, n, x_T)
        print("EDMDPMSolverMultistep sigma_min", n, "calls", ca, cb, "relative difference", rel(a, b))
        assert ca == cb == n
        assert rel(a, b) < 1e-5
