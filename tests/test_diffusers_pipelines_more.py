"""More tiny offline pipelines (tests/tiny_pipelines.py): SDXL (added text embeddings and time ids),
SD img2img and inpainting (9-channel UNet), PixArt-Sigma (T5, learned sigma) and an EDM-style SDXL
(Playground v2.5's scheduler config). Scheduler-mode parity with diffusers' own schedulers where
diffusers has the algorithm; driver mode for every kind of solver (denoiser calls = NFE; with CFG
the driver makes two calls per guided model call, the pipelines one batched call)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
from diffusers import DPMSolverMultistepScheduler, EDMDPMSolverMultistepScheduler
from tiny_pipelines import (
    SCHEDULER_CONFIGS,
    CountCalls,
    denoiser,
    pixart_sigma,
    playground_v25,
    run_latents,
    stable_diffusion_img2img,
    stable_diffusion_inpaint,
    stable_diffusion_xl,
    stable_diffusion_xl_img2img,
)

import diffsolve as ds
from diffsolve.integrations.diffusers import DiffsolveScheduler, invert_pipeline, pipeline_model, sample_pipeline

BUILD = {
    "sdxl": stable_diffusion_xl,
    "edm": playground_v25,
    "pixart": pixart_sigma,
    "img2img": stable_diffusion_img2img,
    "inpaint": stable_diffusion_inpaint,
    "sdxl_img2img": stable_diffusion_xl_img2img,
}
FIXTURES = Path("/work/shared/fixtures/scheduler_configs")


def _image():
    return torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def _mask():
    m = torch.zeros(1, 1, 16, 16)
    m[..., 4:12, 4:12] = 1.0  # white: repaint
    return m


def _call(kind):
    """The pipeline call's arguments besides the prompt (and sample_pipeline's, but for the pipeline-only ones)."""
    kw = {"guidance_scale": 3.0}
    if "img2img" not in kind:
        kw.update(height=16, width=16)
    if kind == "pixart":
        kw.update(max_sequence_length=8, use_resolution_binning=False, clean_caption=False)
    if "img2img" in kind:
        kw.update(image=_image(), strength=0.5)
    if kind == "inpaint":
        kw.update(image=_image(), mask_image=_mask())
    return kw


def _driver_call(kind):
    return {k: v for k, v in _call(kind).items() if k not in ("use_resolution_binning", "clean_caption")}


@pytest.fixture(autouse=True)
def _one_thread(_torch_threads):
    """These networks are tiny (8 x 8 latents): one thread is faster than two, and far faster when
    the CPU is shared (two spinning threads on a busy core: 2 s instead of 0.08 s per pipeline run)."""
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(2)


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    """Every pipeline, built once for the module (on first use)."""
    built = {}

    def get(kind):
        if kind not in built:
            built[kind] = BUILD[kind](tmp_path_factory.mktemp(kind))
            built[kind].kind = kind
        return built[kind]

    return get


def _latents(p, scheduler, n, **extra):
    return run_latents(p, scheduler, n, **{**_call(p.kind), **extra})


def _rel(a, b):
    return float((a - b).abs().max() / a.abs().max())


def test_scheduler_configs_are_the_published_ones():
    if not FIXTURES.is_dir():
        pytest.skip("no shared scheduler-config fixtures on this machine")
    for name, cfg in SCHEDULER_CONFIGS.items():
        published = {
            k: v
            for k, v in json.loads((FIXTURES / f"{name}.json").read_text()).items()
            if not k.startswith("_") or k == "_class_name"
        }
        assert published == cfg, name


# ---------------------------------------------------------------------------------- scheduler mode

PARITY = [  # (pipeline, reference scheduler: None = the pipeline's own, solver, its options, call overrides)
    ("sdxl", None, "euler", {"space": "sigma"}, {}),
    ("sdxl", DPMSolverMultistepScheduler, "dpmpp-2m", {}, {}),
    ("img2img", None, "ddim", {}, {}),
    ("img2img", DPMSolverMultistepScheduler, "dpmpp-2m", {}, {}),
    ("inpaint", None, "ddim", {}, {}),
    ("inpaint", DPMSolverMultistepScheduler, "dpmpp-2m", {}, {}),
    ("inpaint", None, "ddim", {}, {"strength": 0.6}),
    ("inpaint", DPMSolverMultistepScheduler, "dpmpp-2m", {}, {"strength": 0.6}),
    ("pixart", None, "dpmpp-2m", {}, {}),
    ("sdxl_img2img", None, "euler", {"space": "sigma"}, {}),
]


@pytest.mark.parametrize(
    "kind,ref_cls,solver,opts,extra",
    PARITY,
    ids=[f"{k}-{solver}-{e.get('strength', 'full')}" for k, _, solver, _, e in PARITY],
)
def test_scheduler_parity(pipes, kind, ref_cls, solver, opts, extra):
    """Scheduler mode inside each pipeline equals diffusers' scheduler on the output latents, with
    as many denoiser calls (img2img and inpainting below strength 1: set_begin_index; 10 steps at
    strength 0.5 run 5)."""
    p = pipes(kind)
    ref = p.scheduler if ref_cls is None else ref_cls.from_config(p.scheduler.config)
    n = 10 if kind in ("img2img", "inpaint", "sdxl_img2img") else 6
    a, ca = _latents(p, ref, n, **extra)
    b, cb = _latents(p, DiffsolveScheduler.from_config(ref, solver=solver, solver_options=opts), n, **extra)
    rel = _rel(a, b)
    print(kind, solver, "vs", type(ref).__name__, extra, "relative difference", rel, "denoiser calls", ca, cb)
    strength = extra.get("strength", _call(kind).get("strength", 1.0))
    assert ca == cb == min(int(n * strength), n)
    assert rel < 1e-5


def test_scheduler_parity_edm_playground(pipes):
    p = pipes("edm")
    assert isinstance(p.scheduler, EDMDPMSolverMultistepScheduler)
    a, ca = _latents(p, p.scheduler, 6)
    b, cb = _latents(p, DiffsolveScheduler.from_config(p.scheduler.config, solver="dpmpp-2m"), 6)
    rel = _rel(a, b)
    print("edm dpmpp-2m vs EDMDPMSolverMultistepScheduler", rel, ca, cb)
    assert ca == cb and rel < 1e-5


# ---------------------------------------------------------------------------------- driver mode

DRIVER = [("dpmpp-2m", {}), ("ddpm", {}), ("ode-dopri5", {"rtol": 5e-2}), ("o-belm", {})]


@pytest.mark.parametrize("kind", list(BUILD))
def test_driver_mode_runs_every_kind_of_solver(pipes, kind):
    """A deterministic, a stochastic, an adaptive and a reversible solver: finite images, NFE =
    denoiser calls. img2img runs the steps its strength leaves (4 steps at 0.5: 2)."""
    p = pipes(kind)
    kw = _driver_call(kind)
    for solver, opts in DRIVER:
        with CountCalls(denoiser(p)) as c:
            out = sample_pipeline(
                p,
                solver,
                "a cat",
                num_inference_steps=4,
                generator=torch.Generator().manual_seed(0),
                output_type="np",
                **kw,
                **opts,
            )
        assert out.images.shape == (1, 16, 16, 3) and np.isfinite(out.images).all(), (kind, solver)
        assert c.calls == out.result.nfe, (kind, solver, c.calls, out.result.nfe)
        info = ds.core.registry.solver_info(solver)
        if info.fixed_grid:
            steps = 2 if "img2img" in kind else 4
            assert len(out.result.grid) - 1 == steps, (kind, solver)
            assert out.result.nfe == 2 * steps * info.calls_per_step, (kind, solver)  # CFG: two calls


def test_driver_mode_img2img_starts_where_the_pipeline_does(pipes):
    """strength 0.5 of 10 steps: the pipeline's scheduler's 6th timestep (DDIM, leading: 401), as a
    diffsolve time; 5 steps left; an adaptive solver starts there too; the start is the image's
    latents noised there (the same with the same generator, different with another)."""
    from diffsolve.schedules import VPDiscrete

    p = pipes("img2img")
    kw = _driver_call("img2img")
    ref = type(p.scheduler).from_config(p.scheduler.config)
    ref.set_timesteps(10)
    t0 = float(VPDiscrete.from_diffusers_config(p.scheduler.config).t_of_timestep(float(ref.timesteps[5])))
    runs = {}
    for solver, seed, opts in (("ddim", 0, {}), ("ode-dopri5", 0, {"rtol": 5e-2}), ("ddim", 1, {})):
        runs[solver, seed] = out = sample_pipeline(
            p,
            solver,
            "a cat",
            num_inference_steps=10,
            output_type="latent",
            generator=torch.Generator().manual_seed(seed),
            **kw,
            **opts,
        )
        assert float(out.result.grid[0]) == pytest.approx(t0, abs=1e-12)
    assert len(runs["ddim", 0].result.grid) == 6 and runs["ddim", 0].result.nfe == 10
    again = sample_pipeline(
        p,
        "ddim",
        "a cat",
        num_inference_steps=10,
        output_type="latent",
        generator=torch.Generator().manual_seed(0),
        **kw,
    )
    assert torch.equal(again.latents, runs["ddim", 0].latents)
    assert not torch.allclose(runs["ddim", 1].latents, runs["ddim", 0].latents)
    with pytest.raises(ValueError, match="no step"):
        sample_pipeline(p, "ddim", "a cat", num_inference_steps=4, image=_image(), strength=0.2)
    with pytest.raises(ValueError, match="image="):
        sample_pipeline(p, "ddim", "a cat", num_inference_steps=4, strength=0.5)
    wide = torch.rand(1, 3, 16, 24, generator=torch.Generator().manual_seed(4))  # latents of the image's size
    out = sample_pipeline(p, "ddim", "a cat", num_inference_steps=4, image=wide, strength=0.5, output_type="np")
    assert out.latents.shape == (1, 4, 8, 12) and out.images.shape == (1, 16, 24, 3)


@pytest.mark.parametrize("kind", ["sdxl", "inpaint"])
def test_driver_mode_per_sample_steps_on_a_batch(pipes, kind):
    """adaptive-sde takes its own steps per sample (row subsets of every condition: time ids, pooled
    embeddings, inpainting inputs): two images per prompt, NFE = denoiser calls, per-sample counts."""
    p = pipes(kind)
    with CountCalls(denoiser(p)) as c:
        out = sample_pipeline(
            p,
            "adaptive-sde",
            "a cat",
            num_images_per_prompt=2,
            eps_rel=0.2,
            t_min=1e-3,
            generator=torch.Generator().manual_seed(0),
            output_type="latent",
            **_driver_call(kind),
        )
    assert out.latents.shape == (2, 4, 8, 8) and torch.isfinite(out.latents).all()
    assert c.calls == out.result.nfe and out.result.nfe_per_sample.shape == (2,)


def test_driver_dpmpp_2m_matches_the_sdxl_pipeline(pipes):
    """Driver-mode dpmpp-2m on SDXL (add_text_embeds, add_time_ids, CFG) on DPMSolverMultistep's
    grid, from the same noise, is the pipeline's own DPM-Solver++(2M) run."""
    p = pipes("sdxl")
    ref = DPMSolverMultistepScheduler.from_config(p.scheduler.config)
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    base, p.scheduler = p.scheduler, ref
    try:
        with CountCalls(p.unet) as c:
            a = p(
                "a cat", num_inference_steps=8, guidance_scale=3.0, latents=z, height=16, width=16, output_type="latent"
            ).images
    finally:
        p.scheduler = base
    ref.set_timesteps(8)
    grid = torch.cat(
        [(ref.timesteps.double() + 1) / ref.config.num_train_timesteps, torch.zeros(1, dtype=torch.float64)]
    )
    with CountCalls(p.unet) as d:
        b = sample_pipeline(
            p, "dpmpp-2m", "a cat", guidance_scale=3.0, x_T=z, grid=grid, height=16, width=16, output_type="latent"
        )
    rel = _rel(a, b.latents)
    print("SDXL driver dpmpp-2m vs pipeline DPMSolverMultistepScheduler", rel, "calls", c.calls, d.calls, b.result.nfe)
    assert rel < 1e-5
    assert c.calls == 8 and d.calls == b.result.nfe == 16  # one batched CFG call per step there, two here


def test_driver_edm_preconditioning_and_dpmpp_2m_match_diffusers(pipes):
    """The EDM model of an EDM-style config is diffusers' EDM preconditioning of the UNet
    (precondition_inputs / _noise / _outputs of EDMDPMSolverMultistepScheduler); driver-mode dpmpp-2m
    on that scheduler's Karras sigmas, from the same start, is the pipeline's own run."""
    p = pipes("edm")
    sched = p.scheduler
    model, cond, _b, shape, _ = pipeline_model(p, "a cat", guidance_scale=1.0, height=16, width=16)
    assert isinstance(model.schedule, ds.schedules.EDM)
    assert (model.schedule.sigma_min, model.schedule.sigma_max) == (0.002, 80.0)
    x = torch.randn(1, *shape, generator=torch.Generator().manual_seed(2))
    for s in (0.01, 0.7, 5.0, 80.0):
        sg = torch.tensor(s)
        with torch.no_grad():
            f = p.unet(
                sched.precondition_inputs(x, sg),
                sched.precondition_noise(sg),
                cond["encoder_hidden_states"],
                added_cond_kwargs={"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]},
            ).sample
            ref = sched.precondition_outputs(x, f, sg)
            ours = model(x, s, **cond).x0
        assert _rel(ref, ours) < 1e-5, s
    z = torch.randn(1, *shape, generator=torch.Generator().manual_seed(3))
    ref = EDMDPMSolverMultistepScheduler.from_config(sched.config)
    a, _ = _latents(p, ref, 8, latents=z)
    ref.set_timesteps(8)
    out = sample_pipeline(
        p,
        "dpmpp-2m",
        "a cat",
        guidance_scale=3.0,
        x_T=z * ref.init_noise_sigma,
        grid=ref.sigmas.double(),
        height=16,
        width=16,
        output_type="latent",
    )
    rel = _rel(a, out.latents)
    print("EDM driver dpmpp-2m vs pipeline EDMDPMSolverMultistepScheduler", rel)
    assert rel < 1e-5
    # its own grid: Karras sigmas from sigma_max to sigma_min
    own = sample_pipeline(
        p,
        "dpmpp-2m",
        "a cat",
        num_inference_steps=8,
        guidance_scale=3.0,
        height=16,
        width=16,
        generator=torch.Generator().manual_seed(0),
        output_type="latent",
    )
    assert float(own.result.grid[0]) == 80.0 and float(own.result.grid[-1]) == 0.002


def test_driver_pixart_splits_learned_sigma(pipes):
    p = pipes("pixart")
    assert p.transformer.config.out_channels == 2 * p.transformer.config.in_channels
    model, cond, _b, shape, _ = pipeline_model(
        p, "a cat", guidance_scale=1.0, height=16, width=16, max_sequence_length=8
    )
    assert shape == (4, 8, 8)
    x = torch.randn(1, *shape)
    with torch.no_grad():
        full = p.transformer(
            x,
            encoder_hidden_states=cond["encoder_hidden_states"],
            encoder_attention_mask=cond["encoder_attention_mask"],
            timestep=torch.tensor([500.0]),
            added_cond_kwargs={"resolution": None, "aspect_ratio": None},
        ).sample
        assert torch.allclose(model(x, model.schedule.t_of_timestep(500.0), **cond).eps, full[:, :4])


@pytest.mark.parametrize("kind", ["sdxl", "edm"])
def test_exact_inversion_round_trip_sdxl(pipes, kind):
    p = pipes(kind)
    image = _image()
    lat = invert_pipeline(p, image, "o-belm", "a cat", num_inference_steps=10, guidance_scale=3.0)
    assert lat.nfe == 20  # CFG: two UNet calls per model call
    back = sample_pipeline(p, "o-belm", "a cat", guidance_scale=3.0, latent=lat, output_type="latent").latents
    from diffsolve.integrations.diffusers.pipelines import _encode_vae

    x0 = _encode_vae(p, p.image_processor.preprocess(image))
    err = float((back - x0).abs().max())
    print(
        kind,
        "o-belm round trip max error",
        err,
        "latent scale",
        float(x0.abs().max()),
        "inverted scale",
        float(lat.x.abs().max()),
    )
    assert err < 1e-4 and float((lat.x - x0).abs().max()) > 10 * float(x0.abs().max())  # it went to noise and back


def test_driver_inpainting_unet_inputs(pipes):
    """The 9-channel UNet sees the latents, the mask at latent size and the masked image's latents,
    as the pipeline concatenates them."""
    from diffsolve.integrations.diffusers.pipelines import _encode_vae

    p = pipes("inpaint")
    model, cond, _b, shape, _ = pipeline_model(p, "a cat", guidance_scale=1.0, image=_image(), mask_image=_mask())
    assert shape == (4, 8, 8) and cond["inpaint"].shape == (1, 5, 8, 8)
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 2:6, 2:6] = 1.0
    masked = _encode_vae(p, p.image_processor.preprocess(_image()) * (1 - p.mask_processor.preprocess(_mask())))
    x = torch.randn(1, *shape)
    with torch.no_grad():
        eps = p.unet(torch.cat([x, mask, masked], 1), torch.tensor([500.0]), cond["encoder_hidden_states"]).sample
        assert torch.allclose(model(x, model.schedule.t_of_timestep(500.0), **cond).eps, eps, atol=1e-6)
    with pytest.raises(ValueError, match="mask_image"):
        pipeline_model(p, "a cat", image=_image())


def test_driver_inpainting_with_a_4_channel_unet(pipes):
    """A 4-channel UNet in the inpainting pipeline inpaints by replacement (diffsolve.guidance.Inpaint):
    the known latents (mask 0) end as the image's latents."""
    from diffusers import StableDiffusionInpaintPipeline

    from diffsolve.integrations.diffusers.pipelines import _encode_vae

    p = StableDiffusionInpaintPipeline(**pipes("img2img").components)
    p.set_progress_bar_config(disable=True)
    with CountCalls(p.unet) as c:
        out = sample_pipeline(
            p,
            "ddim",
            "a cat",
            num_inference_steps=4,
            guidance_scale=3.0,
            image=_image(),
            mask_image=_mask(),
            generator=torch.Generator().manual_seed(0),
            output_type="latent",
        )
    assert c.calls == out.result.nfe == 8
    known = torch.ones(1, 1, 8, 8)
    known[..., 2:6, 2:6] = 0.0
    y = _encode_vae(p, p.image_processor.preprocess(_image()))
    assert torch.allclose(out.latents * known, y * known, atol=1e-6)
    assert not torch.allclose(out.latents * (1 - known), y * (1 - known), atol=1e-2)
