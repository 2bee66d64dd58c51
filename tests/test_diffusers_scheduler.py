"""DiffsolveScheduler inside diffusers: parity with diffusers' own schedulers, every fixed-grid solver
runs, model calls equal the listed timesteps, per-thread run state, config round trip."""

import threading
import warnings

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMPipeline,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
)

import diffsolve as ds
from diffsolve.integrations.diffusers import DiffsolveScheduler


@pytest.fixture(scope="module")
def pipe():
    p = DDPMPipeline.from_pretrained(str(ds.pretrained.path_of("digits-vp")))
    p.set_progress_bar_config(disable=True)
    return p


class _Count(torch.nn.Module):
    """Counts the UNet's forward calls."""

    def __init__(self, unet):
        super().__init__()
        self.unet, self.calls, self.config, self.dtype, self.device = unet, 0, unet.config, unet.dtype, unet.device

    def forward(self, *a, **k):
        self.calls += 1
        return self.unet(*a, **k)


def _images(pipe, scheduler, n=10, batch=3, seed=0):
    pipe.scheduler = scheduler
    return pipe(
        batch_size=batch, generator=torch.Generator().manual_seed(seed), num_inference_steps=n, output_type="np"
    ).images


@pytest.mark.parametrize("ref_cls,solver", [(DDIMScheduler, "ddim"), (DPMSolverMultistepScheduler, "dpmpp-2m")])
def test_parity_inside_ddpm_pipeline(pipe, ref_cls, solver):
    """The pipeline's scheduler swapped for diffusers' own, then for ours built from its config."""
    base = pipe.scheduler
    ref = ref_cls.from_config(base.config)
    a = _images(pipe, ref)
    b = _images(pipe, DiffsolveScheduler.from_config(ref, solver=solver))
    pipe.scheduler = base
    diff = float(np.abs(a - b).max())
    print(solver, "max difference to", ref_cls.__name__, diff)
    assert diff < 1e-4


@pytest.mark.parametrize("ref_cls,solver", [(EulerDiscreteScheduler, "euler"), (HeunDiscreteScheduler, "heun")])
def test_parity_of_k_style_schedulers_in_a_stable_diffusion_loop(pipe, ref_cls, solver):
    """The SD loop (init_noise_sigma, scale_model_input, step) with Euler/Heun in k-diffusion's variables
    (``space="sigma"``): same latents, same number of model calls."""
    unet = pipe.unet

    def run(s, n=10):
        s.set_timesteps(n)
        x = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * s.init_noise_sigma
        calls = 0
        for t in s.timesteps:
            with torch.no_grad():
                out = unet(s.scale_model_input(x, t), t).sample
            calls += 1
            x = s.step(out, t, x).prev_sample
        return x, calls

    ref = ref_cls.from_config(pipe.scheduler.config)
    a, ca = run(ref)
    b, cb = run(DiffsolveScheduler.from_config(ref, solver=solver, solver_options={"space": "sigma"}))
    rel = float((a - b).abs().max() / a.abs().max())
    print(solver, "relative difference to", ref_cls.__name__, rel, "calls", ca, cb)
    assert rel < 1e-4 and ca == cb


def test_every_fixed_grid_solver_runs_in_the_pipeline(pipe):
    base = pipe.scheduler
    counted = _Count(pipe.unet)
    unet, pipe.unet = pipe.unet, counted
    try:
        infos = [i for i in ds.list_solvers() if i.fixed_grid and i.family != "mcmc"]
        for info in infos:
            # the reversible solvers cannot end at sigma = 0 (x / sigma): they move the end themselves
            name, final = info.name, None if info.family == "reversible" else "zero"
            s = DiffsolveScheduler.from_config(base, solver=name, seed=0, final=final)
            counted.calls = 0
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                img = _images(pipe, s, n=4, batch=2)
            assert np.isfinite(img).all(), name
            assert counted.calls == len(s.timesteps), (name, counted.calls, len(s.timesteps))
    finally:
        pipe.unet, pipe.scheduler = unet, base


def test_adaptive_solvers_are_refused_with_a_pointer():
    with pytest.raises(ValueError, match="sample_pipeline"):
        DiffsolveScheduler(solver="adaptive-sde")


def test_two_threads_get_the_images_of_two_calls_in_a_row(pipe):
    base = pipe.scheduler
    pipe.scheduler = DiffsolveScheduler.from_config(base, solver="dpmpp-2m-sde")
    try:
        seq = [
            pipe(
                batch_size=2, generator=torch.Generator().manual_seed(s), num_inference_steps=8, output_type="np"
            ).images
            for s in (1, 2)
        ]
        out = {}

        def work(s):
            out[s] = pipe(
                batch_size=2, generator=torch.Generator().manual_seed(s), num_inference_steps=8, output_type="np"
            ).images

        threads = [threading.Thread(target=work, args=(s,)) for s in (1, 2)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert np.array_equal(out[1], seq[0]) and np.array_equal(out[2], seq[1])
    finally:
        pipe.scheduler = base


def test_save_and_load_keep_the_solver_and_its_options(tmp_path, pipe):
    s = DiffsolveScheduler.from_config(pipe.scheduler, solver="heun", solver_options={"s_churn": 1.0}, seed=3)
    s.save_pretrained(tmp_path)
    t = DiffsolveScheduler.from_pretrained(tmp_path)
    assert t.solver.name == "heun" and t.solver.s_churn == 1.0 and t.config.seed == 3
    assert t.config.source == "DDPMScheduler"


@pytest.mark.parametrize(
    "solver,opts", [("adaptive-sde", {"eps_rel": 0.2, "t_min": 1e-3}), ("dmcmc", {"t_min": 1e-3}), ("edict", {})]
)
def test_driver_mode_in_the_ddpm_pipeline(pipe, solver, opts):
    from diffsolve.integrations.diffusers import sample_pipeline

    counted = _Count(pipe.unet)
    unet, pipe.unet = pipe.unet, counted
    try:
        out = sample_pipeline(
            pipe,
            solver,
            num_inference_steps=5,
            num_images_per_prompt=2,
            generator=torch.Generator().manual_seed(0),
            output_type="np",
            **opts,
        )
    finally:
        pipe.unet = unet
    assert out.images.shape == (2, 16, 16, 1) and np.isfinite(out.images).all()
    assert counted.calls == out.result.nfe
