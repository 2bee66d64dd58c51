"""Driver mode: any registered solver on a diffusers pipeline's denoiser and conditioning."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ...samplers.registry import get_solver, solver_info
from ...schedules import RectifiedFlow, VPDiscrete
from .config import PREDICTIONS, flow_shift

Tensor = torch.Tensor

@dataclass
class PipelineOutput:
    """What :func:`sample_pipeline` returns: decoded ``images``, the final ``latents`` and the run's
    :class:`~diffsolve.SampleResult` (NFE = network calls, per sample, ...)."""

    images: Any
    latents: Tensor
    result: Any


def _vp_schedule_and_kind(pipe):
    cfg = pipe.scheduler.config
    pt = cfg.get("prediction_type", "epsilon")
    if pt not in PREDICTIONS or pt == "flow_prediction":
        raise ValueError(f"prediction_type {pt!r} of the pipeline's scheduler is not supported")
    return VPDiscrete.from_diffusers_config(dict(cfg)), PREDICTIONS[pt]


def _flow_schedule(pipe, image_seq_len: int) -> RectifiedFlow:
    """The pipeline's flow-matching schedule for this image size (the pipelines' calculate_shift)."""
    cfg = pipe.scheduler.config
    m = (cfg.get("max_shift", 1.15) - cfg.get("base_shift", 0.5)) / (cfg.get("max_image_seq_len", 4096) -
                                                                    cfg.get("base_image_seq_len", 256))
    mu = image_seq_len * m + cfg.get("base_shift", 0.5) - m * cfg.get("base_image_seq_len", 256)
    return RectifiedFlow(shift=flow_shift(cfg, mu))


def _decode_vae(pipe, unpack=None):
    def decode(latents, output_type="pil"):
        if output_type == "latent":
            return latents
        z = latents if unpack is None else unpack(latents)
        z = z / pipe.vae.config.scaling_factor + (pipe.vae.config.get("shift_factor") or 0.0)
        with torch.no_grad():
            image = pipe.vae.decode(z, return_dict=False)[0]
        return pipe.image_processor.postprocess(image, output_type=output_type)
    return decode


def pipeline_model(pipe, prompt: str | list[str] | None = None, *, negative_prompt: str | list[str] | None = None,
                   guidance_scale: float | None = None, num_images_per_prompt: int = 1, height: int | None = None,
                   width: int | None = None, max_sequence_length: int | None = None):
    """The pipeline's denoiser as a DiffusionModel, with its conditioning.

    Returns (model, cond, batch size, shape of one latent, decode). Supported: DDPMPipeline-style
    (a UNet, no text), Stable Diffusion-style (``encode_prompt`` + UNet + VAE), SD3-style and
    Flux-style (flow-matching transformers). The prompt is encoded with the pipeline's own
    ``encode_prompt``; with ``guidance_scale`` > 1 the model is a
    :class:`~diffsolve.guidance.ClassifierFreeGuidance` holding the negative embeddings (Flux's
    ``guidance_scale`` is its distilled guidance embedding instead, as in the pipeline).
    ``decode(latents, output_type)`` turns latents into the pipeline's images.
    """
    from ...guidance import ClassifierFreeGuidance
    from ...models.model import DiffusionModel

    seq = {} if max_sequence_length is None else {"max_sequence_length": max_sequence_length}
    if hasattr(pipe, "transformer") and hasattr(pipe, "_pack_latents"):  # Flux
        tr, f = pipe.transformer, pipe.vae_scale_factor
        height = height or 2 * f * 8
        width = width or 2 * f * 8
        h, w = 2 * (int(height) // (f * 2)), 2 * (int(width) // (f * 2))
        pe, ppe, txt_ids = pipe.encode_prompt(prompt, None, device=tr.device, num_images_per_prompt=num_images_per_prompt, **seq)
        img_ids = pipe._prepare_latent_image_ids(pe.shape[0], h // 2, w // 2, tr.device, pe.dtype)
        distilled = float(3.5 if guidance_scale is None else guidance_scale) if tr.config.guidance_embeds else None

        def net(x, t, encoder_hidden_states, pooled_projections):
            g = None if distilled is None else torch.full((x.shape[0],), distilled, device=x.device, dtype=torch.float32)
            return tr(hidden_states=x, timestep=t.to(x.dtype), guidance=g, pooled_projections=pooled_projections,
                      encoder_hidden_states=encoder_hidden_states, txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]

        c = tr.config.in_channels // 4
        model = DiffusionModel(net, _flow_schedule(pipe, (h // 2) * (w // 2)), "velocity", time_input="timestep")
        decode = _decode_vae(pipe, lambda z: pipe._unpack_latents(z, height, width, f))
        return model, {"encoder_hidden_states": pe, "pooled_projections": ppe}, pe.shape[0], \
            ((h // 2) * (w // 2), c * 4), decode
    if hasattr(pipe, "transformer"):  # SD3
        tr, f = pipe.transformer, pipe.vae_scale_factor
        height = height or tr.config.sample_size * f
        width = width or tr.config.sample_size * f
        scale = 7.0 if guidance_scale is None else float(guidance_scale)
        guided = scale > 1.0
        pe, ne, ppe, nppe = pipe.encode_prompt(prompt, None, None, device=tr.device,
                                               num_images_per_prompt=num_images_per_prompt,
                                               do_classifier_free_guidance=guided, negative_prompt=negative_prompt, **seq)

        def net(x, t, encoder_hidden_states, pooled_projections):
            return tr(hidden_states=x, timestep=t.to(x.dtype), encoder_hidden_states=encoder_hidden_states,
                      pooled_projections=pooled_projections, return_dict=False)[0]

        patch = tr.config.patch_size
        schedule = _flow_schedule(pipe, (int(height) // f // patch) * (int(width) // f // patch))
        model = DiffusionModel(net, schedule, "velocity", time_input=lambda t: 1000.0 * schedule.sigma(t))
        if guided:
            model = ClassifierFreeGuidance(model, scale, uncond={"encoder_hidden_states": ne, "pooled_projections": nppe})
        return model, {"encoder_hidden_states": pe, "pooled_projections": ppe}, pe.shape[0], \
            (tr.config.in_channels, int(height) // f, int(width) // f), _decode_vae(pipe)
    if type(pipe.scheduler).__name__.startswith("FlowMatch"):
        raise NotImplementedError(f"driver mode does not know {type(pipe).__name__} yet")
    schedule, kind = _vp_schedule_and_kind(pipe)
    unet = pipe.unet
    if hasattr(pipe, "encode_prompt") and hasattr(pipe, "vae"):  # Stable Diffusion
        if prompt is None:
            raise ValueError("this pipeline is text-to-image: give prompt=")
        scale = 7.5 if guidance_scale is None else float(guidance_scale)
        guided = scale > 1.0
        pe, ne = pipe.encode_prompt(prompt, unet.device, num_images_per_prompt, guided, negative_prompt)[:2]

        def net(x, t, encoder_hidden_states):
            return unet(x, t.to(x.dtype), encoder_hidden_states=encoder_hidden_states).sample

        model = DiffusionModel(net, schedule, kind, time_input="timestep")
        if guided:
            model = ClassifierFreeGuidance(model, scale, uncond={"encoder_hidden_states": ne})
        f = pipe.vae_scale_factor
        height = height or unet.config.sample_size * f
        width = width or unet.config.sample_size * f
        return model, {"encoder_hidden_states": pe}, pe.shape[0], \
            (unet.config.in_channels, int(height) // f, int(width) // f), _decode_vae(pipe)
    if prompt is not None or guidance_scale is not None:
        raise ValueError(f"{type(pipe).__name__} takes no prompt or guidance_scale")

    def net(x, t):
        return unet(x, t.to(x.dtype)).sample

    size = unet.config.sample_size
    size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)

    def decode(latents, output_type="pil"):
        if output_type == "latent":
            return latents
        image = (latents / 2 + 0.5).clamp(0, 1).cpu().permute(0, 2, 3, 1).float().numpy()
        return pipe.numpy_to_pil(image) if output_type == "pil" else image

    model = DiffusionModel(net, schedule, kind, time_input="timestep")
    return model, {}, num_images_per_prompt, (unet.config.in_channels, *size), decode


def _per_sample_generators(generator, n: int):
    """diffusers' generator argument (None, one, or a list) as one generator per sample."""
    if generator is None or isinstance(generator, (list, tuple)):
        return generator
    seeds = torch.randint(0, 2**62, (n,), generator=generator).tolist()
    return [torch.Generator(generator.device).manual_seed(int(s)) for s in seeds]


def sample_pipeline(pipe, solver: str = "dpmpp-2m", prompt: str | list[str] | None = None, *,
                    num_inference_steps: int | None = 50, negative_prompt=None, guidance_scale: float | None = None,
                    num_images_per_prompt: int = 1, generator=None, seed=None, latent=None, output_type: str = "pil",
                    height: int | None = None, width: int | None = None, max_sequence_length: int | None = None,
                    grid=None, t_max: float | None = None, t_min: float | None = None, hooks=None, progress: bool | None = None,
                    **solver_options) -> PipelineOutput:
    """Driver mode: run any registered solver (adaptive, Denoising-MCMC and reversible included) on a
    diffusers pipeline's denoiser and conditioning, then decode as the pipeline does.

    ``num_inference_steps`` is ignored by adaptive solvers; ``grid``, ``t_max`` and ``t_min`` are as for
    ``ds.sample`` (flow pipelines start at t = 1, where alpha = 0: reversible and SDE solvers need
    e.g. ``t_max=0.999``; SDE solvers end at sigma > 0, e.g. ``t_min=1e-3``); ``latent`` (from :func:`invert_pipeline`) starts from an inverted state.
    Every denoiser call is one NFE of the returned result.
    """
    from ...samplers.driver import sample

    model, cond, b, shape, decode = pipeline_model(pipe, prompt, negative_prompt=negative_prompt,
                                                   guidance_scale=guidance_scale, num_images_per_prompt=num_images_per_prompt,
                                                   height=height, width=width, max_sequence_length=max_sequence_length)
    denoiser = pipe.transformer if hasattr(pipe, "transformer") else pipe.unet
    kw = dict(cond=cond, hooks=hooks, progress=progress, dtype=denoiser.dtype, device=denoiser.device)
    info = solver_info(get_solver(solver, **solver_options).name)
    with torch.no_grad():  # as the pipelines run (guidance that needs gradients enables them itself)
        if latent is not None:
            res = sample(model, solver, latent=latent, **kw, **solver_options)
        else:
            steps = num_inference_steps if info.fixed_grid else None
            res = sample(model, solver, steps, shape=(b, *shape), generator=_per_sample_generators(generator, b),
                         seed=seed, grid=grid, t_max=t_max, t_min=t_min, **kw, **solver_options)
    return PipelineOutput(decode(res.samples, output_type), res.samples, res)


def invert_pipeline(pipe, image=None, solver: str = "rex", prompt: str | list[str] | None = None, *,
                    latents: Tensor | None = None, num_inference_steps: int = 50, negative_prompt=None,
                    guidance_scale: float | None = None, max_sequence_length: int | None = None,
                    progress: bool | None = None, **solver_options):
    """Exact inversion of real images in latent space: encode ``image`` with the pipeline's VAE (its
    posterior mean; or pass ``latents``) and run ``ds.invert`` with the pipeline's conditioning (and
    CFG). Returns the :class:`~diffsolve.Latent`; ``sample_pipeline(pipe, solver, prompt, latent=...)``
    reconstructs it (to round-off for reversible solvers)."""
    from ...samplers.driver import invert

    if latents is None and image is not None and hasattr(pipe, "_pack_latents"):
        raise NotImplementedError("invert_pipeline of a Flux pipeline needs latents= (packed)")
    size = {}
    if latents is None and image is not None and hasattr(pipe, "vae"):
        hw = pipe.image_processor.preprocess(image).shape[-2:]
        size = {"height": int(hw[0]), "width": int(hw[1])}
    model, cond, b, shape, _ = pipeline_model(pipe, prompt, negative_prompt=negative_prompt, guidance_scale=guidance_scale,
                                              max_sequence_length=max_sequence_length, **size)
    if latents is None:
        if image is None:
            raise ValueError("give image= (or latents=)")
        if not hasattr(pipe, "vae"):
            latents = image if isinstance(image, Tensor) else torch.as_tensor(image)
        else:
            x = pipe.image_processor.preprocess(image).to(device=pipe.vae.device, dtype=pipe.vae.dtype)
            with torch.no_grad():
                z = pipe.vae.encode(x).latent_dist.mean
            latents = (z - (pipe.vae.config.get("shift_factor") or 0.0)) * pipe.vae.config.scaling_factor
    with torch.no_grad():
        return invert(model, solver, latents, num_inference_steps, cond=cond, progress=progress, **solver_options)
