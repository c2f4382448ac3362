"""Progressive generation on diffusers pipelines: :func:`progressive` (``hidiff.progressive``).

The schedule (sizes, strengths) comes from :mod:`hidiff.core.progressive`; here each pass runs
on a pipeline: the first on the given one, the refinements on the matching image-to-image
pipeline built from the same components, with HiDiffusion and CFG++ moved onto it and back.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from ..core.progressive import DEFAULT_STRENGTH, Schedule, Size, default_start, schedule
from .cfgpp import disable_cfgpp, enable_cfgpp
from .patch import apply_hidiffusion, get_patch, is_patched, last_call, remove_hidiffusion


def refiner_for(pipe: Any) -> Any:
    """The image-to-image pipeline sharing ``pipe``'s components (ControlNet img2img for a ControlNet pipeline)."""
    from diffusers import AutoPipelineForImage2Image

    if "Img2Img" in type(pipe).__name__:
        return pipe
    refiner = AutoPipelineForImage2Image.from_pipe(pipe)
    refiner.set_progress_bar_config(**getattr(pipe, "_progress_bar_config", {}))
    return refiner


def run_diffusers(
    pipe: Any,
    passes: Schedule,
    first_kwargs: Callable[[Size], dict],
    refine_kwargs: Callable[[Any, Size, list, float], dict],
    config: Any,
    cfgpp: Optional[tuple[str, float]] = None,
) -> tuple[list, Optional[str]]:
    """A progressive run on a diffusers pipeline: ``pipe(**first_kwargs(size))`` at the first size, then
    each refinement by the matching img2img pipeline (``refiner(**refine_kwargs(refiner, size, images, strength))``) (the same components) on the previous images
    enlarged bicubically, HiDiffusion (``config``) and CFG++ (``cfgpp``: sampler, lambda) on every pass.
    ``pipe`` is left as it was given: HiDiffusion and CFG++ are moved to the refiner and back.
    Returns the images and the HiDiffusion preset of the last refinement's last call."""
    images = list(pipe(**first_kwargs(passes.sizes[0])).images)
    patched = is_patched(pipe)
    moved = "Img2Img" not in type(pipe).__name__
    refiner = pipe
    if moved:
        if patched:
            remove_hidiffusion(pipe)
        if cfgpp is not None:
            disable_cfgpp(pipe)
    try:
        if moved:
            refiner = refiner_for(pipe)
            if cfgpp is not None:
                enable_cfgpp(refiner, scheduler=cfgpp[0], guidance=cfgpp[1])
            apply_hidiffusion(refiner, config=config)
        for size, strength in zip(passes.sizes[1:], passes.strengths):
            big = [image.resize((size[1], size[0]), _bicubic()) for image in images]
            images = list(refiner(**refine_kwargs(refiner, size, big, strength)).images)
        record = last_call(refiner) if is_patched(refiner) else None
    finally:
        if moved:
            if is_patched(refiner):
                remove_hidiffusion(refiner)
            if cfgpp is not None:
                disable_cfgpp(refiner)
                enable_cfgpp(pipe, scheduler=cfgpp[0], guidance=cfgpp[1])
            if patched:
                apply_hidiffusion(pipe, config=config)
    return images, record.preset if record else None


def _bicubic() -> Any:
    from PIL import Image

    return Image.BICUBIC


def progressive(
    pipe: Any,
    prompt: Any,
    height: int,
    width: int,
    start: Optional[float] = None,
    strength: float = DEFAULT_STRENGTH,
    levels: int = 1,
    config: Any = None,
    cfgpp: Optional[tuple[str, float]] = None,
    seed: Optional[int] = None,
    **kwargs: Any,
) -> list:
    """Progressive generation with a diffusers text-to-image (or ControlNet) pipeline: ``prompt`` at
    ``height`` x ``width``, first at ``start`` of the side (default: :func:`default_start`), then refined
    by img2img at ``strength``.

    HiDiffusion (``config``, or the pipeline's own options if it is patched) runs in every pass and is
    removed after the run unless the pipeline was patched before; ``cfgpp`` (sampler, lambda) samples
    every pass with CFG++ (a pipeline with CFG++ on must pass it, so that the refiner gets it too).
    ``kwargs`` go to every pass (``num_inference_steps``, ``guidance_scale``, ``negative_prompt``...);
    a ControlNet pipeline's conditioning image goes in as ``image`` and is resized for each pass.
    ``seed`` makes each pass draw its noise from ``torch.Generator().manual_seed(seed)``. Returns the
    images (PIL)."""
    import torch

    patched = is_patched(pipe)
    if patched and config is None:
        config = get_patch(pipe).config
    control = kwargs.pop("image", None) if getattr(pipe, "controlnet", None) is not None else None
    factor = int(getattr(pipe, "vae_scale_factor", 8))
    if start is None:
        native = int(pipe.unet.config.sample_size) * factor
        start = default_start((height, width), (native, native))
    passes = schedule((height, width), 8 * factor, start=start, strength=strength, levels=levels)

    def generator() -> dict:
        return {"generator": torch.Generator().manual_seed(seed)} if seed is not None else {}

    def sized(size: Size) -> Any:
        return control.resize((size[1], size[0]), _bicubic()) if control is not None else None

    def first(size: Size) -> dict:
        extra = {"image": sized(size)} if control is not None else {}
        return dict(prompt=prompt, height=size[0], width=size[1], **kwargs, **extra, **generator())

    def refine(refiner: Any, size: Size, images: list, s: float) -> dict:
        prompts = [prompt] * len(images) if isinstance(prompt, str) else list(prompt)
        extra = {"control_image": sized(size)} if control is not None else {}
        rest = {k: v for k, v in kwargs.items() if k != "num_images_per_prompt"}
        return dict(prompt=prompts, image=images, strength=s, **rest, **extra, **generator())

    if cfgpp is not None:
        enable_cfgpp(pipe, scheduler=cfgpp[0], guidance=cfgpp[1])
    if not patched:
        apply_hidiffusion(pipe, config=config)
    try:
        images, _ = run_diffusers(pipe, passes, first, refine, config, cfgpp)
    finally:
        if not patched and is_patched(pipe):
            remove_hidiffusion(pipe)
    return images
