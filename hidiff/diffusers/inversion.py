"""DDIM inversion with CFG++ (and with ordinary CFG, for comparison): the noise latents from which
CFG++ DDIM sampling gives an image back, used by :func:`hidiff.edit`.

Each inversion step runs the DDIM step backwards with the roles of the two predictions swapped
(the clean estimate from eps_u, the re-noising with eps_l), so it is the exact inverse of a CFG++
DDIM step wherever the U-Net output does not depend on the latents. With HiDiffusion applied,
each inversion call is planned as the sampling step it inverts.
"""

from __future__ import annotations

import contextlib
from typing import Any, Optional, Sequence, Union

import torch

from ..core import cfgpp as rules
from ..core.cfgpp import check_guidance
from .cfgpp import cfgpp_settings, check_pipeline, original_scheduler
from .cfgpp_samplers import sampler_classes, stock_scheduler
from .patch import get_patch


@torch.no_grad()
def invert(
    pipe: Any,
    image: Any,
    prompt: Union[str, Sequence[str]],
    *,
    negative_prompt: Union[None, str, Sequence[str]] = None,
    guidance: Optional[float] = None,
    cfg_scale: Optional[float] = None,
    num_inference_steps: int = 50,
) -> torch.Tensor:
    """DDIM inversion with CFG++: the noise latents from which CFG++ DDIM sampling gives ``image`` back.

    Each inversion step runs the DDIM step backwards with the roles of the two predictions
    swapped (the clean estimate from eps_u, the re-noising with eps_l), so it is the exact
    inverse of a CFG++ DDIM step wherever the U-Net output does not depend on the latents.

    Args:
        pipe: a text-to-image SD 1.x / 2.x / SDXL pipeline.
        image: what ``pipe.image_processor.preprocess`` takes (PIL images, arrays, tensors in [0, 1]).
        prompt, negative_prompt: as for the pipeline call that will sample back.
        guidance: lam in [0, 1]; default: the lam of ``hidiff.enable_cfgpp`` on this pipeline.
        cfg_scale: invert with ordinary CFG at this scale instead (eps_w both ways), for comparison.
        num_inference_steps: the steps of the sampling run that will reconstruct the image.

    Reconstruct with ``hidiff.enable_cfgpp(pipe, "ddim", guidance)`` and
    ``pipe(prompt, latents=noise, num_inference_steps=num_inference_steps)`` (height and width of the image).
    """
    if guidance is None and cfg_scale is None:
        settings = cfgpp_settings(pipe)
        if settings is None:
            raise ValueError("pass guidance=lam (or cfg_scale=w), or call hidiff.enable_cfgpp(pipe, 'ddim', lam) first")
        guidance = settings[1]
    run = inversion(pipe, image, prompt, negative_prompt, guidance, cfg_scale, num_inference_steps)
    return run.latents.to(run.dtype)


class Inversion:
    """What :func:`inversion` found: the clean latents, the latents after each inverted step
    (``levels[t]``: at the noise level of sampling timestep ``t``, float32) and the last of them."""

    def __init__(self, clean: torch.Tensor, levels: dict[int, torch.Tensor], latents: torch.Tensor, dtype: Any):
        self.clean, self.levels, self.latents, self.dtype = clean, levels, latents, dtype


def inversion(
    pipe: Any,
    image: Any,
    prompt: Union[str, Sequence[str]],
    negative_prompt: Union[None, str, Sequence[str]],
    guidance: Optional[float],
    cfg_scale: Optional[float],
    num_inference_steps: int,
    num_inverted_steps: Optional[int] = None,
) -> Inversion:
    """DDIM inversion of the first ``num_inverted_steps`` (default all) steps of an
    ``num_inference_steps``-step schedule, counted from the clean end: CFG++ with ``guidance``
    (lam), or ordinary CFG with ``cfg_scale``. Checks its inputs before running anything."""
    if guidance is not None and cfg_scale is not None:
        raise ValueError("pass guidance (CFG++ lam) or cfg_scale (ordinary CFG), not both")
    if cfg_scale is not None:
        cfg_scale = rules.check_cfg_scale(cfg_scale)
    lam = check_guidance(guidance) if cfg_scale is None else None
    if not isinstance(num_inference_steps, int) or isinstance(num_inference_steps, bool) or num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be a positive int, got {num_inference_steps!r}")
    inverted = num_inference_steps if num_inverted_steps is None else num_inverted_steps
    original = original_scheduler(pipe)
    unet = check_pipeline(pipe, getattr(original, "config", {}), sampler_classes()["ddim"].forced_config)
    if getattr(pipe, "controlnet", None) is not None or getattr(pipe, "adapter", None) is not None:
        raise TypeError("hidiff.invert inverts with the prompt only; use a pipeline without ControlNet or adapter.")
    if unet.config.in_channels != unet.config.out_channels:
        raise TypeError("hidiff.invert needs a text-to-image U-Net (an inpainting U-Net takes a mask as well).")

    ddim = stock_scheduler("ddim", original.config)
    ddim.set_timesteps(num_inference_steps)
    device = getattr(pipe, "_execution_device", None) or unet.device
    latents = encode_image(pipe, image, device)
    batch = latents.shape[0]
    call_kwargs = conditioning(pipe, prompt, negative_prompt, batch, latents.shape[-2:], device)
    clean = latents.float()
    step = ddim.config.num_train_timesteps // num_inference_steps
    patch = get_patch(unet)
    # With HiDiffusion applied, each inversion call is planned as the sampling step it inverts.
    with patch.mirrored(ddim.timesteps) if patch is not None else contextlib.nullcontext():
        levels = _invert_loop(unet, ddim, clean, step, device, call_kwargs, lam, cfg_scale, inverted)
    last = levels[int(ddim.timesteps[num_inference_steps - inverted])] if inverted else clean
    return Inversion(clean, levels, last, unet.dtype)


def _invert_loop(
    unet: Any,
    ddim: Any,
    x: torch.Tensor,
    step: int,
    device: Any,
    call_kwargs: dict,
    lam: Any,
    cfg_scale: Any,
    inverted: int,
) -> dict[int, torch.Tensor]:
    prediction = ddim.config.prediction_type
    levels = {}
    for t in reversed(ddim.timesteps[len(ddim.timesteps) - inverted :]):
        t_from = int(t) - step
        a_from = ddim.alphas_cumprod[t_from] if t_from >= 0 else ddim.final_alpha_cumprod
        a_to = ddim.alphas_cumprod[int(t)]
        model_input = torch.cat([x, x]).to(unet.dtype)
        out = unet(model_input, t.to(device), return_dict=False, **call_kwargs)[0].float()
        if prediction == "v_prediction":  # eps = sqrt(a) v + sqrt(1 - a) x at the timestep the U-Net saw
            out = a_to**0.5 * out + (1 - a_to) ** 0.5 * torch.cat([x, x])
        eps_u, eps_c = out.chunk(2)
        if cfg_scale is not None:
            eps_denoise = eps_renoise = rules.guided(eps_u, eps_c, cfg_scale)
        else:
            eps_denoise, eps_renoise = eps_u, rules.guided(eps_u, eps_c, lam)
        x = rules.ddim_invert_step(x, eps_denoise, eps_renoise, a_from, a_to)
        levels[int(t)] = x
    return levels


def encode_image(pipe: Any, image: Any, device: Any) -> torch.Tensor:
    """The VAE latents of ``image`` (the mean of the posterior, scaled as the pipeline scales them);
    for a pixel-space pipeline (no ``vae``) the preprocessed pixels themselves."""
    vae = getattr(pipe, "vae", None)
    if vae is None:
        return pipe.image_processor.preprocess(image).to(device=device, dtype=pipe.unet.dtype)
    pixels = pipe.image_processor.preprocess(image).to(device=device, dtype=vae.dtype)
    latents = vae.encode(pixels).latent_dist.mean
    return latents * vae.config.scaling_factor


def conditioning(pipe: Any, prompt: Any, negative_prompt: Any, batch: int, latent_hw: Any, device: Any) -> dict:
    """The U-Net keywords of the pipeline's guided call for [negative, positive]."""
    if not isinstance(prompt, str) and len(prompt) != batch:
        raise ValueError(f"{len(prompt)} prompts for {batch} images; pass one prompt or one per image")
    per_prompt = batch if isinstance(prompt, str) else 1
    encoded = pipe.encode_prompt(
        prompt=prompt,
        device=device,
        num_images_per_prompt=per_prompt,
        do_classifier_free_guidance=True,
        negative_prompt=negative_prompt,
    )
    if len(encoded) == 2:  # SD 1.x / 2.x
        positive, negative = encoded
        return {"encoder_hidden_states": torch.cat([negative, positive])}
    positive, negative, pooled, negative_pooled = encoded  # SDXL
    if getattr(pipe.config, "requires_aesthetics_score", False):
        raise TypeError("hidiff.invert supports SDXL text-to-image pipelines (aesthetic-score conditioning is not)")
    scale = getattr(pipe, "vae_scale_factor", 8)
    size = (int(latent_hw[0]) * scale, int(latent_hw[1]) * scale)
    # The text-to-image pipeline's defaults: original size = target size = the image's, no crop.
    time_ids = torch.tensor([[*size, 0, 0, *size]], dtype=positive.dtype, device=device).repeat(2 * batch, 1)
    return {
        "encoder_hidden_states": torch.cat([negative, positive]),
        "added_cond_kwargs": {"text_embeds": torch.cat([negative_pooled, pooled]), "time_ids": time_ids},
    }
