"""Running a configured pipeline for a request: one timed call (or the passes of a progressive run),
and what it gave (:class:`Run`)."""

from __future__ import annotations

import dataclasses
import inspect
import time
from dataclasses import dataclass
from typing import Any, Optional

import torch

from ..core.progressive import DEFAULT_STRENGTH
from .pipeline import call_kwargs
from .request import Request


@dataclass
class Run:
    """One pipeline call: its images, time, peak memory, HiDiffusion preset and scheduler class."""

    images: list
    seconds: float
    peak_bytes: int
    preset: Optional[str]
    scheduler: str
    memory: Optional[dict] = None  # the memory plan (what was turned on to fit), when generate made one
    progressive: Optional[dict] = None  # the schedule of a --progressive run


def run_pipeline(
    request: Request,
    pipe: Any,
    images: dict,
    device: torch.device,
    label: str,
    quiet: bool,
    memory_plan: Optional[dict] = None,
) -> Run:
    """Call the pipeline once for ``request`` (a progressive run: all its passes), timed and its peak
    memory taken; ``label`` names the progress bar."""
    import hidiff

    from .timing import PeakMemory

    pipe.set_progress_bar_config(desc=label, disable=quiet)
    schedule, preset = None, None
    with PeakMemory(device) as memory:
        start = time.perf_counter()
        if request.progressive:
            pictures, preset, schedule = progressive_images(request, pipe, images)
        else:
            pictures = list(pipe(**call_kwargs(request, pipe, images)).images)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
    record = hidiff.last_call(pipe) if hidiff.is_patched(pipe) and not request.progressive else None
    return Run(
        pictures,
        seconds,
        memory.peak,
        record.preset if record else preset,
        type(pipe.scheduler).__name__,
        memory=memory_plan,
        progressive=schedule,
    )


def progressive_images(request: Request, pipe: Any, images: dict) -> tuple[list, Optional[str], dict]:
    """The images of a ``--progressive`` request, the preset of its last pass, and its schedule
    (:mod:`hidiff.diffusers.progressive`)."""
    from PIL import Image

    import hidiff

    from ..core.progressive import default_start, schedule
    from ..diffusers.progressive import run_diffusers

    factor = int(getattr(pipe, "vae_scale_factor", 8))
    layout = hidiff.detect_architecture(pipe.unet)
    native = (factor * layout.native[0], factor * layout.native[1])
    start = request.progressive_start
    if start is None:
        start = default_start((request.height, request.width), native)
    strength = request.progressive_strength if request.progressive_strength is not None else DEFAULT_STRENGTH
    passes = schedule((request.height, request.width), 8 * factor, start=start, strength=strength)

    def first(size: tuple[int, int]) -> dict:
        return call_kwargs(dataclasses.replace(request, height=size[0], width=size[1]), pipe, images)

    def refine(refiner: Any, size: tuple[int, int], big: list, s: float) -> dict:
        n = len(big)
        kwargs: dict[str, Any] = dict(
            prompt=[request.prompt] * n,
            negative_prompt=[request.negative_prompt] * n if request.negative_prompt else None,
            num_inference_steps=request.steps,
            guidance_scale=request.guidance,
            generator=[torch.Generator("cpu").manual_seed(request.seed + k) for k in range(n)],
            image=big,
            strength=s,
        )
        params = inspect.signature(refiner.__call__).parameters
        if "height" in params:
            kwargs.update(height=size[0], width=size[1])
        if request.controlnet:
            kwargs["control_image"] = images["control_image"].resize((size[1], size[0]), Image.LANCZOS)
            kwargs["controlnet_conditioning_scale"] = request.controlnet_scale
        return kwargs

    cfgpp = (request.scheduler, request.cfgpp) if request.cfgpp is not None else None
    config = request.config if request.hidiff else None
    pictures, preset = run_diffusers(pipe, passes, first, refine, config, cfgpp)
    return pictures, preset, passes.to_dict()
