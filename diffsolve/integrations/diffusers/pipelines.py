"""Driver mode: any registered solver on a diffusers pipeline's denoiser and conditioning."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ...core.driver import (
    DEFAULT_INVERSION_SOLVER,
    check_invertible,
    resolve_solver,
)
from ...core.registry import get_solver, solver_info
from ...models.model import timestep_input
from ...schedules import EDM, RectifiedFlow, VPDiscrete, check_grid, is_grid_kind, make_grid
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


def _is_edm(pipe) -> bool:
    """An EDM-style scheduler (EDMEulerScheduler, EDMDPMSolverMultistepScheduler: Playground v2.5, CosXL)."""
    return type(pipe.scheduler).__name__.startswith("EDM")


def _edm_model(pipe, network):
    """The EDM-preconditioned denoiser of an EDM-style scheduler config, as diffusers' EDM schedulers
    precondition it (Karras et al. 2022, Table 1): with s the noise level and sd = ``sigma_data``,

        x0 = c_skip x + c_out F(c_in x, c_noise),   c_in = 1/sqrt(s^2 + sd^2),  c_noise = log(s)/4,
        c_skip = sd^2/(s^2 + sd^2),  c_out = s sd/sqrt(s^2 + sd^2)  (negated for v_prediction),

    on diffsolve's :class:`~diffsolve.schedules.EDM` schedule (alpha = 1, sigma = t) with the config's
    sigma_min / sigma_max. ``network(x_in, c_noise, **cond)`` is F."""
    from ...models.model import DiffusionModel

    cfg = pipe.scheduler.config
    pt = cfg.get("prediction_type", "epsilon")
    if pt not in ("epsilon", "v_prediction"):
        raise ValueError(
            f"prediction_type {pt!r} of the pipeline's EDM scheduler is not supported (epsilon, v_prediction)"
        )
    sign = 1.0 if pt == "epsilon" else -1.0
    sd = float(cfg.get("sigma_data", 0.5))

    def net(x, sigma, **cond):
        s = sigma.to(torch.float64).reshape(-1, *([1] * (x.ndim - 1)))
        c_in = torch.rsqrt(s * s + sd * sd)
        c_skip, c_out = sd * sd * c_in * c_in, sign * s * sd * c_in
        f = network(x * c_in.to(x.dtype), (0.25 * torch.log(s)).reshape(-1).to(x.dtype), **cond)
        return c_skip.to(x.dtype) * x + c_out.to(x.dtype) * f

    schedule = EDM(float(cfg.get("sigma_min", 0.002)), float(cfg.get("sigma_max", 80.0)))
    return DiffusionModel(net, schedule, "x0", time_input="sigma")


def _flow_schedule(pipe, image_seq_len: int) -> RectifiedFlow:
    """The pipeline's flow-matching schedule for this image size (the pipelines' calculate_shift)."""
    cfg = pipe.scheduler.config
    m = (cfg.get("max_shift", 1.15) - cfg.get("base_shift", 0.5)) / (
        cfg.get("max_image_seq_len", 4096) - cfg.get("base_image_seq_len", 256)
    )
    mu = image_seq_len * m + cfg.get("base_shift", 0.5) - m * cfg.get("base_image_seq_len", 256)
    return RectifiedFlow(shift=flow_shift(cfg, mu))


def _latent_stats(pipe, like: Tensor):
    """The VAE's per-channel latents_mean / latents_std (SDXL-style VAEs such as Playground's), or None."""
    cfg = pipe.vae.config
    mean, std = cfg.get("latents_mean"), cfg.get("latents_std")
    if mean is None or std is None:
        return None
    shape = (1, -1, *([1] * (like.ndim - 2)))
    return (
        torch.tensor(mean).reshape(shape).to(like.device, like.dtype),
        torch.tensor(std).reshape(shape).to(like.device, like.dtype),
    )


def _decode_vae(pipe, unpack=None):
    def decode(latents, output_type="pil"):
        if output_type == "latent":
            return latents
        z = latents if unpack is None else unpack(latents)
        stats = _latent_stats(pipe, z)
        if stats is not None:  # as the SDXL pipelines denormalise
            z = z * stats[1] / pipe.vae.config.scaling_factor + stats[0]
        else:
            z = z / pipe.vae.config.scaling_factor + (pipe.vae.config.get("shift_factor") or 0.0)
        with torch.no_grad():
            image = pipe.vae.decode(z.to(pipe.vae.dtype), return_dict=False)[0]
        return pipe.image_processor.postprocess(image, output_type=output_type)

    return decode


def _encode_vae(pipe, pixels: Tensor) -> Tensor:
    """Pipeline latents of preprocessed images: the VAE posterior mean, scaled as the pipeline scales
    (shift and scaling factor, or SDXL-style latents_mean / latents_std)."""
    x = pixels.to(device=pipe.vae.device, dtype=pipe.vae.dtype)
    with torch.no_grad():
        z = pipe.vae.encode(x).latent_dist.mean
    stats = _latent_stats(pipe, z)
    if stats is not None:
        return (z - stats[0]) * pipe.vae.config.scaling_factor / stats[1]
    return (z - (pipe.vae.config.get("shift_factor") or 0.0)) * pipe.vae.config.scaling_factor


def _batch(t: Tensor, b: int) -> Tensor:
    return t if t.shape[0] == b else t.repeat(b // t.shape[0], *([1] * (t.ndim - 1)))


def _inpaint_inputs(pipe, image, mask_image, height: int, width: int, b: int):
    """(mask at latent size, latents of the masked image), as StableDiffusionInpaintPipeline prepares
    them (the masked image's latents are the VAE posterior mean here, not a draw)."""
    if image is None or mask_image is None:
        raise ValueError(f"{type(pipe).__name__} inpaints: give image= and mask_image=")
    f = pipe.vae_scale_factor
    init = pipe.image_processor.preprocess(image, height=height, width=width).to(torch.float32)
    processor = getattr(pipe, "mask_processor", None)
    if processor is None:
        from diffusers.image_processor import VaeImageProcessor

        processor = VaeImageProcessor(
            vae_scale_factor=f, do_normalize=False, do_binarize=True, do_convert_grayscale=True
        )
    m = processor.preprocess(mask_image, height=height, width=width)
    masked = _encode_vae(pipe, init * (m < 0.5))
    mask = torch.nn.functional.interpolate(m, size=(height // f, width // f)).to(masked)
    return _batch(mask, b), _batch(masked, b)


def _sdxl_time_ids(pipe, proj: int, original_size, crops, target_size):
    """SDXL's added time ids (conditional, negative) as its pipelines make them: original size, crop
    corner and target size; for a refiner (``requires_aesthetics_score``) the aesthetic scores 6 and
    2.5 in place of the target size."""
    if pipe.config.get("requires_aesthetics_score", False):
        ids, neg = [*original_size, *crops, 6.0], [*original_size, *crops, 2.5]
    else:
        ids = neg = [*original_size, *crops, *target_size]
    unet = pipe.unet
    want = getattr(getattr(unet, "add_embedding", None), "linear_1", None)
    if want is not None and unet.config.addition_time_embed_dim * len(ids) + proj != want.in_features:
        raise ValueError(
            f"{type(pipe).__name__}'s UNet expects added embeddings of length {want.in_features}, but "
            f"{len(ids)} time ids and pooled text embeddings of {proj} give "
            f"{unet.config.addition_time_embed_dim * len(ids) + proj} (requires_aesthetics_score?)"
        )
    return [float(v) for v in ids], [float(v) for v in neg]


def _unet_model(
    pipe,
    prompt,
    negative_prompt,
    guidance_scale,
    num_images_per_prompt,
    height,
    width,
    image,
    mask_image,
    original_size,
    crops_coords_top_left,
    target_size,
):
    """Stable Diffusion-style pipelines (SD, SDXL, img2img, inpainting) and their EDM-style variants."""
    from ...guidance.hooks import Inpaint

    if prompt is None:
        raise ValueError("this pipeline is text-to-image: give prompt=")
    unet, f = pipe.unet, pipe.vae_scale_factor
    height = int(height or unet.config.sample_size * f)
    width = int(width or unet.config.sample_size * f)
    sdxl = unet.config.get("addition_embed_type") == "text_time"
    scale = (5.0 if sdxl else 7.5) if guidance_scale is None else float(guidance_scale)
    guided = scale > 1.0 and unet.config.get("time_cond_proj_dim") is None
    if sdxl:
        pe, ne, ppe, nppe = pipe.encode_prompt(
            prompt,
            device=unet.device,
            num_images_per_prompt=num_images_per_prompt,
            do_classifier_free_guidance=guided,
            negative_prompt=negative_prompt,
        )
        te2 = getattr(pipe, "text_encoder_2", None)
        proj = int(ppe.shape[-1]) if te2 is None else te2.config.projection_dim
        ids, neg_ids = _sdxl_time_ids(
            pipe,
            proj,
            tuple(original_size or (height, width)),
            tuple(crops_coords_top_left),
            tuple(target_size or (height, width)),
        )
        ids, neg_ids = (
            torch.tensor([v], dtype=pe.dtype, device=unet.device).repeat(pe.shape[0], 1) for v in (ids, neg_ids)
        )
        cond = {"encoder_hidden_states": pe, "text_embeds": ppe, "time_ids": ids}
        uncond = {"encoder_hidden_states": ne, "text_embeds": nppe, "time_ids": neg_ids} if guided else None
    else:
        pe, ne = pipe.encode_prompt(prompt, unet.device, num_images_per_prompt, guided, negative_prompt)[:2]
        cond, uncond = {"encoder_hidden_states": pe}, ({"encoder_hidden_states": ne} if guided else None)
    b = pe.shape[0]
    channels = pipe.vae.config.latent_channels
    hooks = []
    if unet.config.in_channels != channels:  # SD-inpainting's UNet: latents, mask, masked-image latents
        mask, masked = _inpaint_inputs(pipe, image, mask_image, height, width, b)
        extra = torch.cat([mask, masked], dim=1).to(pe.dtype)
        cond["inpaint"] = extra
        if uncond is not None:
            uncond["inpaint"] = extra
    elif mask_image is not None:  # a 4-channel UNet inpaints by replacing the known region at every call
        mask, _ = _inpaint_inputs(pipe, image, mask_image, height, width, b)
        init = _batch(_encode_vae(pipe, pipe.image_processor.preprocess(image, height=height, width=width)), b)
        hooks.append(Inpaint(1.0 - mask, init))

    def network(x, t, encoder_hidden_states, text_embeds=None, time_ids=None, inpaint=None):
        added = None if text_embeds is None else {"text_embeds": text_embeds, "time_ids": time_ids}
        if inpaint is not None:
            x = torch.cat([x, inpaint.to(x.dtype)], dim=1)
        return unet(
            x,
            timestep_input(t, x),
            encoder_hidden_states=encoder_hidden_states,
            added_cond_kwargs=added,
            return_dict=False,
        )[0]

    model = _guided(_denoiser(pipe, network), guided, scale, uncond)
    return model, cond, b, (channels, height // f, width // f), _decode_vae(pipe), hooks


def _denoiser(pipe, network):
    """The denoiser ``network(x, t, **cond)`` of a DDPM-style or EDM-preconditioned pipeline as a
    DiffusionModel on the pipeline's schedule."""
    from ...models.model import DiffusionModel

    if _is_edm(pipe):
        return _edm_model(pipe, network)
    schedule, kind = _vp_schedule_and_kind(pipe)
    return DiffusionModel(network, schedule, kind, time_input="timestep")


def _guided(model, guided: bool, scale: float, uncond):
    from ...guidance import ClassifierFreeGuidance

    return ClassifierFreeGuidance(model, scale, uncond=uncond) if guided else model


def _pixart_model(pipe, prompt, negative_prompt, guidance_scale, num_images_per_prompt, height, width, seq):
    """PixArt-style pipelines: a PixArtTransformer2DModel on T5 embeddings; a learned-sigma output
    (2 C channels) is split and its first half (eps) kept, as the pipelines do. Resolution binning
    is off: the latents have the size asked for."""

    if prompt is None:
        raise ValueError("this pipeline is text-to-image: give prompt=")
    tr, f = pipe.transformer, pipe.vae_scale_factor
    height = int(height or tr.config.sample_size * f)
    width = int(width or tr.config.sample_size * f)
    scale = 4.5 if guidance_scale is None else float(guidance_scale)
    guided = scale > 1.0
    pe, pm, ne, nm = pipe.encode_prompt(
        prompt,
        guided,
        negative_prompt="" if negative_prompt is None else negative_prompt,
        num_images_per_prompt=num_images_per_prompt,
        device=tr.device,
        **seq,
    )
    b = pe.shape[0]
    cond = {"encoder_hidden_states": pe, "encoder_attention_mask": pm}
    uncond = {"encoder_hidden_states": ne, "encoder_attention_mask": nm} if guided else None
    if getattr(tr, "use_additional_conditions", False):  # PixArt-Alpha 1024: size and aspect ratio
        size = {
            "resolution": torch.tensor([[float(height), float(width)]]).repeat(b, 1).to(tr.device, pe.dtype),
            "aspect_ratio": torch.tensor([[height / width]]).repeat(b, 1).to(tr.device, pe.dtype),
        }
        cond.update(size)
        if uncond is not None:  # (guided)
            uncond.update(size)
    c = tr.config.in_channels
    split = tr.config.out_channels is not None and tr.config.out_channels // 2 == c

    def network(x, t, encoder_hidden_states, encoder_attention_mask, resolution=None, aspect_ratio=None):
        out = tr(
            x,
            encoder_hidden_states=encoder_hidden_states,
            encoder_attention_mask=encoder_attention_mask,
            timestep=timestep_input(t, x),
            added_cond_kwargs={"resolution": resolution, "aspect_ratio": aspect_ratio},
            return_dict=False,
        )[0]
        return out.chunk(2, dim=1)[0] if split else out  # learned sigma: keep the prediction

    model = _guided(_denoiser(pipe, network), guided, scale, uncond)
    return model, cond, b, (c, height // f, width // f), _decode_vae(pipe)


def pipeline_model(
    pipe,
    prompt: str | list[str] | None = None,
    *,
    negative_prompt: str | list[str] | None = None,
    guidance_scale: float | None = None,
    num_images_per_prompt: int = 1,
    height: int | None = None,
    width: int | None = None,
    max_sequence_length: int | None = None,
    image=None,
    mask_image=None,
    original_size: tuple[int, int] | None = None,
    crops_coords_top_left: tuple[int, int] = (0, 0),
    target_size: tuple[int, int] | None = None,
    return_hooks: bool = False,
):
    """The pipeline's denoiser as a DiffusionModel, with its conditioning.

    Returns (model, cond, batch size, shape of one latent, decode); with ``return_hooks`` also the
    step hooks the pipeline needs (a 4-channel inpainting UNet's known-region replacement).
    Supported: DDPMPipeline-style (a UNet, no text), Stable Diffusion-style (``encode_prompt`` + UNet
    + VAE: SD, its img2img and inpainting pipelines), SDXL-style (two text encoders; pooled text
    embeddings and time ids as ``added_cond_kwargs``, from ``original_size``,
    ``crops_coords_top_left`` and ``target_size`` as in the pipeline), EDM-style schedulers (Playground
    v2.5: the network preconditioned as diffusers' EDM schedulers do, on diffsolve's EDM schedule),
    PixArt-style (T5 + PixArtTransformer2DModel; a learned-sigma output is split), SD3-style and
    Flux-style (flow-matching transformers). The prompt is encoded with the pipeline's own
    ``encode_prompt``; with ``guidance_scale`` > 1 the model is a
    :class:`~diffsolve.guidance.ClassifierFreeGuidance` holding the negative embeddings (Flux's
    ``guidance_scale`` is its distilled guidance embedding instead, as in the pipeline).
    An inpainting UNet (9 input channels) needs ``image`` and ``mask_image`` (white = repaint): the
    mask and the masked image's latents are concatenated to its input, as the pipeline does.
    ``decode(latents, output_type)`` turns latents into the pipeline's images.
    """
    out = _pipeline_model(
        pipe,
        prompt,
        negative_prompt,
        guidance_scale,
        num_images_per_prompt,
        height,
        width,
        max_sequence_length,
        image,
        mask_image,
        original_size,
        crops_coords_top_left,
        target_size,
    )
    if len(out) == 5:
        out = (*out, [])
    return out if return_hooks else out[:5]


def _pipeline_model(
    pipe,
    prompt,
    negative_prompt,
    guidance_scale,
    num_images_per_prompt,
    height,
    width,
    max_sequence_length,
    image,
    mask_image,
    original_size,
    crops_coords_top_left,
    target_size,
):
    from ...guidance import ClassifierFreeGuidance
    from ...models.model import DiffusionModel

    seq = {} if max_sequence_length is None else {"max_sequence_length": max_sequence_length}
    if mask_image is not None and not hasattr(pipe, "unet"):
        raise NotImplementedError(f"driver-mode inpainting of {type(pipe).__name__} is not supported yet")
    if hasattr(pipe, "transformer") and type(pipe.transformer).__name__ == "PixArtTransformer2DModel":
        return _pixart_model(pipe, prompt, negative_prompt, guidance_scale, num_images_per_prompt, height, width, seq)
    if hasattr(pipe, "transformer") and hasattr(pipe, "_pack_latents"):  # Flux
        tr, f = pipe.transformer, pipe.vae_scale_factor
        height = height or 2 * f * 8
        width = width or 2 * f * 8
        h, w = 2 * (int(height) // (f * 2)), 2 * (int(width) // (f * 2))
        pe, ppe, txt_ids = pipe.encode_prompt(
            prompt, None, device=tr.device, num_images_per_prompt=num_images_per_prompt, **seq
        )
        img_ids = pipe._prepare_latent_image_ids(pe.shape[0], h // 2, w // 2, tr.device, pe.dtype)
        distilled = float(3.5 if guidance_scale is None else guidance_scale) if tr.config.guidance_embeds else None

        def net(x, t, encoder_hidden_states, pooled_projections):
            g = (
                None
                if distilled is None
                else torch.full((x.shape[0],), distilled, device=x.device, dtype=torch.float32)
            )
            return tr(
                hidden_states=x,
                timestep=timestep_input(t, x),
                guidance=g,
                pooled_projections=pooled_projections,
                encoder_hidden_states=encoder_hidden_states,
                txt_ids=txt_ids,
                img_ids=img_ids,
                return_dict=False,
            )[0]

        c = tr.config.in_channels // 4
        model = DiffusionModel(net, _flow_schedule(pipe, (h // 2) * (w // 2)), "velocity", time_input="timestep")
        decode = _decode_vae(pipe, lambda z: pipe._unpack_latents(z, height, width, f))
        return (
            model,
            {"encoder_hidden_states": pe, "pooled_projections": ppe},
            pe.shape[0],
            ((h // 2) * (w // 2), c * 4),
            decode,
        )
    if hasattr(pipe, "transformer"):  # SD3
        tr, f = pipe.transformer, pipe.vae_scale_factor
        height = height or tr.config.sample_size * f
        width = width or tr.config.sample_size * f
        scale = 7.0 if guidance_scale is None else float(guidance_scale)
        guided = scale > 1.0
        pe, ne, ppe, nppe = pipe.encode_prompt(
            prompt,
            None,
            None,
            device=tr.device,
            num_images_per_prompt=num_images_per_prompt,
            do_classifier_free_guidance=guided,
            negative_prompt=negative_prompt,
            **seq,
        )

        def net(x, t, encoder_hidden_states, pooled_projections):
            return tr(
                hidden_states=x,
                timestep=timestep_input(t, x),
                encoder_hidden_states=encoder_hidden_states,
                pooled_projections=pooled_projections,
                return_dict=False,
            )[0]

        patch = tr.config.patch_size
        schedule = _flow_schedule(pipe, (int(height) // f // patch) * (int(width) // f // patch))
        model = DiffusionModel(net, schedule, "velocity", time_input=lambda t: 1000.0 * schedule.sigma(t))
        if guided:
            model = ClassifierFreeGuidance(
                model, scale, uncond={"encoder_hidden_states": ne, "pooled_projections": nppe}
            )
        return (
            model,
            {"encoder_hidden_states": pe, "pooled_projections": ppe},
            pe.shape[0],
            (tr.config.in_channels, int(height) // f, int(width) // f),
            _decode_vae(pipe),
        )
    if type(pipe.scheduler).__name__.startswith("FlowMatch"):
        raise NotImplementedError(f"driver mode does not know {type(pipe).__name__} yet")
    if hasattr(pipe, "encode_prompt") and hasattr(pipe, "vae"):  # Stable Diffusion, SDXL, img2img, inpainting
        return _unet_model(
            pipe,
            prompt,
            negative_prompt,
            guidance_scale,
            num_images_per_prompt,
            height,
            width,
            image,
            mask_image,
            original_size,
            crops_coords_top_left,
            target_size,
        )
    return _ddpm_model(pipe, prompt, guidance_scale, num_images_per_prompt)


def _ddpm_model(pipe, prompt, guidance_scale, num_images_per_prompt):
    """A DDPMPipeline-style pipeline (a UNet, no text): its model, cond, batch size, latent shape, decode."""
    from ...models.model import DiffusionModel

    schedule, kind = _vp_schedule_and_kind(pipe)
    unet = pipe.unet
    if prompt is not None or guidance_scale is not None:
        raise ValueError(f"{type(pipe).__name__} takes no prompt or guidance_scale")

    def net(x, t):
        return unet(x, timestep_input(t, x)).sample

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


def _strength_start(pipe, schedule, steps: int, strength: float) -> tuple[float, int]:
    """Where an img2img run of ``steps`` steps at ``strength`` starts, as the pipelines place it: the
    pipeline's own scheduler's timestep number ``steps - int(steps strength)`` (its get_timesteps),
    as a diffsolve time; and the number of steps left."""
    if not 0.0 <= float(strength) <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength!r}")
    left = min(int(steps * float(strength)), steps)
    if left < 1:
        raise ValueError(f"strength {strength} with {steps} steps leaves no step to run (the pipelines refuse it too)")
    ref = type(pipe.scheduler).from_config(pipe.scheduler.config)
    ref.set_timesteps(steps)
    i = (steps - left) * getattr(ref, "order", 1)
    if isinstance(schedule, EDM):
        return float(ref.sigmas[i]), left
    return float(schedule.t_of_timestep(torch.as_tensor(float(ref.timesteps[i]), dtype=torch.float64))), left


def sample_pipeline(
    pipe,
    solver: str = "dpmpp-2m",
    prompt: str | list[str] | None = None,
    *,
    num_inference_steps: int | None = 50,
    negative_prompt=None,
    guidance_scale: float | None = None,
    num_images_per_prompt: int = 1,
    generator=None,
    seed=None,
    latent=None,
    output_type: str = "pil",
    height: int | None = None,
    width: int | None = None,
    max_sequence_length: int | None = None,
    image=None,
    mask_image=None,
    strength: float | None = None,
    x_T: Tensor | None = None,
    grid=None,
    t_max: float | None = None,
    t_min: float | None = None,
    hooks=None,
    progress: bool | None = None,
    **solver_options,
) -> PipelineOutput:
    """Driver mode: run any registered solver (adaptive, Denoising-MCMC and reversible included) on a
    diffusers pipeline's denoiser and conditioning, then decode as the pipeline does.

    ``num_inference_steps`` is ignored by adaptive solvers; ``grid``, ``t_max`` and ``t_min`` are as for
    ``ds.sample`` (flow pipelines start at t = 1, where alpha = 0: SDE solvers need e.g.
    ``t_max=0.999`` and end at sigma > 0, e.g. ``t_min=1e-3``; reversible solvers move an end they
    cannot reach themselves and warn); ``latent`` (from :func:`invert_pipeline`) starts from an inverted state.
    ``x_T`` starts from a given state (at the grid's first time).

    img2img: with ``image`` (and ``strength``, default 0.8 as in the img2img pipelines) the run starts
    from the image's latents (the VAE posterior mean) noised to the time where the pipeline with
    ``num_inference_steps`` steps would start (its scheduler's timestep ``num_inference_steps -
    int(num_inference_steps strength)``), x = alpha x0 + sigma z; a fixed-grid solver then runs the
    ``int(num_inference_steps strength)`` steps left, on its grid from there; an adaptive one starts there.
    Without ``height`` / ``width`` the latents have the image's size. Inpainting: ``image`` and
    ``mask_image`` (white = repaint); ``strength`` defaults to 1 (from noise, as the inpainting
    pipeline); below 1 the start is the noised image as for img2img.
    Every denoiser call is one NFE of the returned result.
    """
    from ...core.driver import sample
    from ...core.noise import NoiseSource

    if strength is not None and image is None:
        raise ValueError("strength is for img2img and inpainting: give image= too")
    if (
        image is not None
        and mask_image is None
        and height is None
        and width is None
        and hasattr(pipe, "image_processor")
    ):
        height, width = (int(v) for v in pipe.image_processor.preprocess(image).shape[-2:])  # img2img: the image's size
    if latent is not None and num_images_per_prompt == 1 and isinstance(getattr(latent, "x", None), Tensor):
        num_images_per_prompt = _images_per_prompt(prompt, latent.x.shape[0])  # a latent of several images
    model, cond, b, shape, decode, extra_hooks = pipeline_model(
        pipe,
        prompt,
        negative_prompt=negative_prompt,
        guidance_scale=guidance_scale,
        num_images_per_prompt=num_images_per_prompt,
        height=height,
        width=width,
        max_sequence_length=max_sequence_length,
        image=image,
        mask_image=mask_image,
        return_hooks=True,
    )
    denoiser = pipe.transformer if hasattr(pipe, "transformer") else pipe.unet
    hooks = list(extra_hooks) + (
        [] if hooks is None else ([hooks] if not isinstance(hooks, (list, tuple)) else list(hooks))
    )
    kw = dict(cond=cond, hooks=hooks or None, progress=progress, dtype=denoiser.dtype, device=denoiser.device)
    info = solver_info(get_solver(solver, **solver_options).name)
    explicit_grid = grid is not None and not is_grid_kind(grid)
    steps = num_inference_steps if info.fixed_grid and not explicit_grid else None  # an explicit grid sets the steps
    if strength is None:
        strength = 1.0 if mask_image is not None else 0.8
    from_image = image is not None and (mask_image is None or strength < 1.0)
    if from_image and not (hasattr(pipe, "vae") and isinstance(model.schedule, (VPDiscrete, EDM))):
        raise NotImplementedError(f"driver-mode img2img of {type(pipe).__name__} is not supported yet")
    if from_image and (latent is not None or x_T is not None or t_max is not None):
        raise ValueError("an img2img run starts from image= at its strength: give no latent=, x_T= or t_max=")
    gens = _per_sample_generators(generator, b)
    with torch.no_grad():  # as the pipelines run (guidance that needs gradients enables them itself)
        if latent is not None:
            res = sample(model, solver, latent=latent, **kw, **solver_options)
        elif from_image:
            if num_inference_steps is None:
                raise ValueError("img2img needs num_inference_steps: with strength it sets where the run starts")
            t_max, left = _strength_start(pipe, model.schedule, num_inference_steps, strength)
            if not explicit_grid:
                g = make_grid(model.schedule, left if info.fixed_grid else 1, grid, t_max=t_max, t_min=t_min)
            else:  # an explicit grid: its first time is the start
                g = check_grid(grid)
            h, w = shape[-2] * pipe.vae_scale_factor, shape[-1] * pipe.vae_scale_factor
            x0 = _batch(_encode_vae(pipe, pipe.image_processor.preprocess(image, height=h, width=w)), b)
            # the start noise is the run's first draw, as ds.sample draws its prior: the solver's own
            # draws continue the same per-sample streams
            src = NoiseSource(
                (b, *shape),
                seeds=seed if gens is None else None,
                generators=gens,
                device=denoiser.device,
                dtype=denoiser.dtype,
            )
            a, sg = model.schedule.at(float(g[0]))
            start = a * x0.to(device=src.device, dtype=src.dtype) + sg * src.randn()
            res = sample(model, solver, x_T=start, generator=src.generators, grid=g, **kw, **solver_options)
        else:
            res = sample(
                model,
                solver,
                steps,
                shape=None if x_T is not None else (b, *shape),
                x_T=x_T,
                generator=gens,
                seed=seed,
                grid=grid,
                t_max=t_max,
                t_min=t_min,
                **kw,
                **solver_options,
            )
    return PipelineOutput(decode(res.samples, output_type), res.samples, res)


def _image_batch(image) -> Tensor:
    """Images for a pipeline without a VAE as one batch: a tensor or array [B, C, H, W], or a list of
    [C, H, W] or [1, C, H, W] ones (stacked)."""
    if not isinstance(image, (list, tuple)):
        return image if isinstance(image, Tensor) else torch.as_tensor(image)
    try:
        parts = [torch.as_tensor(i) for i in image]
        return torch.cat([i if i.ndim == 4 else i[None] for i in parts])
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(
            f"image: a list of images must hold tensors or arrays of one shape, [C, H, W] or [1, C, H, W]; {e}"
        ) from None


def _images_per_prompt(prompt, n: int) -> int:
    """How many of ``n`` images each prompt conditions: all of them for one prompt, one for one per image."""
    if prompt is None or isinstance(prompt, str):
        return n
    if len(prompt) == n:
        return 1
    raise ValueError(f"prompt: {len(prompt)} prompts for {n} images; give one prompt, or one per image")


def invert_pipeline(
    pipe,
    image=None,
    solver: str = DEFAULT_INVERSION_SOLVER,
    prompt: str | list[str] | None = None,
    *,
    latents: Tensor | None = None,
    num_inference_steps: int = 50,
    negative_prompt=None,
    guidance_scale: float | None = None,
    max_sequence_length: int | None = None,
    mask_image=None,
    progress: bool | None = None,
    **solver_options,
):
    """Exact inversion of real images in latent space: encode ``image`` with the pipeline's VAE (its
    posterior mean; or pass ``latents``) and run ``ds.invert`` with the pipeline's conditioning (and
    CFG). Returns the :class:`~diffsolve.Latent`; ``sample_pipeline(pipe, solver, prompt, latent=...)``
    reconstructs it (to round-off for reversible solvers). An inpainting UNet also needs
    ``mask_image`` (and ``image``, its conditioning).

    ``image`` is what the pipeline's image processor takes (a PIL image, an array or tensor, or a list
    of them: a batch); without a VAE, a tensor or array [B, C, H, W] or a list of [C, H, W] / [1, C, H,
    W] ones, stacked. One prompt serves every image; a list of prompts needs one per image.

    ``solver`` defaults to ``"rev-heun"`` (``ds.invert``'s default); a solver that cannot invert
    (a stochastic one, ``mrs-adaptive``) is refused before anything is encoded."""
    from ...core.driver import invert

    check_invertible(resolve_solver(solver, solver_options))
    if latents is None and image is not None and hasattr(pipe, "_pack_latents"):
        raise NotImplementedError("invert_pipeline of a Flux pipeline needs latents= (packed)")
    height = width = None
    if image is not None and hasattr(pipe, "vae"):
        hw = pipe.image_processor.preprocess(image).shape[-2:]
        height, width = int(hw[0]), int(hw[1])
    if latents is None:
        if image is None:
            raise ValueError("give image= (or latents=)")
        if not hasattr(pipe, "vae"):
            latents = _image_batch(image)
        else:
            latents = _encode_vae(pipe, pipe.image_processor.preprocess(image))
    per_prompt = _images_per_prompt(prompt, latents.shape[0])
    model, cond, _b, _shape, _ = pipeline_model(
        pipe,
        prompt,
        negative_prompt=negative_prompt,
        guidance_scale=guidance_scale,
        num_images_per_prompt=per_prompt,
        max_sequence_length=max_sequence_length,
        height=height,
        width=width,
        image=image if mask_image is not None else None,
        mask_image=mask_image,
    )
    with torch.no_grad():
        return invert(model, solver, latents, num_inference_steps, cond=cond, progress=progress, **solver_options)
