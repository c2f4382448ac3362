"""The pipeline of a request: loaded as :mod:`hidiff.app.loading` loads models, then set up for the
request (every unset value made concrete, the scheduler, CFG++, the memory plan), and the arguments
of its call."""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Optional

import torch

from .args import UsageError, denoising_steps
from .inputs import checked_inputs
from .loading import load_pipeline, quiet_libraries, resolve_device, set_scheduler
from .request import Request, with_seed
from .validation import check_size


def prepare(request: Request, images: Optional[dict] = None) -> tuple[Request, Any, Any, dict, torch.device, Any]:
    """Check (unless ``images``, what :func:`~hidiff.app.inputs.checked_inputs` returned, are given), load
    and configure: (resolved request, pipeline, layout, input images, device, memory plan)."""
    if images is None:
        images = checked_inputs(request)
    pipe, layout, device = load(request)
    request, memory_plan = configure(request, pipe, layout, images, device)
    return request, pipe, layout, images, device, memory_plan


def load(request: Request) -> tuple[Any, Any, torch.device]:
    """The pipeline a request needs, on its device: (pipeline, layout, device)."""
    device, dtype = resolve_device(request.device, request.dtype)
    quiet_libraries()
    pipe, layout = load_pipeline(request.model, request.config_folder, request.controlnet, request.task, dtype)
    pipe.to(device)
    return pipe, layout, device


def configure(request: Request, pipe: Any, layout: Any, images: dict, device: torch.device) -> tuple[Request, Any]:
    """A loaded pipeline set up for a request (scheduler, CFG++, memory plan): the resolved request and
    the memory plan it applied (:class:`~hidiff.app.memory_plan.MemoryPlan`)."""
    from .memory_plan import apply_memory_plan, make_memory_plan

    request = resolve(request, pipe, layout, images)
    if request.strength is not None:  # the model's default steps or strength
        denoising_steps(request.steps, request.strength)
    set_scheduler(pipe, request.scheduler)
    if request.cfgpp is not None:
        _enable_cfgpp(pipe, request)
    memory_plan = make_memory_plan(
        pipe,
        layout,
        device,
        request.width,
        request.height,
        request.batch,
        request.config if request.hidiff else None,
        request.steps,
        guidance=request.guidance is not None and request.guidance > 1,
        vae_tiling=request.vae_tiling,
        budget_flag=request.memory_budget,
        free=free_memory_bytes(device),
    )
    apply_memory_plan(pipe, memory_plan, device)
    return request, memory_plan


def _enable_cfgpp(pipe: Any, request: Request) -> None:
    from ..diffusers.cfgpp import enable_cfgpp

    try:
        enable_cfgpp(pipe, scheduler=request.scheduler, guidance=request.cfgpp)
    except (TypeError, ValueError) as error:  # a model or scheduler CFG++ cannot run on
        raise UsageError(f"--cfgpp: {error}") from None


def resolve(request: Request, pipe: Any, layout: Any, images: dict) -> Request:
    """Every unset value made concrete (so that the metadata re-runs exactly)."""
    factor = int(getattr(pipe, "vae_scale_factor", 8))
    width, height = request.width, request.height
    source = images.get("image") or images.get("control_image")
    if source is not None:  # the input's size, rounded down to the VAE's multiple
        width = width or max(factor, source.width // factor * factor)
        height = height or max(factor, source.height // factor * factor)
    width = width or 2 * factor * layout.native[1]  # HiDiffusion's purpose: above the native size
    height = height or 2 * factor * layout.native[0]
    check_size(width, height, factor)
    defaults = inspect.signature(pipe.__call__).parameters

    def default(name: str) -> Any:
        return defaults[name].default if name in defaults else None

    return dataclasses.replace(
        request,
        width=width,
        height=height,
        steps=request.steps or default("num_inference_steps"),
        guidance=request.guidance if request.guidance is not None else default("guidance_scale"),
        strength=(request.strength if request.strength is not None else default("strength"))
        if request.task != "text2img"
        else None,
        controlnet_scale=(
            request.controlnet_scale
            if request.controlnet_scale is not None
            else default("controlnet_conditioning_scale")
        )
        if request.controlnet
        else None,
        seed=with_seed(request).seed,
    )


def call_kwargs(request: Request, pipe: Any, images: dict) -> dict[str, Any]:
    """Arguments of the pipeline call; input images resized to the output size."""
    from PIL import Image

    size = (request.width, request.height)
    sized = {k: v if v.size == size else v.resize(size, Image.LANCZOS) for k, v in images.items()}
    kwargs: dict[str, Any] = dict(
        prompt=request.prompt,
        negative_prompt=request.negative_prompt or None,
        num_inference_steps=request.steps,
        guidance_scale=request.guidance,
        num_images_per_prompt=request.batch,
        # one CPU generator per image: image k has seed + k on every device
        generator=[torch.Generator("cpu").manual_seed(request.seed + k) for k in range(request.batch)],
    )
    params = inspect.signature(pipe.__call__).parameters
    if "height" in params:  # SD img2img takes its size from the image
        kwargs.update(height=request.height, width=request.width)
    if request.task != "text2img":
        kwargs.update(image=sized["image"], strength=request.strength)
    if request.task == "inpaint":
        kwargs["mask_image"] = sized["mask"]
    if request.controlnet:
        kwargs["image" if request.task == "text2img" else "control_image"] = sized["control_image"]
        kwargs["controlnet_conditioning_scale"] = request.controlnet_scale
    return kwargs


def free_memory_bytes(device: torch.device) -> Optional[int]:
    """Memory a decode could still take on ``device`` (None: unknown)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type == "mps":
        mps = torch.mps
        if hasattr(mps, "recommended_max_memory") and hasattr(mps, "driver_allocated_memory"):
            return mps.recommended_max_memory() - mps.driver_allocated_memory()
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
