"""Precision and device of a run: torch's defaults, the network's dtype, and half precision."""

import json
import os

import pytest
import torch

import diffsolve as ds
from diffsolve.core.driver import state_dtype
from diffsolve.core.registry import registered
from diffsolve.samplers import ExactNoiseLevel

os.environ.setdefault("HF_HUB_OFFLINE", "1")

VP = ds.schedules.VPLinear()
GMM = ds.models.GaussianMixture.gmm_2d()


@pytest.fixture
def float64_default():
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


class TinyNet(torch.nn.Module):
    """A one-layer eps network on 2-d points (its dtype is its parameters')."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 2)

    def forward(self, x, t):
        return 0.1 * self.lin(torch.cat([x, t[:, None].to(x.dtype) / 1000], dim=1))


def _options(name: str, oracle: bool) -> dict:
    # dmcmc's default estimator is the model's own denoiser; on the oracle use its exact one
    return {"estimator": ExactNoiseLevel(GMM), "levels": 100} if name == "dmcmc" and oracle else {}


@pytest.mark.parametrize("name", [i.name for i in registered()])
def test_every_solver_samples_in_the_default_dtype(float64_default, name):
    """Without dtype= and x_T, a run is in torch's default dtype: float64 samples from the oracle and
    from a float64 network (before, float32 samples, and a dtype clash inside the network)."""
    torch.manual_seed(0)
    tiny = ds.DiffusionModel(TinyNet(), VP, "eps")
    assert tiny.dtype == torch.float64
    for model, oracle in ((GMM.model(VP), True), (tiny, False)):
        res = ds.sample(model, name, 4, shape=(6, 2), seed=0, progress=False, **_options(name, oracle))
        assert res.samples.dtype == torch.float64, (name, oracle)
        assert res.samples.device == torch.get_default_device()
        assert bool(torch.isfinite(res.samples).all())


def test_explicit_dtype_beats_the_default(float64_default):
    res = ds.sample(GMM.model(VP), "dpmpp-2m", 5, shape=(4, 2), seed=0, dtype=torch.float32)
    assert res.samples.dtype == torch.float32
    res = ds.sample(GMM.model(VP), "dpmpp-2m", 5, x_T=torch.zeros(4, 2, dtype=torch.float32))
    assert res.samples.dtype == torch.float32


def test_invert_follows_the_data_dtype(float64_default):
    x0 = torch.randn(4, 2, dtype=torch.float32)
    lat = ds.invert(GMM.model(VP), "ddim", x0, 5)
    assert lat.dtype == torch.float32
    back = ds.sample(GMM.model(VP), "ddim", latent=lat)
    assert back.samples.dtype == torch.float32


def test_the_network_dtype_is_the_default_and_must_agree():
    net = TinyNet().double()
    model = ds.DiffusionModel(net, VP, "eps")
    assert ds.sample(model, "ddim", 4, shape=(3, 2), seed=0).samples.dtype == torch.float64  # the network's
    with pytest.raises(ValueError, match=r"dtype.*torch.float32.*network's weights are torch.float64"):
        ds.sample(model, "ddim", 4, shape=(3, 2), seed=0, dtype="float32")
    with pytest.raises(ValueError, match="x_T's dtype"):
        ds.sample(model, "ddim", 4, x_T=torch.zeros(3, 2))
    with pytest.raises(ValueError, match="x0's dtype"):
        ds.invert(model, "ddim", torch.zeros(3, 2), 4)
    net.float()  # a module's dtype is read when the run starts
    assert ds.sample(model, "ddim", 4, shape=(3, 2), seed=0).samples.dtype == torch.float32
    cfg = ds.guidance.ClassifierFreeGuidance(model, 2.0, uncond={})
    assert cfg.dtype == torch.float32  # a wrapper has its network's dtype
    with pytest.raises(ValueError, match="dtype"):
        ds.sample(cfg, "ddim", 4, shape=(3, 2), seed=0, dtype=torch.float64)


def test_declared_network_dtype_and_unsupported_dtypes():
    model = ds.DiffusionModel(lambda x, t: torch.zeros_like(x), VP, "eps", dtype=torch.float64)
    assert ds.sample(model, "ddim", 3, shape=(2, 2), seed=0).samples.dtype == torch.float64
    with pytest.raises(TypeError, match="dtype"):
        ds.DiffusionModel(lambda x, t: x, VP, "eps", dtype="float64")
    for bad in (torch.int32, torch.complex64, "float8", 3):
        with pytest.raises(ValueError, match="dtype"):
            ds.sample(GMM.model(VP), "ddim", 3, shape=(2, 2), seed=0, dtype=bad)
    with pytest.raises(ValueError, match="x0's dtype"):
        ds.invert(GMM.model(VP), "ddim", torch.zeros(2, 2, dtype=torch.long), 3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["dpmpp-2m", "heun", "adaptive-sde", "rev-heun", "dmcmc"])
def test_half_precision_network_float32_solver(dtype, name):
    """A half run: the network sees its dtype, the solver's state is float32, samples come back in dtype."""
    seen = []

    class Spy(TinyNet):
        def forward(self, x, t):
            seen.append(x.dtype)
            return super().forward(x, t)

    torch.manual_seed(0)
    model = ds.DiffusionModel(Spy().to(dtype), VP, "eps")
    assert state_dtype(dtype) == torch.float32
    res = ds.sample(model, name, 4, shape=(6, 2), seed=0, return_trajectory=True)
    assert res.samples.dtype == dtype and bool(torch.isfinite(res.samples).all())
    assert set(seen) == {dtype}
    assert {x.dtype for _, x in res.trajectory} <= {torch.float32, torch.float64}


def test_half_run_starts_from_the_float32_noise():
    """Same seeds: a bfloat16 run starts from the float32 run's x_T (the noise is drawn in float32)."""
    oracle = GMM.model(VP)
    a = ds.sample(oracle, "ddim", 1, shape=(5, 2), seed=3, return_trajectory=True)
    b = ds.sample(oracle, "ddim", 1, shape=(5, 2), seed=3, dtype="bfloat16", return_trajectory=True)
    assert torch.equal(a.trajectory[0][1], b.trajectory[0][1])
    assert b.samples.dtype == torch.bfloat16


def test_pretrained_follows_the_default_dtype(float64_default):
    model = ds.pretrained.load("digits-vp")
    assert model.dtype == torch.float64 and model.device == torch.device("cpu")
    res = ds.sample(model, "dpmpp-2m", 3, shape=(2, 1, 16, 16), seed=0)
    assert res.samples.dtype == torch.float64


def test_pretrained_bfloat16_samples_are_close_to_float32():
    """digits-vp in bfloat16 (network) with float32 solver arithmetic, dpmpp-2m 20 steps, 16 samples
    from the same seeds as float32: each sample is close to its float32 twin (measured: per-sample RMS
    difference 0.004-0.012, max 0.06; a wrong cast or a broken network gives O(0.1-1))."""
    m32 = ds.pretrained.load("digits-vp", dtype=torch.float32)
    mbf = ds.pretrained.load("digits-vp", dtype=torch.bfloat16)
    assert mbf.dtype == torch.bfloat16
    with pytest.raises(ValueError, match=r"dtype=torch.bfloat16"):
        ds.sample(m32, "dpmpp-2m", 20, shape=(2, 1, 16, 16), seed=0, dtype=torch.bfloat16)
    a = ds.sample(m32, "dpmpp-2m", 20, shape=(16, 1, 16, 16), seed=0).samples
    b = ds.sample(mbf, "dpmpp-2m", 20, shape=(16, 1, 16, 16), seed=0).samples
    assert b.dtype == torch.bfloat16 and bool(torch.isfinite(b).all())
    diff = (b.float() - a).flatten(1)
    rms = diff.pow(2).mean(1).sqrt()
    print("bf16 vs fp32 per-sample RMS", rms.tolist(), "max", float(diff.abs().max()))
    assert float(rms.median()) < 0.012 and float(rms.max()) < 0.03
    assert float(diff.abs().max()) < 0.15


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_cli_samples_and_inverts_in_half_precision(tmp_path, dtype):
    """`diffsolve sample --dtype bfloat16|float16` (once refused by the parser): the UNet in that
    dtype, samples saved in it; `diffsolve invert` takes it too."""
    from safetensors.torch import load_file

    from diffsolve import cli

    out, lat = tmp_path / "s", tmp_path / "lat"
    assert (
        cli.main(["sample", "--out", str(out), "--no-progress", "--num-samples", "4", "--steps", "4", "--dtype", dtype])
        == 0
    )
    samples = load_file(str(out / "samples.safetensors"))["samples"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert samples.dtype == getattr(torch, dtype) and manifest["dtype"] == dtype
    assert samples.shape == (4, 1, 16, 16) and bool(torch.isfinite(samples).all())
    assert (
        cli.main(
            [
                "invert",
                "--input",
                str(out),
                "--out",
                str(lat),
                "--steps",
                "4",
                "--solver",
                "ddim",
                "--dtype",
                dtype,
                "--no-progress",
            ]
        )
        == 0
    )
    assert (
        cli.main(
            [
                "sample",
                "--out",
                str(tmp_path / "gmm"),
                "--no-progress",
                "--model",
                "gmm-2d",
                "--num-samples",
                "4",
                "--steps",
                "4",
                "--dtype",
                dtype,
            ]
        )
        == 0
    )
    assert load_file(str(tmp_path / "gmm" / "samples.safetensors"))["samples"].dtype == getattr(torch, dtype)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_default_device_and_network_device():
    before = torch.get_default_device()
    torch.set_default_device("cuda")
    try:
        res = ds.sample(GMM.model(VP), "dpmpp-2m", 4, shape=(3, 2), seed=0)
        assert res.samples.device.type == "cuda"
    finally:
        torch.set_default_device(before)
    model = ds.pretrained.load("digits-vp", device="cuda")
    res = ds.sample(model, "dpmpp-2m", 4, shape=(2, 1, 16, 16), seed=0)  # on the network's device
    assert res.samples.device.type == "cuda"
