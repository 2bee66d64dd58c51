"""Tiny diffusers pipelines built offline from configs (random weights, tokenizers made here)."""

import json
import string
from pathlib import Path

import torch


def _clip_tokenizer(tmp: Path):
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in string.ascii_lowercase:
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    (tmp / "vocab.json").write_text(json.dumps(vocab))
    (tmp / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(tmp / "vocab.json"), str(tmp / "merges.txt"), model_max_length=8), len(vocab)


def _clip_config(vocab_size, hidden):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=32,
        num_attention_heads=2,
        num_hidden_layers=1,
        max_position_embeddings=8,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        projection_dim=hidden,
    )


def _vae(**extra):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=8,
        sample_size=16,
        **extra,
    ).eval()


def _damp(module):
    """A random network's field is far rougher than a trained one's; damping its output by 10 brings
    it nearer (it matters for float32 round trips of the reversible solvers: 6e-4 -> 8e-6 for rex)."""
    with torch.no_grad():
        for p in module.parameters():
            p.mul_(0.1)


def stable_diffusion(tmp: Path):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(**_sd_components(tmp))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def stable_diffusion_3(tmp: Path):
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(0)
    tokenizer, n = _clip_tokenizer(tmp)
    tr = SD3Transformer2DModel(
        sample_size=8,
        patch_size=1,
        in_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        caption_projection_dim=16,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        out_channels=4,
    ).eval()
    _damp(tr.proj_out)
    pipe = StableDiffusion3Pipeline(
        transformer=tr,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_vae(shift_factor=0.06, scaling_factor=1.5),
        text_encoder=CLIPTextModelWithProjection(_clip_config(n, 16)).eval(),
        tokenizer=tokenizer,
        text_encoder_2=CLIPTextModelWithProjection(_clip_config(n, 16)).eval(),
        tokenizer_2=tokenizer,
        text_encoder_3=None,
        tokenizer_3=None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def flux(tmp: Path):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    torch.manual_seed(0)
    tokenizer, n = _clip_tokenizer(tmp)
    tokenizer_2, t5 = _t5({"<pad>": 0, "</s>": 1, "<unk>": 2, "a": 3, "cat": 4, "dog": 5})
    tr = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=[4, 4, 8],
    ).eval()
    _damp(tr.proj_out)
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
    pipe = FluxPipeline(
        scheduler=sched,
        vae=_vae(shift_factor=0.06, scaling_factor=1.5, use_quant_conv=False, use_post_quant_conv=False),
        text_encoder=CLIPTextModel(_clip_config(n, 32)).eval(),
        tokenizer=tokenizer,
        text_encoder_2=t5,
        tokenizer_2=tokenizer_2,
        transformer=tr,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _sd_unet(in_channels=4, **extra):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=in_channels,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=2,
        norm_num_groups=8,
        **{"cross_attention_dim": 16, **extra},
    ).eval()
    _damp(unet.conv_out)
    return unet


def _sd_components(tmp: Path, in_channels=4):
    from diffusers import DDIMScheduler
    from transformers import CLIPTextModel

    torch.manual_seed(0)
    tokenizer, n = _clip_tokenizer(tmp)
    unet = _sd_unet(in_channels)
    sched = DDIMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return dict(
        vae=_vae(),
        text_encoder=CLIPTextModel(_clip_config(n, 16)).eval(),
        tokenizer=tokenizer,
        unet=unet,
        scheduler=sched,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def stable_diffusion_img2img(tmp: Path):
    """SD's img2img pipeline on the tiny SD components (the same weights as :func:`stable_diffusion`)."""
    from diffusers import StableDiffusionImg2ImgPipeline

    pipe = StableDiffusionImg2ImgPipeline(**_sd_components(tmp))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def stable_diffusion_inpaint(tmp: Path):
    """SD inpainting as users load it: a 9-channel UNet (latents, mask, masked-image latents)."""
    from diffusers import StableDiffusionInpaintPipeline

    pipe = StableDiffusionInpaintPipeline(**_sd_components(tmp, in_channels=9))
    pipe.set_progress_bar_config(disable=True)
    return pipe


# published scheduler configs (SDXL base, PixArt-Sigma, Playground v2.5), as their hubs hold them; the
# test module checks them against the shared fixtures when those are present
SCHEDULER_CONFIGS = {
    "sdxl_base": {
        "_class_name": "EulerDiscreteScheduler",
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "clip_sample": False,
        "interpolation_type": "linear",
        "num_train_timesteps": 1000,
        "prediction_type": "epsilon",
        "sample_max_value": 1.0,
        "set_alpha_to_one": False,
        "skip_prk_steps": True,
        "steps_offset": 1,
        "timestep_spacing": "leading",
        "trained_betas": None,
        "use_karras_sigmas": False,
    },
    "pixart_sigma": {
        "_class_name": "DPMSolverMultistepScheduler",
        "algorithm_type": "dpmsolver++",
        "beta_end": 0.02,
        "beta_schedule": "linear",
        "beta_start": 0.0001,
        "dynamic_thresholding_ratio": 0.995,
        "euler_at_final": False,
        "lambda_min_clipped": -float("inf"),
        "lower_order_final": True,
        "num_train_timesteps": 1000,
        "prediction_type": "epsilon",
        "sample_max_value": 1.0,
        "solver_order": 2,
        "solver_type": "midpoint",
        "steps_offset": 0,
        "thresholding": False,
        "timestep_spacing": "linspace",
        "trained_betas": None,
        "use_karras_sigmas": False,
        "use_lu_lambdas": False,
        "variance_type": None,
    },
    "playground_v25": {
        "_class_name": "EDMDPMSolverMultistepScheduler",
        "algorithm_type": "dpmsolver++",
        "dynamic_thresholding_ratio": 0.995,
        "euler_at_final": False,
        "final_sigmas_type": "zero",
        "lower_order_final": True,
        "num_train_timesteps": 1000,
        "prediction_type": "epsilon",
        "rho": 7.0,
        "sample_max_value": 1.0,
        "sigma_data": 0.5,
        "sigma_max": 80.0,
        "sigma_min": 0.002,
        "solver_order": 2,
        "solver_type": "midpoint",
        "thresholding": False,
    },
}


def _scheduler(name: str):
    import diffusers

    cfg = SCHEDULER_CONFIGS[name]
    return getattr(diffusers, cfg["_class_name"]).from_config(cfg)


def stable_diffusion_xl(tmp: Path, scheduler: str = "sdxl_base", **vae_extra):
    """SDXL: two CLIP text encoders (the second with a projection: pooled text embeddings), a UNet
    with added text-time conditioning (add_text_embeds, add_time_ids), SDXL base's scheduler config."""
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    tokenizer, n = _clip_tokenizer(tmp)
    te, te2 = CLIPTextModel(_clip_config(n, 16)).eval(), CLIPTextModelWithProjection(_clip_config(n, 16)).eval()
    time_dim = 4
    # cross attention sees both encoders' hidden states (16 + 16); the added embedding the pooled
    # projection (16) and the 6 time ids, each embedded in time_dim
    unet = _sd_unet(
        cross_attention_dim=32,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=6 * time_dim + te2.config.projection_dim,
        use_linear_projection=True,
    )
    pipe = StableDiffusionXLPipeline(
        vae=_vae(**vae_extra),
        text_encoder=te,
        text_encoder_2=te2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=_scheduler(scheduler),
        add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def stable_diffusion_xl_img2img(tmp: Path):
    """SDXL's img2img pipeline on the tiny SDXL components."""
    from diffusers import StableDiffusionXLImg2ImgPipeline

    pipe = StableDiffusionXLImg2ImgPipeline(**stable_diffusion_xl(tmp).components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def playground_v25(tmp: Path):
    """An EDM-style SDXL (Playground v2.5): EDMDPMSolverMultistepScheduler with the published config
    (EDM preconditioning, sigma_data 0.5; the UNet gets c_noise = log(sigma) / 4) and a VAE with
    latents_mean / latents_std."""
    return stable_diffusion_xl(
        tmp, "playground_v25", scaling_factor=0.5, latents_mean=(0.1, -0.2, 0.05, 0.0), latents_std=(0.9, 1.1, 1.0, 0.8)
    )


def _t5(words: dict, d_model: int = 32):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import T5Config, T5EncoderModel, T5TokenizerFast

    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = T5TokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=8
    )
    enc = T5EncoderModel(
        T5Config(vocab_size=len(words), d_model=d_model, d_kv=8, d_ff=32, num_layers=1, num_heads=4)
    ).eval()
    return tokenizer, enc


def pixart_sigma(tmp: Path):
    """PixArt-Sigma: a PixArtTransformer2DModel with learned sigma (out_channels = 2 in_channels; the
    pipeline keeps the first half), a tiny T5 encoder with a T5TokenizerFast made in code (a
    word-level tokenizers model: no sentencepiece file needed), PixArt-Sigma's DPM-Solver++ config."""
    from diffusers import PixArtSigmaPipeline, PixArtTransformer2DModel

    torch.manual_seed(0)
    tokenizer, t5 = _t5({"<pad>": 0, "</s>": 1, "<unk>": 2, "a": 3, "cat": 4, "dog": 5})
    tr = PixArtTransformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        out_channels=8,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        cross_attention_dim=16,
        caption_channels=32,
        norm_num_groups=8,
    ).eval()
    _damp(tr.proj_out)
    pipe = PixArtSigmaPipeline(
        tokenizer=tokenizer, text_encoder=t5, vae=_vae(), transformer=tr, scheduler=_scheduler("pixart_sigma")
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


class CountCalls:
    """Counts a module's forward calls while active."""

    def __init__(self, module):
        self.module, self.calls = module, 0
        self._forward = module.forward

    def __enter__(self):
        def forward(*a, **k):
            self.calls += 1
            return self._forward(*a, **k)

        self.module.forward = forward
        return self

    def __exit__(self, *exc):
        self.module.forward = self._forward


def denoiser(pipe):
    """The pipeline's denoising network (a transformer or a UNet)."""
    return pipe.transformer if hasattr(pipe, "transformer") else pipe.unet


def run_latents(pipe, scheduler, n, **call):
    """The pipeline's output latents with ``scheduler`` in place, and its denoiser calls."""
    base, pipe.scheduler = pipe.scheduler, scheduler
    try:
        with CountCalls(denoiser(pipe)) as c:
            out = pipe(
                "a cat", num_inference_steps=n, generator=torch.Generator().manual_seed(0), output_type="latent", **call
            ).images
    finally:
        pipe.scheduler = base
    return out, c.calls


def eps_net_3d():
    """A small timestep-conditioned eps network on 3-D states, the catalog parity tests' model:
    tanh(x W + t / 1000) / 2 + x / 10 (t a diffusers timestep, scalar or one per row)."""
    w = torch.randn(3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 0.3

    def net(x, t):
        return torch.tanh(x @ w + torch.as_tensor(t, dtype=torch.float64).reshape(-1, 1) / 1000.0) * 0.5 + 0.1 * x

    return net
