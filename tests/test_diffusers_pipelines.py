"""Tiny Stable Diffusion, SD3 and Flux pipelines built offline (tests/tiny_pipelines.py): scheduler
parity with diffusers' own schedulers, every fixed-grid solver inside each pipeline, driver mode for
every other kind of solver (denoiser calls = NFE), exact inversion with CFG."""

import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
)
from tiny_pipelines import (
    CountCalls,
    denoiser,
    flux,
    run_latents,
    stable_diffusion,
    stable_diffusion_3,
)

import diffsolve as ds
from diffsolve.integrations.diffusers import (
    DiffsolveScheduler,
    invert_pipeline,
    sample_pipeline,
)

BUILD = {"sd": stable_diffusion, "sd3": stable_diffusion_3, "flux": flux}
CALL = {
    "sd": dict(guidance_scale=3.0),
    "sd3": dict(guidance_scale=3.0, height=16, width=16),
    "flux": dict(guidance_scale=3.0, height=16, width=16, max_sequence_length=8),
}


@pytest.fixture(scope="module", params=list(BUILD))
def pipe(request, tmp_path_factory):
    p = BUILD[request.param](tmp_path_factory.mktemp(request.param))
    p.kind = request.param
    return p


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    return stable_diffusion(tmp_path_factory.mktemp("sd"))


def _latents(p, scheduler, n=6):
    return run_latents(p, scheduler, n, **CALL[p.kind])


@pytest.mark.parametrize(
    "ref_cls,solver,opts",
    [
        (DDIMScheduler, "ddim", {}),
        (EulerDiscreteScheduler, "euler", {"space": "sigma"}),
        (HeunDiscreteScheduler, "heun", {"space": "sigma"}),
        (DPMSolverMultistepScheduler, "dpmpp-2m", {}),
    ],
)
def test_scheduler_parity_inside_stable_diffusion(sd, ref_cls, solver, opts):
    sd.kind = "sd"
    ref = ref_cls.from_config(sd.scheduler.config)
    a, ca = _latents(sd, ref)
    b, cb = _latents(sd, DiffsolveScheduler.from_config(ref, solver=solver, solver_options=opts))
    rel = float((a - b).abs().max() / a.abs().max())
    print(solver, "relative difference to", ref_cls.__name__, rel, "UNet calls", ca, cb)
    assert rel < 1e-4 and ca == cb


def test_flow_match_euler_parity_in_sd3_and_flux(pipe):
    """SD3 (static shift 3) and Flux (sigmas and mu passed by the pipeline, dynamic shift): euler is
    FlowMatchEulerDiscreteScheduler."""
    if pipe.kind == "sd":
        pytest.skip("a DDPM-style pipeline")
    a, ca = _latents(pipe, pipe.scheduler)
    b, cb = _latents(pipe, DiffsolveScheduler.from_config(pipe.scheduler, solver="euler"))
    rel = float((a - b).abs().max() / a.abs().max())
    print(pipe.kind, "euler vs FlowMatchEulerDiscreteScheduler", rel, ca, cb)
    assert rel < 1e-4 and ca == cb


def test_every_fixed_grid_solver_runs_inside_the_pipeline(pipe):
    """Flow pipelines start at sigma = 1 (alpha = 0); solvers that need alpha > 0 say so, and run
    with t_max=0.999. Reversible solvers move the end they cannot reach themselves, and warn."""
    infos = [i for i in ds.list_solvers() if i.fixed_grid]
    flow = pipe.kind != "sd"
    for info in infos:
        name, reversible = info.name, info.family == "reversible"
        opts = {"seed": 0} if reversible else {"seed": 0, "final": "zero"}
        if flow and not reversible:
            opts["t_max"] = 0.999
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            s = DiffsolveScheduler.from_config(pipe.scheduler, solver=name, **opts)
            out, calls = _latents(pipe, s, n=4)
        assert torch.isfinite(out).all(), name
        assert calls == len(s.timesteps), (name, calls, len(s.timesteps))
    if flow:
        with pytest.raises(ValueError, match="t_max"):
            _latents(pipe, DiffsolveScheduler.from_config(pipe.scheduler, solver="euler-maruyama"), n=4)
        with pytest.warns(UserWarning, match="'rev-heun' cannot reach the clean end"):
            _latents(pipe, DiffsolveScheduler.from_config(pipe.scheduler, solver="rev-heun"), n=4)


@pytest.mark.parametrize(
    "solver,opts",
    [
        ("adaptive-sde", {"eps_rel": 0.2}),
        ("ode-dopri5", {"rtol": 1e-2}),
        ("dmcmc", {"integrator_steps": 3}),
        ("rev-heun", {}),
    ],
)
def test_driver_mode_runs_any_solver_and_counts_denoiser_calls(pipe, solver, opts):
    kw = dict(CALL[pipe.kind])
    if pipe.kind != "sd" and solver in ("adaptive-sde", "dmcmc", "rev-heun"):
        kw["t_max"] = 0.999  # alpha = 0 at t = 1 of a flow
    if solver in ("adaptive-sde", "dmcmc"):
        kw["t_min"] = 1e-3  # the score is infinite at sigma = 0
    with CountCalls(denoiser(pipe)) as c:
        out = sample_pipeline(
            pipe,
            solver,
            "a cat",
            num_inference_steps=5,
            generator=torch.Generator().manual_seed(0),
            output_type="np",
            **kw,
            **opts,
        )
    assert np.isfinite(out.images).all() and out.images.shape[-1] == 3
    assert c.calls == out.result.nfe, (c.calls, out.result.nfe)


@pytest.mark.parametrize("solver", ["rex", "edict"])
def test_exact_inversion_round_trip_with_cfg(sd, solver):
    torch.manual_seed(1)
    image = torch.rand(1, 3, 16, 16)
    lat = invert_pipeline(sd, image, solver, "a cat", num_inference_steps=50, guidance_scale=3.0)
    assert lat.aux is not None and lat.nfe > 100  # both states; CFG: two UNet calls per model call
    with torch.no_grad():
        x0 = sd.vae.encode(sd.image_processor.preprocess(image)).latent_dist.mean * sd.vae.config.scaling_factor
    back = sample_pipeline(sd, solver, "a cat", guidance_scale=3.0, latent=lat, output_type="latent").latents
    err = float((back - x0).abs().max())
    print(solver, "round trip max error (float32, 50 steps, CFG 3)", err, "latent scale", float(x0.abs().max()))
    assert err < 1e-5


def test_cli_samples_a_local_pipeline_folder(sd, tmp_path):
    import json

    from diffsolve.cli import main

    folder = tmp_path / "tiny-sd"
    sd.save_pretrained(folder)
    out = tmp_path / "out"
    argv = [
        "sample",
        "--pipeline",
        str(folder),
        "--prompt",
        "a cat",
        "--solver",
        "ode-dopri5",
        "-o",
        "rtol=0.01",
        "--num-samples",
        "2",
        "--guidance-scale",
        "2",
        "--out",
        str(out),
        "--no-progress",
    ]
    assert main(argv) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["pipeline_class"] == "StableDiffusionPipeline" and m["nfe"] > 0 and m["prompt"] == "a cat"
    assert (out / "samples.png").exists()
    assert main(argv) == 2  # no overwrite without --force
    assert main(["sample", "--prompt", "a cat", "--out", str(tmp_path / "x")]) == 2


def test_forward_process_and_img2img(sd, tmp_path):
    """add_noise / scale_noise equal diffusers' (img2img and inpainting use them), and an img2img
    pipeline starts mid-way with set_begin_index."""
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        StableDiffusionImg2ImgPipeline,
    )

    x0, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    ref = DDIMScheduler.from_config(sd.scheduler.config)
    ours = DiffsolveScheduler.from_config(ref, solver="ddim")
    t = torch.tensor([999, 250])
    assert torch.allclose(ours.add_noise(x0, noise, t), ref.add_noise(x0, noise, t), rtol=0, atol=1e-5)
    fref = FlowMatchEulerDiscreteScheduler(shift=3.0)
    fref.set_timesteps(10)
    fours = DiffsolveScheduler.from_config(fref, solver="euler")
    ts = fref.timesteps[3:4]
    assert torch.allclose(fours.scale_noise(x0, ts, noise), fref.scale_noise(x0, ts, noise), rtol=0, atol=1e-5)

    img2img = StableDiffusionImg2ImgPipeline(**sd.components)
    img2img.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, 16, 16)
    out = {}
    for name, sched in (("ref", ref), ("ours", ours)):
        img2img.scheduler = sched
        with CountCalls(sd.unet) as c:
            out[name] = img2img(
                "a cat",
                image=image,
                strength=0.5,
                num_inference_steps=10,
                guidance_scale=2.0,
                generator=torch.Generator().manual_seed(0),
                output_type="latent",
            ).images
        out[name + "_calls"] = c.calls
    assert out["ref_calls"] == out["ours_calls"] == 5
    assert float((out["ref"] - out["ours"]).abs().max() / out["ref"].abs().max()) < 1e-4
