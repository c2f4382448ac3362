"""Image editing by inversion: ``hidiff.edit(pipe, image, source_prompt, target_prompt)``.

The picture is inverted with DDIM under the source prompt for the last ``strength`` share of
an ``num_inference_steps``-step schedule (CFG++ inversion by default: the clean estimate
with the unconditional prediction, the re-noising with the guided one, so it undoes a
CFG++ DDIM step), and sampled back from there with the target prompt by a CFG++ sampler.
What the prompts share is kept by the inversion; what differs is redrawn. A mask (white:
may change) confines the change: after every sampling step the unmasked part is put back
to the inversion's latents at that noise level, so the unmasked part of the result is the
clean latents of the input.

``cfg_scale=w`` instead of ``guidance=lam`` runs the same with ordinary CFG both ways (the
comparison of docs/cfgpp.md). HiDiffusion is applied for the run when the picture is larger
than the model's native size (``hidiffusion=None``), and removed after; the pipeline's
scheduler is put back exactly, also after an exception.
"""

from __future__ import annotations

import inspect
import numbers
from typing import Any, Optional

import torch

from ..core.cfgpp import SAMPLERS
from .cfgpp import cfgpp_settings, disable_cfgpp, enable_cfgpp, stock_scheduler
from .inversion import inversion
from .model import find_unet
from .patch import apply_hidiffusion, get_patch, remove_hidiffusion

#: Share of the schedule that is inverted and re-sampled by default.
DEFAULT_STRENGTH = 0.6
#: CFG++ lam of an edit by default: lighter than sampling's 0.6, which on the toy model moved
#: the object more for the same success (docs/cfgpp.md, "Editing").
DEFAULT_EDIT_GUIDANCE = 0.3
#: Samplers whose sample is x0 + sigma * eps (the inversion's latents are scaled into that form).
SIGMA_FORM = ("euler", "euler-a")


class EditOutput:
    """``images``: the edited picture(s) (``output_type`` "pil": a list of PIL images; "pt":
    B x 3 x H x W in [0, 1]); ``steps``: the sampling steps run (strength x num_inference_steps)."""

    def __init__(self, images: Any, steps: int) -> None:
        self.images, self.steps = images, steps


def edited_steps(num_inference_steps: int, strength: float) -> int:
    """The steps inverted and re-sampled: round(strength x steps), at least 1."""
    return max(1, min(num_inference_steps, int(round(num_inference_steps * strength))))


def _check_prompt(name: str, prompt: Any) -> str:
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"{name} must be a non-empty string (the picture's description), got {prompt!r}")
    return prompt


def _size_multiple(pipe: Any, unet: Any) -> int:
    if getattr(pipe, "vae", None) is not None:
        return int(getattr(pipe, "vae_scale_factor", 8))
    return 2 ** (len(unet.config.block_out_channels) - 1)  # pixel space: the U-Net's own downsampling


def _image_tensor(image: Any, multiple: int) -> torch.Tensor:
    """The picture as 1 x 3 x H x W in [0, 1]; a clear error for a wrong mode, shape, range or size."""
    if hasattr(image, "convert") and hasattr(image, "mode"):  # PIL
        if image.mode != "RGB":
            raise ValueError(f"image must be an RGB picture, got PIL mode {image.mode!r}: pass image.convert('RGB')")
        import numpy as np

        tensor = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    elif isinstance(image, torch.Tensor):
        tensor = image[None] if image.ndim == 3 else image
        if tensor.ndim != 4 or tensor.shape[:2] != (1, 3):
            raise ValueError(f"image must be one RGB picture, 3 x H x W or 1 x 3 x H x W, got {tuple(image.shape)}")
        tensor = tensor.float()
        if not torch.isfinite(tensor).all() or tensor.min() < 0 or tensor.max() > 1:
            raise ValueError("an image tensor must hold values in [0, 1] (not [-1, 1] or 0-255)")
    else:
        raise TypeError(f"image must be a PIL image or a tensor, got {type(image).__name__}")
    h, w = tensor.shape[-2:]
    if h % multiple or w % multiple:
        raise ValueError(
            f"image is {w}x{h}; this pipeline needs sides that are multiples of {multiple}: resize or crop it "
            f"(e.g. to {w // multiple * multiple or multiple}x{h // multiple * multiple or multiple})"
        )
    return tensor


def _mask_tensor(mask: Any, height: int, width: int) -> torch.Tensor:
    """The mask as 1 x 1 x H x W in [0, 1] (white 1: may change)."""
    if hasattr(mask, "convert") and hasattr(mask, "mode"):
        import numpy as np

        tensor = torch.from_numpy(np.asarray(mask.convert("L"), dtype=np.float32) / 255.0)
    elif isinstance(mask, torch.Tensor):
        tensor = mask.float()
    else:
        raise TypeError(f"mask must be a PIL image or a tensor, got {type(mask).__name__}")
    while tensor.ndim > 2 and tensor.shape[0] == 1:
        tensor = tensor[0]
    if tensor.ndim != 2:
        raise ValueError(f"mask must be one channel, H x W (or 1 x H x W), got shape {tuple(tensor.shape)}")
    if tuple(tensor.shape) != (height, width):
        raise ValueError(
            f"mask is {tensor.shape[1]}x{tensor.shape[0]} but the image is {width}x{height}; pass a mask of the "
            "image's size"
        )
    if not torch.isfinite(tensor).all() or tensor.min() < 0 or tensor.max() > 1:
        raise ValueError("a mask tensor must hold values in [0, 1] (1: may change)")
    return tensor[None, None]


def _check_number(name: str, value: Any, low: float, high: float, low_open: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {value!r}")
    ok = (low < value if low_open else low <= value) and value <= high
    if not ok:
        bracket = "(" if low_open else "["
        raise ValueError(f"{name} must be in {bracket}{low}, {high}], got {value!r}")
    return float(value)


@torch.no_grad()
def edit(
    pipe: Any,
    image: Any,
    source_prompt: str,
    target_prompt: str,
    *,
    strength: float = DEFAULT_STRENGTH,
    num_inference_steps: int = 50,
    guidance: Optional[float] = None,
    cfg_scale: Optional[float] = None,
    sampler: str = "ddim",
    mask: Any = None,
    negative_prompt: Optional[str] = None,
    hidiffusion: Optional[bool] = None,
    generator: Optional[torch.Generator] = None,
    output_type: str = "pil",
) -> EditOutput:
    """Edit ``image`` from ``source_prompt`` (what it shows) to ``target_prompt``.

    Args:
        pipe: a text-to-image Stable Diffusion pipeline (SD 1.x / 2.x / SDXL), or a pixel-space
            one with the same interface (hidiff's toy model).
        image: one RGB picture: a PIL image, or a 3 x H x W tensor in [0, 1].
        strength: share of the schedule inverted and re-sampled, in (0, 1]: the edit runs
            round(strength x num_inference_steps) steps. Higher changes more.
        num_inference_steps: the length of the schedule the edit is a part of.
        guidance: CFG++ lam in [0, 1] for the inversion and the sampling (default 0.3).
        cfg_scale: ordinary CFG at this scale both ways instead of CFG++ (not with ``guidance``).
        sampler: ``"ddim"`` (the exact counterpart of the inversion), ``"euler"``,
            ``"euler-a"`` (stochastic: uses ``generator``) or ``"dpmpp-2m"``.
        mask: where the picture may change (white 1, black 0; PIL image or H x W tensor in
            [0, 1], the image's size); elsewhere the result keeps the input.
        negative_prompt: the unconditional prompt of both passes (default: the empty prompt).
        hidiffusion: None (default): applied when the picture is larger than the model's
            native size; True / False: on / off. A pipeline already patched stays as it is.
        output_type: ``"pil"`` or ``"pt"``.

    Returns an :class:`EditOutput`. Bad input raises before the pipeline is touched.
    """
    unet = _edited_unet(pipe)
    _check_prompt("source_prompt", source_prompt)
    _check_prompt("target_prompt", target_prompt)
    strength, guidance, cfg_scale = _check_options(
        strength, num_inference_steps, guidance, cfg_scale, sampler, output_type, hidiffusion
    )
    pixels = _image_tensor(image, _size_multiple(pipe, unet))
    height, width = pixels.shape[-2:]
    mask_t = _mask_tensor(mask, height, width) if mask is not None else None
    steps = edited_steps(num_inference_steps, strength)
    sampling = _sampling_scheduler(pipe.scheduler, sampler, guidance, cfg_scale, num_inference_steps, steps)
    apply = _applies_hidiffusion(pipe, unet, hidiffusion, max(height, width))
    if apply:
        apply_hidiffusion(pipe)
    try:
        inv = inversion(pipe, pixels, source_prompt, negative_prompt, guidance, cfg_scale, num_inference_steps, steps)
        x = _sample(
            pipe, unet, inv, (sampler, sampling), target_prompt, negative_prompt, guidance, cfg_scale, mask_t, generator
        )
    finally:
        if apply:
            remove_hidiffusion(pipe)
    return EditOutput(_decode(pipe, x, output_type), steps)


def _edited_unet(pipe: Any) -> Any:
    """The U-Net of a pipeline hidiff.edit can run on (TypeError / ValueError saying why not)."""
    unet, found_pipe = find_unet(pipe)
    if found_pipe is None:
        raise TypeError(f"hidiff.edit needs the pipeline (unet, scheduler, text encoder), not {type(pipe).__name__}")
    if not hasattr(pipe, "encode_prompt") or not hasattr(pipe, "image_processor"):
        raise TypeError(
            f"{type(pipe).__name__} has no encode_prompt / image_processor; hidiff.edit needs an SD pipeline"
        )
    if cfgpp_settings(pipe) is not None:
        raise ValueError(
            "CFG++ is on for this pipeline (hidiff.enable_cfgpp); hidiff.edit sets its own sampler: call "
            "hidiff.disable_cfgpp(pipe) first and pass sampler= and guidance= to hidiff.edit"
        )
    return unet


def _check_options(
    strength: Any,
    num_inference_steps: Any,
    guidance: Any,
    cfg_scale: Any,
    sampler: Any,
    output_type: Any,
    hidiffusion: Any,
) -> tuple[float, Optional[float], Optional[float]]:
    """(strength, guidance, cfg_scale) checked, the default lam filled in; ValueError / TypeError otherwise."""
    strength = _check_number("strength", strength, 0.0, 1.0, low_open=True)
    if not isinstance(num_inference_steps, int) or isinstance(num_inference_steps, bool) or num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be a positive int, got {num_inference_steps!r}")
    if guidance is not None and cfg_scale is not None:
        raise ValueError("pass guidance (CFG++ lam) or cfg_scale (ordinary CFG), not both")
    if cfg_scale is not None:
        cfg_scale = _check_number("cfg_scale", cfg_scale, 1.0, float("inf"), low_open=False)
    else:
        guidance = _check_number("guidance", DEFAULT_EDIT_GUIDANCE if guidance is None else guidance, 0.0, 1.0, False)
    if not isinstance(sampler, str) or sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if output_type not in ("pil", "pt"):
        raise ValueError(f"output_type must be 'pil' or 'pt', got {output_type!r}")
    if hidiffusion not in (None, True, False):
        raise TypeError(f"hidiffusion must be None (automatic), True or False, got {hidiffusion!r}")
    return strength, guidance, cfg_scale


def _applies_hidiffusion(pipe: Any, unet: Any, hidiffusion: Optional[bool], side: int) -> bool:
    """Whether the edit applies HiDiffusion for its run: asked for, or (None) above the native size;
    never over a patch already there, which stays as it is."""
    patched = get_patch(unet) is not None
    if hidiffusion is False and patched:
        raise ValueError(
            "hidiffusion=False but HiDiffusion is applied to this pipeline: remove_hidiffusion(pipe) first"
        )
    native = int(unet.config.sample_size) * (_size_multiple(pipe, unet) if getattr(pipe, "vae", None) else 1)
    return not patched and (hidiffusion if hidiffusion is not None else side > native)


def _sampling_scheduler(
    scheduler: Any, sampler: str, guidance: Any, cfg_scale: Any, num_inference_steps: int, steps: int
) -> Any:
    """A fresh stock scheduler of ``sampler`` from the pipeline's config, checked to take DDIM's timesteps."""
    ddim = stock_scheduler("ddim", scheduler.config)
    ddim.set_timesteps(num_inference_steps)
    # the sampler continues the inversion: it must take DDIM's timesteps (diffusers' other
    # schedulers have other spacing defaults, which from_config would fall back to)
    spacing = {name: ddim.config[name] for name in ("timestep_spacing", "steps_offset")}
    config = {k: v for k, v in scheduler.config.items() if k != "_use_default_values"}  # it would drop them again
    built = stock_scheduler(sampler, {**config, **spacing})
    if not _set_timesteps(built, ddim.timesteps, None):
        raise ValueError(
            f"with this scheduler config, {sampler!r} does not sample at DDIM's timesteps, so it cannot continue a DDIM "
            "inversion: use sampler='ddim', or a config with timestep_spacing 'trailing'"
        )
    return built


def _set_timesteps(scheduler: Any, timesteps: torch.Tensor, device: Any) -> bool:
    """Set ``scheduler`` to the DDIM ``timesteps`` (its own spacing, or else given explicitly); whether it took them."""
    scheduler.set_timesteps(len(timesteps), device=device)
    if _same(scheduler.timesteps, timesteps):
        return True
    if "timesteps" in inspect.signature(scheduler.set_timesteps).parameters:  # DPM-Solver: another leading spacing
        scheduler.set_timesteps(timesteps=[int(t) for t in timesteps], device=device)
    return _same(scheduler.timesteps, timesteps) and getattr(scheduler, "order", 1) == 1


def _same(ours: torch.Tensor, ddim: torch.Tensor) -> bool:
    return len(ours) == len(ddim) and torch.equal(ours.cpu().round().long(), ddim.cpu().long())


def _sample(
    pipe: Any,
    unet: Any,
    inv: Any,
    sampling: tuple[str, Any],
    prompt: str,
    negative_prompt: Any,
    guidance: Any,
    cfg_scale: Any,
    mask: Optional[torch.Tensor],
    generator: Any,
) -> torch.Tensor:
    """The last ``len(inv.levels)`` steps of the schedule from the inverted latents, with the target prompt."""
    from .inversion import conditioning

    sampler, stock = sampling
    device = getattr(pipe, "_execution_device", None) or unet.device
    latents = inv.latents
    kwargs = conditioning(pipe, prompt, negative_prompt, latents.shape[0], latents.shape[-2:], device)
    if mask is not None:
        mask = torch.nn.functional.interpolate(mask, size=tuple(latents.shape[-2:]), mode="area").to(device)
    original = pipe.scheduler
    try:
        pipe.scheduler = stock  # what CFG++ is built from, or (ordinary CFG) the sampler itself
        if cfg_scale is None:
            enable_cfgpp(pipe, sampler, guidance)
        scheduler = pipe.scheduler
        _set_timesteps(scheduler, stock.timesteps, device)  # checked in _sampling_scheduler
        timesteps = scheduler.timesteps
        start = len(timesteps) - len(inv.levels)
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(start)
        sigma_form = sampler in SIGMA_FORM
        extra = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}

        def scaled(vp: torch.Tensor, index: int) -> torch.Tensor:  # VP latents in the sampler's form
            return vp * (1 + scheduler.sigmas[index].float() ** 2) ** 0.5 if sigma_form else vp

        x = scaled(latents, start).to(unet.dtype)
        for i in range(start, len(timesteps)):
            t = timesteps[i]
            model_in = scheduler.scale_model_input(torch.cat([x, x]), t)
            out = unet(model_in, t, return_dict=False, **kwargs)[0]
            uncond, cond = out.chunk(2)
            combined = uncond + (cfg_scale if cfg_scale is not None else 1.0) * (cond - uncond)
            x = scheduler.step(combined, t, x, **extra).prev_sample
            if mask is not None:
                ref = inv.levels[int(timesteps[i + 1])] if i + 1 < len(timesteps) else inv.clean
                x = (mask * x.float() + (1 - mask) * scaled(ref, i + 1)).to(x.dtype)
    finally:
        if cfg_scale is None:
            disable_cfgpp(pipe)
        pipe.scheduler = original
    return x


def _decode(pipe: Any, x: torch.Tensor, output_type: str) -> Any:
    vae = getattr(pipe, "vae", None)
    if vae is not None:
        x = vae.decode(x.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
    pictures = (x.float().clamp(-1, 1) + 1) / 2
    if output_type == "pt":
        return pictures.cpu()
    return pipe.image_processor.numpy_to_pil(pictures.permute(0, 2, 3, 1).cpu().numpy())


__all__ = ["edit", "EditOutput", "edited_steps", "DEFAULT_STRENGTH", "DEFAULT_EDIT_GUIDANCE"]
