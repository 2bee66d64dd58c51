"""A tiny Stable Diffusion pipeline built offline (random weights, a tokenizer made here): scheduler
parity, driver mode for every kind of solver, and exact inversion with CFG."""

import json
import string

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
from diffusers import (AutoencoderKL, DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler,  # noqa: E402
                       HeunDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer  # noqa: E402

import diffsolve as ds  # noqa: E402
from diffsolve.integrations.diffusers import (DiffsolveScheduler, invert_pipeline, sample_pipeline)  # noqa: E402


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("tok")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in string.ascii_lowercase:
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    (d / "vocab.json").write_text(json.dumps(vocab))
    (d / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(d / "vocab.json"), str(d / "merges.txt"), model_max_length=8)
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32,
                                                num_attention_heads=2, num_hidden_layers=1, max_position_embeddings=8,
                                                bos_token_id=0, eos_token_id=1, pad_token_id=1)).eval()
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                                attention_head_dim=2, norm_num_groups=8).eval()
    # A random UNet's eps field is far rougher than a trained one's: it amplifies float32 round-off in
    # the reversible round trip to 3e-4 (edict) .. 6e-4 (rex), against 1e-12 in float64. Damping its
    # output by 10 brings the field to a trained model's smoothness (round trip ~5e-6).
    with torch.no_grad():
        unet.conv_out.weight.mul_(0.1)
        unet.conv_out.bias.mul_(0.1)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=8, sample_size=16).eval()
    sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=sched, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


class _Counter:
    def __init__(self, unet):
        self.unet, self.calls = unet, 0
        self._forward = unet.forward

    def __enter__(self):
        def forward(*a, **k):
            self.calls += 1
            return self._forward(*a, **k)
        self.unet.forward = forward
        return self

    def __exit__(self, *exc):
        self.unet.forward = self._forward


def _latents(pipe, scheduler, n=8, cfg=3.0):
    pipe.scheduler = scheduler
    with _Counter(pipe.unet) as c:
        out = pipe("a cat", num_inference_steps=n, guidance_scale=cfg, generator=torch.Generator().manual_seed(0),
                   output_type="latent").images
    return out, c.calls


@pytest.mark.parametrize("ref_cls,solver,opts", [(DDIMScheduler, "ddim", {}), (EulerDiscreteScheduler, "euler", {"space": "sigma"}),
                                                 (HeunDiscreteScheduler, "heun", {"space": "sigma"}),
                                                 (DPMSolverMultistepScheduler, "dpmpp-2m", {})])
def test_scheduler_parity_inside_stable_diffusion(sd, ref_cls, solver, opts):
    base = sd.scheduler
    ref = ref_cls.from_config(base.config)
    a, ca = _latents(sd, ref)
    b, cb = _latents(sd, DiffsolveScheduler.from_config(ref, solver=solver, solver_options=opts))
    sd.scheduler = base
    rel = float((a - b).abs().max() / a.abs().max())
    print(solver, "relative difference to", ref_cls.__name__, rel, "UNet calls", ca, cb)
    assert rel < 1e-4 and ca == cb


@pytest.mark.parametrize("solver,opts", [("adaptive-sde", {"eps_rel": 0.1}), ("rev-heun", {}), ("ode-dopri5", {"rtol": 1e-2}),
                                         ("dmcmc", {"integrator_steps": 3})])
def test_driver_mode_runs_any_solver_and_counts_unet_calls(sd, solver, opts):
    with _Counter(sd.unet) as c:
        out = sample_pipeline(sd, solver, "a cat", num_inference_steps=6, guidance_scale=2.0,
                              generator=torch.Generator().manual_seed(0), output_type="np", **opts)
    assert np.isfinite(out.images).all() and out.images.shape[-1] == 3
    assert c.calls == out.result.nfe, (c.calls, out.result.nfe)


@pytest.mark.parametrize("solver", ["rex", "edict"])
def test_exact_inversion_round_trip_with_cfg(sd, solver):
    torch.manual_seed(1)
    image = torch.rand(1, 3, 16, 16) * 2 - 1
    lat = invert_pipeline(sd, image, solver, "a cat", num_inference_steps=50, guidance_scale=3.0)
    assert lat.aux is not None and lat.nfe > 100  # both states; CFG: two UNet calls per model call
    with torch.no_grad():
        x0 = sd.vae.encode(sd.image_processor.preprocess(image)).latent_dist.mean * sd.vae.config.scaling_factor
    back = sample_pipeline(sd, solver, "a cat", guidance_scale=3.0, latent=lat, output_type="latent").latents
    err = float((back - x0).abs().max())
    print(solver, "round trip max error (float32, 50 steps, CFG 3)", err, "latent scale", float(x0.abs().max()))
    assert err < 1e-5
