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

    return CLIPTextConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=32, num_attention_heads=2,
                          num_hidden_layers=1, max_position_embeddings=8, bos_token_id=0, eos_token_id=1,
                          pad_token_id=1, projection_dim=hidden)


def _vae(**extra):
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         norm_num_groups=8, sample_size=16, **extra).eval()


def _damp(module):
    """A random network's field is far rougher than a trained one's; damping its output by 10 brings
    it nearer (it matters for float32 round trips of the reversible solvers: 6e-4 -> 8e-6 for rex)."""
    with torch.no_grad():
        for p in module.parameters():
            p.mul_(0.1)


def stable_diffusion(tmp: Path):
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(0)
    tokenizer, n = _clip_tokenizer(tmp)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                                attention_head_dim=2, norm_num_groups=8).eval()
    _damp(unet.conv_out)
    sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=_vae(), text_encoder=CLIPTextModel(_clip_config(n, 16)).eval(), tokenizer=tokenizer,
                                   unet=unet, scheduler=sched, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def stable_diffusion_3(tmp: Path):
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(0)
    tokenizer, n = _clip_tokenizer(tmp)
    tr = SD3Transformer2DModel(sample_size=8, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8,
                               num_attention_heads=2, caption_projection_dim=16, joint_attention_dim=32,
                               pooled_projection_dim=32, out_channels=4).eval()
    _damp(tr.proj_out)
    pipe = StableDiffusion3Pipeline(transformer=tr, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                    vae=_vae(shift_factor=0.06, scaling_factor=1.5),
                                    text_encoder=CLIPTextModelWithProjection(_clip_config(n, 16)).eval(), tokenizer=tokenizer,
                                    text_encoder_2=CLIPTextModelWithProjection(_clip_config(n, 16)).eval(),
                                    tokenizer_2=tokenizer, text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def flux(tmp: Path):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPTextModel, T5Config, T5EncoderModel, T5TokenizerFast

    torch.manual_seed(0)
    tokenizer, n = _clip_tokenizer(tmp)
    words = {"<pad>": 0, "</s>": 1, "<unk>": 2, "a": 3, "cat": 4, "dog": 5}
    t5_tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    t5_tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer_2 = T5TokenizerFast(tokenizer_object=t5_tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                  model_max_length=8)
    t5 = T5EncoderModel(T5Config(vocab_size=len(words), d_model=32, d_kv=8, d_ff=32, num_layers=1, num_heads=4)).eval()
    tr = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
                                num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                                axes_dims_rope=[4, 4, 8]).eval()
    _damp(tr.proj_out)
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
    pipe = FluxPipeline(scheduler=sched, vae=_vae(shift_factor=0.06, scaling_factor=1.5, use_quant_conv=False,
                                                  use_post_quant_conv=False),
                        text_encoder=CLIPTextModel(_clip_config(n, 32)).eval(), tokenizer=tokenizer,
                        text_encoder_2=t5, tokenizer_2=tokenizer_2, transformer=tr)
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
