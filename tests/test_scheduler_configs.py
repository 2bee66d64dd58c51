"""DiffsolveScheduler on the published scheduler configs of the models people load
(tests/fixtures/scheduler_configs, copied from shared/fixtures; SOURCES.md says where each comes from):
the same timesteps and sigmas as the scheduler it replaces, parity in a plain diffusers loop where
diffsolve has that scheduler's algorithm (every sigma option too), every fixed-grid solver in every
config, clear errors for what cannot be honoured, and the points of issue 17 each with its test."""

import inspect
import json
import math
import warnings
from pathlib import Path

import diffusers
import pytest
import torch

import diffsolve as ds
from diffsolve.integrations.diffusers import DiffsolveScheduler

HERE = Path(__file__).parent / "fixtures" / "scheduler_configs"
CONFIGS = sorted(p.name for p in HERE.glob("*.json"))
REFUSED = {"stable_cascade.json", "stable_cascade_prior.json"}  # DDPMWuerstchenScheduler
MU = 0.8  # the dynamic-shift mu of flow pipelines (Flux, LTX)


def load(name: str) -> dict:
    return json.loads((HERE / name).read_text())


def reference(cfg: dict):
    return getattr(diffusers, cfg["_class_name"]).from_config(cfg)


def set_steps(s, n: int, cfg: dict) -> None:
    if cfg.get("use_dynamic_shifting", False):
        s.set_timesteps(n, mu=MU)
    else:
        s.set_timesteps(n)


def distinct(sched):
    """(timesteps, sigmas) of a scheduler with repeated entries (PNDM's warm-up, Heun's second
    calls) listed once, paired by noise level where the scheduler lists sigmas."""
    ts = torch.as_tensor(sched.timesteps, dtype=torch.float64)
    sig = getattr(sched, "sigmas", None)
    if sig is None or len(sig) <= len(torch.unique_consecutive(ts)):
        return torch.unique_consecutive(ts), None
    sig = torch.as_tensor(sig, dtype=torch.float64)
    keep = torch.ones(len(ts), dtype=torch.bool)
    keep[1:] = sig[1 : len(ts)] != sig[: len(ts) - 1]
    return ts[keep], torch.unique_consecutive(sig)


def net(x, t):
    """A smooth stand-in for a network: any function of (input, timestep) gives parity if both
    schedulers call it at the same points."""
    t = float(t)
    return torch.tanh(0.7 * x) * math.cos(t / 700.0 + 0.3) + 0.2 * math.sin(t / 300.0 + 0.1)


def loop(sched, n, cfg, shape=(2, 4, 8, 8), seed=0, dtype=torch.float32, **kw):
    """A plain diffusers sampling loop (as the pipelines run it): (final latents, model calls)."""
    set_steps(sched, n, cfg)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype) * getattr(
        sched, "init_noise_sigma", 1.0
    )
    calls = 0
    for t in sched.timesteps:
        out = net(getattr(sched, "scale_model_input", lambda x, t: x)(x, t), t)
        calls += 1
        x = sched.step(out, t, x, **kw).prev_sample
    return x, calls


def rel(a, b) -> float:
    return float((a - b).abs().max() / a.abs().max())


# ------------------------------------------------------------------------------- placement
@pytest.mark.parametrize("name", [c for c in CONFIGS if c not in REFUSED])
def test_same_timesteps_and_sigmas_as_the_scheduler_it_replaces(name):
    cfg = load(name)
    for n in (1, 2, 4, 10, 20, 50):
        ref = reference(cfg)
        ours = DiffsolveScheduler.from_config(cfg, solver="ddim")
        try:
            set_steps(ref, n, cfg)
        except ZeroDivisionError:  # UnCLIPScheduler cannot place one step: a clear error here
            with pytest.raises(ValueError, match=f"cannot place num_inference_steps={n}"):
                set_steps(ours, n, cfg)
            continue
        set_steps(ours, n, cfg)
        ts, sig = distinct(ref)
        assert ours.config.source == cfg["_class_name"]
        assert len(ours.timesteps) == len(ts), (name, n, ours.timesteps.tolist(), ts.tolist())
        # (LTX's shift_terminal gives NaN timesteps at one step in diffusers itself)
        assert torch.allclose(ours.timesteps.double(), ts.float().double(), rtol=1e-6, atol=1e-4, equal_nan=True), (
            name,
            n,
        )
        if sig is not None:
            mine = torch.unique_consecutive(ours.sigmas.double())
            assert torch.allclose(mine, sig.float().double(), rtol=1e-5, atol=1e-7, equal_nan=True), (
                name,
                n,
                mine,
                sig,
            )


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_a_config_that_cannot_be_honoured_names_the_key(name):
    with pytest.raises(ValueError, match="_class_name 'DDPMWuerstchenScheduler'"):
        DiffsolveScheduler.from_config(load(name), solver="ddim")


@pytest.mark.parametrize(
    "key,value,match",
    [
        ("prediction_type", "flow_prediction", "prediction_type 'flow_prediction'"),
        ("prediction_type", "mystery", "prediction_type 'mystery'"),
        ("timestep_type", "mystery", "timestep_type 'mystery'"),
        ("_class_name", "MyOwnScheduler", "_class_name 'MyOwnScheduler'"),
    ],
)
def test_unsupported_options_name_their_key(key, value, match):
    cfg = {**load("sdxl_base.json"), key: value}
    with pytest.raises(ValueError, match=match):
        DiffsolveScheduler.from_config(cfg, solver="dpmpp-2m")


# ------------------------------------------------------------------------------- parity
PARITY = [
    ("sd21.json", "ddim"),
    ("i2vgen_xl.json", "ddim"),
    ("sd_x4_upscaler.json", "ddim"),
    ("cogvideox_2b.json", "ddim"),
    ("sdxl_base.json", "euler"),
    ("kolors.json", "euler"),
    ("sd_turbo.json", "euler"),
    ("svd_img2vid.json", "euler"),
    ("pixart_sigma.json", "dpmpp-2m"),
    ("sana_1600m_512px.json", "dpmpp-2m"),
    ("playground_v25.json", "dpmpp-2m"),
    ("sd3_medium.json", "euler"),
    ("flux1_dev.json", "euler"),
    ("flux1_schnell.json", "euler"),
    ("mochi_1_preview.json", "euler"),
    ("ltx_video.json", "euler"),
    ("hunyuanvideo.json", "euler"),
    ("lumina_image_2.json", "euler"),
]


@pytest.mark.parametrize("name,solver", PARITY)
def test_parity_in_a_plain_diffusers_loop(name, solver):
    """The published config's own scheduler against DiffsolveScheduler made from the config dict,
    with no solver options: the same latents to 1e-5 and the same number of model calls."""
    cfg = load(name)
    for n in (4, 12):
        a, ca = loop(reference(cfg), n, cfg)
        b, cb = loop(DiffsolveScheduler.from_config(cfg, solver=solver), n, cfg)
        assert ca == cb == n, (name, n, ca, cb)
        assert rel(a, b) < 1e-5, (name, n, rel(a, b))


@pytest.mark.parametrize("name", ["kandinsky22_decoder.json", "hunyuandit.json", "terminus_xl_gamma_v2.json"])
def test_ddpm_parity_given_the_pipelines_generator(name):
    """DDPMScheduler's ancestral steps with the noise of the pipeline's generator: ddpm draws the same
    noise from it. Terminus has zero terminal SNR: DDPM steps from alphas_cumprod = 0, where a floor
    of 2**-24 (k-diffusion style) would keep a 1e-3 share of x in the first step (2.8e-4 relative)."""
    cfg = load(name)
    for n in (4, 12):
        a, ca = loop(reference(cfg), n, cfg, generator=torch.Generator().manual_seed(5))
        b, cb = loop(
            DiffsolveScheduler.from_config(cfg, solver="ddpm"), n, cfg, generator=torch.Generator().manual_seed(5)
        )
        assert ca == cb == n and rel(a, b) < 1e-5, (name, n, rel(a, b))


SIGMA_OPTIONS = [
    {"use_karras_sigmas": True},
    {"use_exponential_sigmas": True},
    {"use_beta_sigmas": True},
    {"use_lu_lambdas": True},
    {"final_sigmas_type": "sigma_min"},
    {"timestep_spacing": "leading"},
    {"timestep_spacing": "trailing"},
    {"timestep_spacing": "linspace"},
    {"timestep_spacing": "leading", "steps_offset": 1},
    {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing", "prediction_type": "v_prediction"},
]


@pytest.mark.parametrize("options", SIGMA_OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
@pytest.mark.parametrize(
    "cls,solver",
    [
        ("DPMSolverMultistepScheduler", "dpmpp-2m"),
        ("EulerDiscreteScheduler", "euler"),
        ("HeunDiscreteScheduler", "heun"),
        ("DDIMScheduler", "ddim"),
    ],
)
def test_parity_under_every_sigma_option(cls, solver, options):
    klass = getattr(diffusers, cls)
    params = set(inspect.signature(klass.__init__).parameters)
    if not set(options) <= params:
        pytest.skip(f"{cls} has no {sorted(set(options) - params)}")
    if cls == "HeunDiscreteScheduler" and "rescale_betas_zero_snr" in options:
        pytest.skip("HeunDiscreteScheduler has no zero-terminal-SNR rescaling")
    base = {k: v for k, v in load("sdxl_base.json").items() if k != "_class_name"}
    cfg = dict(klass.from_config({**base, **options}).config)
    # at zero terminal SNR the k-diffusion-style schedulers start at sigma = 4096, where their own
    # float32 arithmetic is 7e-5 from float64: compare with their float64 run (diffsolve's 1.1e-5 / 6e-7
    # at 5 / 12 steps)
    zero_snr = cls != "DDIMScheduler" and options.get("rescale_betas_zero_snr", False)
    dtype, tol = (torch.float64, 2e-5) if zero_snr else (torch.float32, 1e-5)
    for n in (5, 12):
        a, ca = loop(klass.from_config(cfg), n, cfg, dtype=dtype)
        b, cb = loop(DiffsolveScheduler.from_config(cfg, solver=solver), n, cfg)
        assert ca == cb, (ca, cb)
        assert rel(a.to(b.dtype), b) < tol, (cls, options, n, rel(a.to(b.dtype), b))


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"use_karras_sigmas": True},
        {"use_exponential_sigmas": True},
        {"use_beta_sigmas": True},
        {"shift_terminal": 0.1},
        {"invert_sigmas": True},
    ],
)
@pytest.mark.parametrize(
    "cls,solver", [("FlowMatchEulerDiscreteScheduler", "euler"), ("FlowMatchHeunDiscreteScheduler", "heun")]
)
def test_flow_parity_under_sigma_options(cls, solver, options):
    klass = getattr(diffusers, cls)
    if not set(options) <= set(inspect.signature(klass.__init__).parameters):
        pytest.skip(f"{cls} has no {sorted(options)}")
    cfg = dict(klass.from_config({"shift": 3.0, **options}).config)
    a, ca = loop(klass.from_config(cfg), 10, cfg)
    b, cb = loop(DiffsolveScheduler.from_config(cfg, solver=solver), 10, cfg)
    assert ca == cb and rel(a, b) < 1e-5, (options, ca, cb, rel(a, b))


# ------------------------------------------------------------------------------- every solver
FIXED = [i.name for i in ds.list_solvers() if i.fixed_grid and i.family != "mcmc"]


@pytest.mark.parametrize("name", [c for c in CONFIGS if c not in REFUSED])
def test_every_fixed_grid_solver_runs_in_every_config(name):
    """One listed timestep per model call: the loop's last call ends the solver's run. A reversible
    solver may refuse a grid this coarse (4 steps) with UnstableError, naming the step: so edict on
    Stable Audio's sigmas from 500, whose chains part by 2 times the state at the last step."""
    cfg = load(name)
    flow = DiffsolveScheduler.from_config(cfg).source.flow
    for solver in FIXED:
        reversible = ds.samplers.solver_info(solver).family == "reversible"
        kw = {"t_max": 0.999} if flow and not reversible else {}  # alpha = 0 at sigma = 1: SDE solvers need less
        with warnings.catch_warnings():  # reversible solvers move an end they cannot reach, and warn
            warnings.simplefilter("ignore")
            s = DiffsolveScheduler.from_config(cfg, solver=solver, seed=0, **kw)
        try:
            x, calls = loop(s, 4, cfg, shape=(2, 3, 4, 4))
        except ds.UnstableError as e:
            assert reversible and f"solver {solver!r}" in str(e), (name, solver, e)
            continue
        assert torch.isfinite(x).all(), (name, solver)
        assert calls == len(s.timesteps) and s._run.pump is None, (name, solver, calls)


# ------------------------------------------------------------------------------- issue 17's points
@pytest.mark.parametrize(
    "cls,first", [("DPMSolverMultistepScheduler", [999.0, 949.0]), ("EulerDiscreteScheduler", [999.0, 946.4210815])]
)
def test_1_a_config_dict_keeps_the_class_it_came_from(cls, first):
    """A scheduler made in code has no _class_name in its config: the class is read off its keys."""
    ref = getattr(diffusers, cls)(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    ours = DiffsolveScheduler.from_config(dict(ref.config), solver="dpmpp-2m")
    ours.set_timesteps(20)
    ref.set_timesteps(20)
    assert ours.config.source == cls
    assert ours.timesteps[:2].tolist() == pytest.approx(first)
    assert torch.allclose(ours.timesteps.double(), ref.timesteps.double(), atol=1e-4)


def test_2_ddim_without_alpha_to_one_makes_every_requested_call():
    """SD 1.x's DDIM (set_alpha_to_one=False) ends at timestep 0, stepping from alphas_cumprod[0] to
    itself: 20 steps are 20 calls, the last leaving the sample as it is, as DDIMScheduler does."""
    cfg = {**load("sd21.json"), "_class_name": "DDIMScheduler", "prediction_type": "epsilon", "steps_offset": 0}
    ours = DiffsolveScheduler.from_config(cfg, solver="ddim")
    a, ca = loop(reference(cfg), 20, cfg)
    b, cb = loop(ours, 20, cfg)
    assert len(ours.timesteps) == 20 and ca == cb == 20
    assert rel(a, b) < 1e-5


@pytest.mark.parametrize("spacing", ["trailing", "linspace", "leading"])
def test_ddim_steps_by_its_stride_and_reads_the_next_listed_timestep(spacing):
    """DDIMScheduler steps to t - 1000 // N; at 12 steps trailing and linspace timesteps are not that
    far apart (833 -> 750, then a call at 749)."""
    cfg = {**load("sd21.json"), "timestep_spacing": spacing}
    a, ca = loop(reference(cfg), 12, cfg)
    b, cb = loop(DiffsolveScheduler.from_config(cfg, solver="ddim"), 12, cfg)
    assert ca == cb == 12 and rel(a, b) < 1e-5, rel(a, b)


def test_5_euler_and_heun_mean_the_diffusers_samplers():
    """euler / heun with no options reproduce EulerDiscrete / HeunDiscrete; space='t' is an option
    that differs on a VP schedule (and agrees on rectified flow)."""
    cfg = load("sdxl_base.json")
    for cls, solver in (("EulerDiscreteScheduler", "euler"), ("HeunDiscreteScheduler", "heun")):
        c = {**cfg, "_class_name": cls}
        a, _ = loop(reference(c), 10, c)
        b, _ = loop(DiffsolveScheduler.from_config(c, solver=solver), 10, c)
        t, _ = loop(DiffsolveScheduler.from_config(c, solver=solver, solver_options={"space": "t"}), 10, c)
        assert rel(a, b) < 1e-5 and rel(a, t) > 1e-3, (solver, rel(a, b), rel(a, t))
    oracle = ds.models.GaussianMixture.gmm_2d().model(ds.schedules.VPLinear())
    e = ds.sample(oracle, "euler", 10, shape=(64, 2), seed=0)
    d = ds.sample(oracle, "ddim", 10, shape=(64, 2), seed=0)
    assert torch.allclose(e.samples, d.samples, atol=1e-5)  # Euler in sigma/alpha is DDIM
    flow = ds.models.GaussianMixture.gmm_2d().model(ds.schedules.RectifiedFlow())
    a = ds.sample(flow, "heun", 8, shape=(64, 2), seed=0)
    b = ds.sample(flow, "heun", 8, shape=(64, 2), seed=0, space="t")
    assert torch.allclose(a.samples, b.samples, atol=1e-5)


@pytest.mark.parametrize("grid", ["log-snr", "karras", "uniform"])
@pytest.mark.parametrize("solver", ["ddim", "dpmpp-2m", "euler"])
def test_6_own_grids_cost_the_calls_asked_for(grid, solver):
    cfg = load("sdxl_base.json")
    for n in (1, 2, 7):
        s = DiffsolveScheduler.from_config(cfg, solver=solver, steps_grid=grid)
        x, calls = loop(s, n, cfg)
        assert calls == n and torch.isfinite(x).all(), (grid, solver, n, calls)
        assert float(s._run.grid[-1]) == 0.0  # the last call jumps to the clean end


@pytest.mark.parametrize(
    "name,solver",
    [("sana_1600m_512px.json", "dpmpp-2m"), ("wan21_vace_14b.json", "dpmpp-2m"), ("mochi_1_preview.json", "euler")],
)
def test_7_flow_prediction_and_inverted_sigmas_are_read(name, solver):
    """Read as flow matching: the network timestep is 1000 times the listed sigma (whole numbers for
    DPM-Solver and UniPC, which truncate), also where Mochi lists 1 - sigma."""
    cfg = load(name)
    s = DiffsolveScheduler.from_config(cfg, solver=solver)
    assert s.source.flow
    x, calls = loop(s, 10, cfg)
    assert calls == 10 and torch.isfinite(x).all()
    assert torch.allclose(s.timesteps, 1000 * s.sigmas[:-1], atol=1.0), (s.timesteps, s.sigmas)
    assert float(s.sigmas[0]) == pytest.approx(0.0 if s.source.inverted else 1.0, abs=1e-3)


@pytest.mark.parametrize(
    "cls,solver", [("DPMSolverMultistepScheduler", "dpmpp-2m"), ("EulerDiscreteScheduler", "euler")]
)
def test_8_karras_sigmas_at_rounded_timesteps(cls, solver):
    """With Karras sigmas the source calls the network at rounded (DPM-Solver) or interpolated
    (Euler) timesteps while stepping on the exact sigmas: so does the drop-in."""
    cfg = {**load("sdxl_base.json"), "_class_name": cls, "use_karras_sigmas": True}
    a, ca = loop(reference(cfg), 12, cfg)
    b, cb = loop(DiffsolveScheduler.from_config(cfg, solver=solver), 12, cfg)
    assert ca == cb == 12 and rel(a, b) < 1e-5, rel(a, b)


def test_config_round_trip_keeps_the_source(tmp_path):
    s = DiffsolveScheduler.from_config(load("pixart_sigma.json"), solver="dpmpp-2m")
    s.save_pretrained(tmp_path)
    t = DiffsolveScheduler.from_pretrained(tmp_path)
    s.set_timesteps(9)
    t.set_timesteps(9)
    assert t.config.source == "DPMSolverMultistepScheduler" and torch.equal(s.timesteps, t.timesteps)
