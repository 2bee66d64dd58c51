"""Edges of the public API (issue 18, points 6, 7 and 14): one dtype / device rule for every entry
point, results and latents saved to disk and loaded back, and clear errors for bad inputs."""

import json
import os

import numpy as np
import pytest
import torch
from test_dtype_device import TinyNet  # a one-layer eps network on 2-d points

import diffsolve as ds
from diffsolve.guidance import ClassifierFreeGuidance, Inpaint

os.environ.setdefault("HF_HUB_OFFLINE", "1")

VP = ds.schedules.VPLinear()
GMM = ds.models.GaussianMixture.gmm_2d()
ORACLE = GMM.model(VP)
DIGIT = (1, 16, 16)


@pytest.fixture(scope="module")
def digits():
    """digits-vp in float32, shared by the tests that do not convert it."""
    return ds.pretrained.load("digits-vp")


# ------------------------------------------------------------------ 6: dtype and device, one rule
def test_pretrained_load_takes_dtype_names():
    """Once refused ("dtype 'float64' is not supported"): a name loads the network in that dtype, and
    runs follow it without being told again."""
    model = ds.pretrained.load("digits-vp", dtype="float64")
    assert model.dtype == torch.float64
    assert ds.sample(model, "ddim", 2, shape=(1, *DIGIT), seed=0).samples.dtype == torch.float64
    lat = ds.invert(model, "rev-heun", torch.zeros(1, *DIGIT, dtype=torch.float64), 2)
    assert lat.dtype == torch.float64
    for bad in ("double", "float8", torch.int64):
        with pytest.raises(ValueError, match=r"dtype .* is not supported; allowed: float32, float64"):
            ds.pretrained.load("digits-vp", dtype=bad)


def test_model_to_converts_the_network():
    """DiffusionModel.to(device, dtype), as nn.Module.to: in place, returning the model; a pretrained
    model (its network a module over the UNet), a guidance wrapper and an oracle all convert."""
    model = ds.pretrained.load("digits-vp")
    with pytest.raises(ValueError, match=r"model\.to\(dtype=torch\.float64\)"):
        ds.sample(model, "ddim", 2, shape=(1, *DIGIT), seed=0, dtype="float64")
    assert model.to(dtype="float64") is model and model.dtype == torch.float64
    x_T = torch.randn(2, *DIGIT, generator=torch.Generator().manual_seed(0))
    a = ds.sample(model, "ddim", 2, shape=(2, *DIGIT), seed=0)
    assert a.samples.dtype == torch.float64
    a = ds.sample(model, "ddim", 2, x_T=x_T.double()).samples
    assert model.to("cpu", torch.float32).dtype == torch.float32
    b = ds.sample(model, "ddim", 2, x_T=x_T).samples
    assert b.dtype == torch.float32 and float((a.float() - b).abs().max()) < 1e-3

    cfg = ClassifierFreeGuidance(ds.DiffusionModel(TinyNet(), VP, "eps"), 2.0, uncond={})
    assert cfg.to(dtype=torch.float64) is cfg and cfg.inner.dtype == torch.float64 == cfg.dtype
    oracle = GMM.model(VP).to(dtype="float64")  # an analytic net computes in its input's dtype
    assert ds.sample(oracle, "ddim", 2, shape=(2, 2), seed=0).samples.dtype == torch.float64
    declared = ds.DiffusionModel(lambda x, t: torch.zeros_like(x), VP, "eps", dtype=torch.float64)
    with pytest.raises(TypeError, match=r"dtype: the network .* plain callable"):
        declared.to(dtype=torch.float32)


def test_the_run_device_must_be_the_networks():
    """A run on another device than the network is refused naming device (before: a raw error from
    inside the network); an explicit device converts x_T."""
    model = ds.DiffusionModel(TinyNet(), VP, "eps")
    with pytest.raises(
        ValueError, match=r"device: the run's device is meta \(x_T's device\) but the network is on cpu"
    ):
        ds.sample(model, "ddim", 2, x_T=torch.zeros(2, 2, device="meta"))
    with pytest.raises(ValueError, match=r"device: .*model\.to\('meta'\)"):
        ds.sample(model, "ddim", 2, shape=(2, 2), seed=0, device="meta")
    with pytest.raises(ValueError, match=r"device: .*\(x0's device\)"):
        ds.invert(model, "ddim", torch.zeros(2, 2, device="meta"), 2)
    with pytest.raises(ValueError, match="device 'gpu0' is not a torch device"):
        ds.sample(model, "ddim", 2, shape=(2, 2), device="gpu0")
    res = ds.sample(model, "ddim", 2, x_T=torch.zeros(2, 2), device="cpu")
    assert res.samples.device.type == "cpu"


# ------------------------------------------------------------------ 7: save and load
def test_reversible_latent_round_trip_through_files(digits, tmp_path):
    """invert (edict with its mixing p set), save, load, sample back: the same samples as from the
    latent in memory, the data to round-off, and the options (p) come back with the latent."""
    model = digits
    x0 = torch.rand(2, *DIGIT, generator=torch.Generator().manual_seed(0)) * 2 - 1
    lat = ds.invert(model, "edict", x0, 3, p=0.9)
    folder = lat.save(tmp_path / "lat", manifest={"model": "digits-vp"})
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["solver"] == "edict" and manifest["options"]["p"] == 0.9 and manifest["model"] == "digits-vp"
    back = ds.Latent.load(folder / "latent.safetensors")
    assert back.options == lat.options and back.dtype == lat.dtype and back.nfe == lat.nfe
    assert torch.equal(back.x, lat.x) and torch.equal(back.aux, lat.aux) and torch.equal(back.grid, lat.grid)
    a = ds.sample(model, "edict", latent=lat).samples
    b = ds.sample(model, back.solver, latent=back).samples
    assert torch.equal(a, b)
    assert float((b - x0).abs().max()) < 1e-4


def test_latent_with_object_options_and_the_cli_reader(tmp_path):
    """A ReNoise option is saved as its class and init arguments and rebuilt; the file stays readable
    by `diffsolve sample --latent`; an option that cannot be saved is refused, naming it."""
    from diffsolve.cli import load_latent

    renoise = ds.samplers.ReNoise(steps=2, average=(0, 2), first_steps=1, first_average=(0, 1))
    lat = ds.invert(ORACLE, "ddim", torch.randn(3, 2, generator=torch.Generator().manual_seed(0)), 4, renoise=renoise)
    back = ds.Latent.load(lat.save(tmp_path / "lat"))
    assert back.options["renoise"] == renoise and back.options["eta"] == 0.0
    assert torch.equal(ds.sample(ORACLE, "ddim", latent=back).samples, ds.sample(ORACLE, "ddim", latent=lat).samples)
    read = load_latent(str(tmp_path / "lat"))[0]  # (latent, manifest, file)
    assert torch.equal(read.x, lat.x) and read.options["renoise"] == renoise and read.dtype == lat.dtype
    bad = ds.Latent(lat.x, None, lat.grid, "ddim", {"renoise": object()})
    with pytest.raises(TypeError, match=r"options.renoise: a object cannot be saved"):
        bad.save(tmp_path / "bad")


def test_sample_result_round_trip(tmp_path):
    """A SampleResult with a StepSizeController option, per-sample counts, stats and a trajectory."""
    ctrl = ds.samplers.StepSizeController.pid(2, 0.1, 0.3, factor_max=10.0)
    res = ds.sample(ORACLE, "adaptive-sde", shape=(3, 2), seed=0, eps_rel=0.2, controller=ctrl, return_trajectory=True)
    res.stats["note"] = {"inf": float("inf"), "pair": (1, 2)}
    back = ds.SampleResult.load(res.save(tmp_path / "res"))
    assert back.options == res.options and back.options["controller"] == ctrl
    for name in ("samples", "nfe_per_sample", "grid", "accepted", "rejected"):
        assert torch.equal(getattr(back, name), getattr(res, name)), name
    assert (back.nfe, back.seeds, back.solver, back.wall_time) == (res.nfe, res.seeds, res.solver, res.wall_time)
    assert back.stats == {"note": {"inf": float("inf"), "pair": (1, 2)}}
    assert len(back.trajectory) == len(res.trajectory)
    assert all(torch.equal(x, y) for (_, x), (_, y) in zip(back.trajectory, res.trajectory))
    with pytest.raises(ValueError, match="holds a SampleResult, not a Latent"):
        ds.Latent.load(tmp_path / "res")
    with pytest.raises(FileNotFoundError, match="holds no saved SampleResult"):
        ds.SampleResult.load(tmp_path / "nothing")
    with pytest.raises(ValueError, match=r"manifest: the entries \['solver'\]"):
        res.save(tmp_path / "x", manifest={"solver": "mine"})


# ------------------------------------------------------------------ 14: bad inputs, clear errors
def test_numpy_states_and_seeds():
    x = np.random.default_rng(0).standard_normal((3, 2))  # float64: converted to the run's dtype
    a = ds.sample(ORACLE, "ddim", 3, x_T=x)
    b = ds.sample(ORACLE, "ddim", 3, x_T=torch.as_tensor(x, dtype=torch.float32))
    assert a.samples.dtype == torch.float32 and torch.equal(a.samples, b.samples)
    lat = ds.invert(ORACLE, "ddim", x, 3)
    assert lat.x.dtype == torch.float32
    seeded = ds.sample(ORACLE, "ddpm", 3, shape=(2, 2), seed=np.int64(5)).samples
    assert torch.equal(seeded, ds.sample(ORACLE, "ddpm", 3, shape=(2, 2), seed=np.array([5, 6])).samples)
    for bad in (1.5, np.float64(3.0), [1.0, 2.0]):
        with pytest.raises(TypeError, match=r"seed must be an int >= 0 .* floats such as 3.0 are refused"):
            ds.sample(ORACLE, "ddpm", 3, shape=(2, 2), seed=bad)
    with pytest.raises(TypeError, match=r"x_T must be a torch.Tensor or a numpy array"):
        ds.sample(ORACLE, "ddim", 3, x_T=[[0.0, 0.0]])


def test_grid_times_outside_the_schedule(digits):
    """Once accepted (samples in +-640): times above the schedule's t_max; diffusers timesteps get a hint."""
    with pytest.raises(ValueError, match=r"grid: t=640 is outside the times of VPLinear.*\[0, 1\]$"):
        ds.sample(ORACLE, "ddim", shape=(2, 2), grid=[640.0, 0.5, 0.001])
    with pytest.raises(ValueError, match=r"grid: t=999 .* look like diffusers timesteps.*DiffsolveScheduler"):
        ds.sample(ORACLE, "ddim", shape=(2, 2), grid=[999, 749, 499, 249, 0])
    with pytest.raises(ValueError, match=r"schedule\.t_of_timestep\(timesteps\)"):
        ds.sample(digits, "ddim", shape=(1, *DIGIT), grid=[999, 499, 0])
    with pytest.raises(ValueError, match="t_max: t=2 is outside"):
        ds.sample(ORACLE, "ddim", 3, shape=(2, 2), t_max=2.0)
    t = digits.schedule.t_of_timestep(torch.tensor([999.0, 499.0])).tolist() + [0.0]  # the hint's conversion
    assert ds.sample(digits, "ddim", shape=(1, *DIGIT), grid=t, seed=0).nfe == 2


def test_a_shape_the_network_cannot_take(digits):
    with pytest.raises(
        ValueError,
        match=r"shape: the network failed on its first call, for states of shape "
        r"\(2, 3, 16, 16\)",
    ) as info:
        ds.sample(digits, "ddim", 2, shape=(2, 3, 16, 16), seed=0)
    assert isinstance(info.value.__cause__, RuntimeError)
    with pytest.raises(ValueError, match="shape: the network failed"):
        ds.invert(digits, "ddim", torch.zeros(2, 1, 15, 15), 2)


def test_missing_conditioning_is_named_before_sampling():
    mr = ds.pretrained.load("digits-mr")
    assert mr.requires == ("mu",)
    with pytest.raises(ValueError, match=r"mu: the network \(UNet2DModel\[digits-mr\]\) needs mu="):
        ds.sample(mr, "ddim", 2, shape=(1, *DIGIT), seed=0)
    with pytest.raises(ValueError, match="mu: "):
        ds.invert(mr, "ddim", torch.zeros(1, *DIGIT), 2)
    cond = ds.pretrained.load("digits-vp-cond")
    with pytest.raises(ValueError, match=r"cond: .* needs cond=\{'class_labels': \.\.\.\}"):
        ds.sample(cond, "ddim", 2, shape=(1, *DIGIT), seed=0)
    cfg = ClassifierFreeGuidance(cond, 2.0, uncond={"class_labels": torch.tensor(10)})
    with pytest.raises(ValueError, match=r"cond: .*class_labels"):
        ds.sample(cfg, "ddim", 2, shape=(1, *DIGIT), seed=0)
    with pytest.raises(ValueError, match=r"uncond: .*class_labels"):
        ClassifierFreeGuidance(cond, 2.0, uncond={})
    with pytest.raises(ValueError, match=r"uncond: .*class_labels"):
        ds.sample(cfg, "ddim", 2, shape=(1, *DIGIT), seed=0, cond={"class_labels": 3}, uncond={})
    res = ds.sample(cfg, "ddim", 2, shape=(2, *DIGIT), seed=0, cond={"class_labels": torch.tensor([3, 4])})
    assert res.nfe == 4


def test_inpaint_batch_mismatch_is_named(digits):
    ones, zeros = torch.ones(3, *DIGIT), torch.zeros(3, *DIGIT)
    with pytest.raises(ValueError, match="Inpaint mask has batch size 3, but the run has 2 samples"):
        ds.sample(digits, "ddim", 2, shape=(2, *DIGIT), seed=0, hooks=[Inpaint(ones, zeros[:1])])
    with pytest.raises(ValueError, match="Inpaint y has batch size 3"):
        ds.sample(digits, "ddim", 2, shape=(2, *DIGIT), seed=0, hooks=[Inpaint(ones[:1], zeros)])
    with pytest.raises(ValueError, match=r"Inpaint mask of shape \(1, 1, 8, 8\) does not broadcast"):
        ds.sample(digits, "ddim", 2, shape=(2, *DIGIT), seed=0, hooks=Inpaint(torch.ones(1, 1, 8, 8), zeros[:1]))


def test_invert_pipeline_takes_a_list_of_images():
    """A list of images is one batch (before: "only one element tensors can be converted")."""
    from diffusers import DDPMPipeline

    from diffsolve.integrations.diffusers import invert_pipeline

    pipe = DDPMPipeline.from_pretrained(ds.pretrained.path_of("digits-vp"))
    pipe.set_progress_bar_config(disable=True)
    images = [torch.rand(*DIGIT) * 2 - 1, torch.rand(1, *DIGIT) * 2 - 1]
    lat = invert_pipeline(pipe, images, "ddim", num_inference_steps=2)
    ref = invert_pipeline(pipe, torch.cat([images[0][None], images[1]]), "ddim", num_inference_steps=2)
    assert lat.x.shape == (2, *DIGIT) and torch.equal(lat.x, ref.x)
    with pytest.raises(ValueError, match="prompt: 3 prompts for 2 images"):
        invert_pipeline(pipe, images, "ddim", ["a", "b", "c"], num_inference_steps=2)
    with pytest.raises(ValueError, match="image: a list of images must hold"):
        invert_pipeline(pipe, [torch.zeros(*DIGIT), torch.zeros(1, 8, 8)], "ddim", num_inference_steps=2)
