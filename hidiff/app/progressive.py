"""Progressive generation: structure from a smaller image first, then detail at the target size.

The image is made at an intermediate size (with HiDiffusion), enlarged bicubically and
refined by image-to-image at the target size (with HiDiffusion), possibly over several
sizes. The schedule (where it starts, how strongly each enlargement is re-noised) was
chosen by measurement on the shipped toy model (docs/progressive.md: the sweep and the
table it was chosen from), not guessed.

:func:`run_progressive` is host-neutral: it takes a ``first(size)`` callable that makes
the first picture and a ``refine(size, picture, strength)`` callable that enlarges and
refines it. ``hidiff eval`` passes the toy pipeline's calls (method ``progressive``),
``hidiff generate --progressive`` passes diffusers pipelines (text-to-image, img2img or
ControlNet first, the matching img2img pipeline to refine; CFG++ on both), and
:func:`progressive` is the Python entry point for a diffusers pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

#: The measured default: the first picture at twice the native side (where direct HiDiffusion keeps
#: shapes), at most half the target's; one refinement at strength 0.5.
DEFAULT_START_SCALE = 2.0
MAX_START = 0.5
DEFAULT_STRENGTH = 0.5


def default_start(target: Size, native: Size) -> float:
    """The first picture's side over the target's: 2x native, at most half the target (docs/progressive.md)."""
    share = min(DEFAULT_START_SCALE * native[0] / target[0], DEFAULT_START_SCALE * native[1] / target[1])
    return min(MAX_START, share)


Size = tuple[int, int]  # (height, width)


def check_start(value: float) -> float:
    """A first-picture share: in (0, 1)."""
    if not 0.0 < value < 1.0:
        raise ValueError(f"must lie in (0, 1) (the first picture's side over the target's), got {value}")
    return value


@dataclass(frozen=True)
class Schedule:
    """The sizes of a progressive run, first to last (the last is the target), and the
    img2img strength of each refinement (one per size after the first)."""

    sizes: tuple[Size, ...]
    strengths: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.sizes) < 2:
            raise ValueError("a progressive schedule needs a first size and at least one larger size")
        if len(self.strengths) != len(self.sizes) - 1:
            raise ValueError(f"{len(self.sizes) - 1} refinements need as many strengths, got {len(self.strengths)}")
        for a, b in zip(self.sizes, self.sizes[1:]):
            if b[0] < a[0] or b[1] < a[1]:
                raise ValueError(f"progressive sizes must grow: {a[1]}x{a[0]} before {b[1]}x{b[0]}")
        for s in self.strengths:
            if not 0.0 < s <= 1.0:
                raise ValueError(f"a refinement strength must lie in (0, 1], got {s}")

    def to_dict(self) -> dict[str, Any]:
        return {"sizes": [list(s) for s in self.sizes], "strengths": list(self.strengths)}


def schedule(
    target: Size,
    multiple: int,
    start: float = MAX_START,
    strength: float = DEFAULT_STRENGTH,
    levels: int = 1,
) -> Schedule:
    """The schedule for ``target`` (height, width): the first picture at ``start`` times the
    target's side (rounded down to ``multiple``, at least one ``multiple``), then ``levels``
    refinements at sizes growing geometrically to the target, each at ``strength``."""
    check_start(start)
    if not isinstance(levels, int) or isinstance(levels, bool) or levels < 1:
        raise ValueError(f"levels (refinements) must be a whole number >= 1, got {levels!r}")
    sizes = []
    for k in range(levels + 1):
        share = start ** (1 - k / levels)  # start, ..., 1
        sizes.append(tuple(max(multiple, int(side * share) // multiple * multiple) for side in target))
    sizes[-1] = tuple(target)
    return Schedule(tuple(sizes), (strength,) * levels)  # type: ignore[arg-type]


def run_progressive(
    plan: Schedule,
    first: Callable[[Size], Any],
    refine: Callable[[Size, Any, float], Any],
    log: Optional[Callable[[str], None]] = None,
) -> Any:
    """The picture(s) of a progressive run: ``first(sizes[0])``, then ``refine(size, previous, strength)``
    for each later size."""
    picture = first(plan.sizes[0])
    for size, strength in zip(plan.sizes[1:], plan.strengths):
        if log is not None:
            log(f"progressive: refining to {size[1]}x{size[0]} at strength {strength}")
        picture = refine(size, picture, strength)
    return picture


# ------------------------------------------------------------------ diffusers pipelines
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
    plan: Schedule,
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
    import hidiff

    from ..diffusers.cfgpp import disable_cfgpp, enable_cfgpp

    images = list(pipe(**first_kwargs(plan.sizes[0])).images)
    patched = hidiff.is_patched(pipe)
    moved = "Img2Img" not in type(pipe).__name__
    refiner = pipe
    if moved:
        if patched:
            hidiff.remove_hidiffusion(pipe)
        if cfgpp is not None:
            disable_cfgpp(pipe)
    try:
        if moved:
            refiner = refiner_for(pipe)
            if cfgpp is not None:
                enable_cfgpp(refiner, scheduler=cfgpp[0], guidance=cfgpp[1])
            hidiff.apply_hidiffusion(refiner, config=config)
        for size, strength in zip(plan.sizes[1:], plan.strengths):
            big = [image.resize((size[1], size[0]), _bicubic()) for image in images]
            images = list(refiner(**refine_kwargs(refiner, size, big, strength)).images)
        record = hidiff.last_call(refiner) if hidiff.is_patched(refiner) else None
    finally:
        if moved:
            if hidiff.is_patched(refiner):
                hidiff.remove_hidiffusion(refiner)
            if cfgpp is not None:
                disable_cfgpp(refiner)
                enable_cfgpp(pipe, scheduler=cfgpp[0], guidance=cfgpp[1])
            if patched:
                hidiff.apply_hidiffusion(pipe, config=config)
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

    import hidiff

    patched = hidiff.is_patched(pipe)
    if patched and config is None:
        config = hidiff.get_patch(pipe).config
    control = kwargs.pop("image", None) if getattr(pipe, "controlnet", None) is not None else None
    factor = int(getattr(pipe, "vae_scale_factor", 8))
    if start is None:
        native = int(pipe.unet.config.sample_size) * factor
        start = default_start((height, width), (native, native))
    plan = schedule((height, width), 8 * factor, start=start, strength=strength, levels=levels)

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
        hidiff.enable_cfgpp(pipe, scheduler=cfgpp[0], guidance=cfgpp[1])
    if not patched:
        hidiff.apply_hidiffusion(pipe, config=config)
    try:
        images, _ = run_diffusers(pipe, plan, first, refine, config, cfgpp)
    finally:
        if not patched and hidiff.is_patched(pipe):
            hidiff.remove_hidiffusion(pipe)
    return images
