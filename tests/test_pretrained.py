"""The shipped digit models and the offline sample-quality metric."""

import os

import torch

import diffsolve as ds
from diffsolve.data import digits16
from diffsolve.quality import evaluate

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def test_metric_separates_real_digits_from_noise():
    held, labels = digits16("heldout")
    train, _ = digits16("train")
    clf = ds.quality.load_classifier()
    with torch.no_grad():
        acc = float((clf(held).argmax(1) == labels).float().mean())
    assert acc > 0.97, acc
    floor = evaluate(train[:300])
    noise = evaluate(torch.rand(300, 1, 16, 16) * 2 - 1)
    blur = evaluate(torch.nn.functional.avg_pool2d(train[:300], 3, 1, 1))
    print("digits-FD floor", floor["digits_fd"], "blurred", blur["digits_fd"], "noise", noise["digits_fd"])
    assert evaluate(held)["digits_fd"] < 1e-6  # the reference against itself
    assert floor["confidence"] > 0.95
    assert noise["digits_fd"] > 10 * floor["digits_fd"]
    assert floor["digits_fd"] < blur["digits_fd"] < noise["digits_fd"]


def test_ddpm_pipeline_loads_shipped_digits_vp_offline():
    from diffusers import DDPMPipeline

    pipe = DDPMPipeline.from_pretrained(ds.pretrained.path_of("digits-vp"), local_files_only=True)
    out = pipe(batch_size=2, num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="np")
    assert out.images.shape == (2, 16, 16, 1)


def test_digits_vp_samples_are_digits():
    model = ds.pretrained.load("digits-vp")
    res = ds.sample(model, "heun", 15, shape=(32, 1, 16, 16), seed=0)
    assert res.nfe == 30
    q = evaluate(res.samples)
    print("digits-vp heun 15 steps:", q)
    assert q["confidence"] > 0.85
    assert len([c for c in q["class_histogram"] if c > 0]) >= 6  # not collapsed onto a few classes


def test_digits_flow_samples_are_digits():
    model = ds.pretrained.load("digits-flow")
    assert model.prediction == "velocity" and isinstance(model.schedule, ds.schedules.RectifiedFlow)
    res = ds.sample(model, "heun", 10, shape=(32, 1, 16, 16), seed=0)
    q = evaluate(res.samples)
    print("digits-flow heun 10 steps:", q)
    assert q["confidence"] > 0.85


def test_digits_mr_restores_better_than_the_degraded_input():
    from diffsolve.data import degrade

    card = ds.pretrained.card("digits-mr")
    model = ds.pretrained.load("digits-mr")
    clean = digits16("heldout")[0][:32]
    mu = degrade(clean, card["degradation"], torch.Generator().manual_seed(0))
    res = ds.sample(model, "euler-maruyama", 50, shape=clean.shape, seed=0, mu=mu)

    def psnr(x):
        return float((10 * torch.log10(4.0 / ((x.clamp(-1, 1) - clean) ** 2).flatten(1).mean(1))).mean())

    print("digits-mr PSNR restored", psnr(res.samples), "degraded", psnr(mu))
    assert psnr(res.samples) > psnr(mu) + 2.0


def test_cards_describe_the_models():
    for name in ds.pretrained.SHIPPED:
        c = ds.pretrained.card(name)
        assert {"schedule", "prediction", "seed", "iters", "optimizer", "time_input"} <= set(c), name
    total = sum(f.stat().st_size for f in ds.pretrained.WEIGHTS.rglob("*") if f.is_file())
    assert total < 20 * 2**20, f"shipped weights are {total / 2**20:.1f} MB"


def test_noise_level_classifier_recovers_the_level():
    clf, times = ds.pretrained.load_noise_classifier()
    sched = ds.pretrained.schedule_from_card(ds.pretrained.card("digits-sigma")["schedule"])
    x0 = digits16("heldout")[0]
    g = torch.Generator().manual_seed(0)
    k = torch.randint(0, len(times), (len(x0),), generator=g)
    a = sched.alpha(times[k]).float()[:, None, None, None]
    s = sched.sigma(times[k]).float()[:, None, None, None]
    xt = a * x0 + s * torch.randn(x0.shape, generator=g)
    with torch.no_grad():
        err = (clf(xt).argmax(1) - k).abs().float().mean()
    print("digits-sigma mean |class error|", float(err), "of", len(times))
    assert err < 10 and times[0] > times[-1]


def test_training_script_is_deterministic(tmp_path):
    """Two short runs of scripts/train_digits.py with the same seed write identical weights."""
    import hashlib
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "train_digits.py"
    digests = []
    for run in ("a", "b"):
        out = tmp_path / run
        r = subprocess.run(
            [sys.executable, str(script), "--model", "digits-mr", "--iters", "2", "--out", str(out)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert r.returncode == 0, r.stderr[-2000:]
        digests.append(
            hashlib.sha256(
                (out / "digits-mr" / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
            ).hexdigest()
        )
    assert digests[0] == digests[1]
