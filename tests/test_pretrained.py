"""The shipped digit models and the offline sample-quality metric."""

import os

import pytest
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
