"""``hidiff generate``: images from a Stable Diffusion model with HiDiffusion, each PNG able to re-run itself.

The model (hub id, local diffusers folder or single ``.safetensors``/``.ckpt`` file) is
loaded as it is, its family read from the U-Net's structure, and the pipeline class
picked from the inputs (text-to-image, img2img, inpaint, each with or without a
ControlNet). Every PNG carries an A1111-style ``parameters`` text chunk and a ``hidiff``
JSON chunk holding the whole :class:`Request` and HiDiffusion config, so that
``hidiff generate --from-image FILE`` re-runs it.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import inspect
import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, get_args, get_type_hints

import torch

from ..core.config import HiDiffusionConfig
from ..core.progressive import DEFAULT_STRENGTH, check_start
from .args import (
    AUTO,
    CFGPP_SCHEDULERS,
    DTYPES,
    SCHEDULERS,
    SEED_MAX,
    VAE_TILING,
    UsageError,
    add_config_flags,
    cfgpp_lambda,
    check_value,
    config_from_args,
    denoising_steps,
    finite,
    flag,
    image_side,
    img2img_strength,
    png_path,
    positive,
    seed,
    side_multiple_of,
)
from .loading import load_pipeline, quiet_libraries, resolve_device, set_scheduler
from .memory_plan import check_budget

METADATA_KEY = "hidiff"


@dataclass
class Request:
    """Everything that determines the images: what the ``hidiff`` PNG chunk stores and re-runs."""

    model: str
    prompt: str = ""
    negative_prompt: str = ""
    width: Optional[int] = None
    height: Optional[int] = None
    steps: Optional[int] = None
    guidance: Optional[float] = None
    seed: Optional[int] = None
    scheduler: Optional[str] = None  # a SCHEDULERS name; None keeps the model's own
    batch: int = 1
    image: Optional[str] = None
    mask: Optional[str] = None
    strength: Optional[float] = None
    controlnet: Optional[str] = None
    control_image: Optional[str] = None
    controlnet_scale: Optional[float] = None
    config_folder: Optional[str] = None  # component configs for single-file checkpoints
    hidiff: bool = True
    hidiff_config: dict = field(default_factory=dict)
    cfgpp: Optional[float] = None
    device: str = AUTO
    dtype: str = AUTO
    vae_tiling: str = AUTO
    memory_budget: Optional[str] = None  # e.g. "8GB"; None: $HIDIFF_MEMORY_BUDGET, else the device's free memory
    progressive: bool = False
    progressive_start: Optional[float] = None  # the first picture's side over the target's
    progressive_strength: Optional[float] = None  # img2img strength of the refinement

    @property
    def task(self) -> str:
        return "inpaint" if self.mask else "img2img" if self.image else "text2img"

    @property
    def config(self) -> HiDiffusionConfig:
        return HiDiffusionConfig.from_options(**self.hidiff_config)


#: The check of each numeric Request field: the type of its flag, and run again on values read
#: back from a PNG's metadata.
CHECKS: dict[str, Any] = {
    "width": image_side,
    "height": image_side,
    "steps": positive,
    "batch": positive,
    "guidance": finite,
    "seed": seed,
    "strength": img2img_strength,
    "controlnet_scale": finite,
    "cfgpp": cfgpp_lambda,
    "progressive_start": check_start,
    "progressive_strength": img2img_strength,
    "memory_budget": check_budget,
}
#: The choices of each Request field that has them.
CHOICES: dict[str, tuple[str, ...]] = {
    "scheduler": tuple(SCHEDULERS),
    "dtype": (AUTO, *DTYPES),
    "vae_tiling": VAE_TILING,
}


def _flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def _typed(name: str) -> Any:
    """The argparse type of a Request field's flag."""
    return flag(CHECKS[name], _kind(get_type_hints(Request)[name]))


# ------------------------------------------------------------------ the command line
def add_arguments(gen: argparse.ArgumentParser) -> None:
    """The ``hidiff generate`` flags; each Request field but the config has one of the same name (its dest)."""
    model = gen.add_argument_group("model and inputs")
    model.add_argument("--model", help="hub id, local diffusers folder, or a single .safetensors/.ckpt file")
    model.add_argument(
        "--config",
        dest="config_folder",
        metavar="FOLDER",
        help="a local diffusers folder of the same family, for a single-file --model offline",
    )
    model.add_argument("--image", help="init image: img2img (with --mask: inpaint)")
    model.add_argument("--mask", help="inpainting mask (white is repainted); needs --image")
    model.add_argument(
        "--strength", type=_typed("strength"), help="img2img/inpaint strength, in (0, 1]; steps x strength >= 1"
    )
    model.add_argument(
        "--controlnet",
        metavar="MODEL",
        help="ControlNet: hub id, local diffusers folder, or one original-layout .safetensors/.pth/.ckpt file",
    )
    model.add_argument("--control-image", metavar="FILE", help="the ControlNet conditioning image")
    model.add_argument("--controlnet-scale", type=_typed("controlnet_scale"), help="ControlNet conditioning scale")
    model.add_argument("--from-image", metavar="PNG", help="re-run a PNG written by hidiff generate (flags override)")
    run = gen.add_argument_group("generation")
    run.add_argument("--prompt")
    run.add_argument("--negative-prompt")
    run.add_argument("--width", type=_typed("width"), help="a positive multiple of 8")
    run.add_argument("--height", type=_typed("height"), help="a positive multiple of 8")
    run.add_argument("--steps", type=_typed("steps"))
    run.add_argument("--guidance", type=_typed("guidance"), help="classifier-free guidance scale")
    run.add_argument(
        "--seed", type=_typed("seed"), help="in [0, 2**64 - 1]; image k of a batch uses seed + k (default: random)"
    )
    run.add_argument("--scheduler", choices=CHOICES["scheduler"], help="default: the model's own")
    run.add_argument("--batch", type=_typed("batch"), help="images per run")
    run.add_argument(
        "--cfgpp",
        type=_typed("cfgpp"),
        metavar="LAMBDA",
        help=f"CFG++ guidance, in [0, 1] (needs --scheduler {', '.join(CFGPP_SCHEDULERS)})",
    )
    run.add_argument("--hidiff", action=argparse.BooleanOptionalAction, help="HiDiffusion on (default) or off")
    run.add_argument(
        "--compare",
        action="store_true",
        help="same seed without and with HiDiffusion: both images, a side-by-side PNG and both times",
    )
    run.add_argument("--device", help="auto (default: cuda, then mps, then cpu), cpu, cuda, cuda:N, mps")
    run.add_argument("--dtype", choices=CHOICES["dtype"], help="auto (default): float16 on GPUs, float32 on CPU")
    run.add_argument(
        "--vae-tiling",
        choices=CHOICES["vae_tiling"],
        help="auto (default): on when decoding in one piece would not fit in free memory",
    )
    run.add_argument(
        "--memory-budget",
        metavar="SIZE",
        type=_typed("memory_budget"),
        help="peak memory the run may take (e.g. 8GB, 24GiB; default: $HIDIFF_MEMORY_BUDGET, else the device's free "
        "memory): tiled VAE decoding, attention slicing and model offload turn on only to fit it, and a run that "
        "cannot fit is refused",
    )
    run.add_argument(
        "--progressive",
        action="store_const",
        const=True,
        help="make the picture at a smaller size first, then enlarge and refine it at the target size (both with "
        "HiDiffusion; docs/progressive.md)",
    )
    run.add_argument(
        "--progressive-start",
        type=_typed("progressive_start"),
        metavar="SHARE",
        help="with --progressive: the first picture's side over the target's, in (0, 1) (default: twice the "
        "native side, at most half the target's)",
    )
    run.add_argument(
        "--progressive-strength",
        type=_typed("progressive_strength"),
        metavar="S",
        help=f"with --progressive: img2img strength of the refinement, in (0, 1] (default {DEFAULT_STRENGTH})",
    )
    run.add_argument(
        "--out",
        help="output PNG (default hidiff-SEED.png; a name without a suffix gets .png; an existing folder, or a "
        "name ending in /: hidiff-SEED.png inside it); batches add -K, --compare adds -plain/-hidiff/-compare",
    )
    run.add_argument("--overwrite", action="store_true", help="replace output files that exist (default: refuse)")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    add_config_flags(gen)


# ------------------------------------------------------------------ request from the command line
# Every Request field but the config has a flag of the same name (its argparse dest); None: not given.
_FLAG_FIELDS = tuple(f.name for f in dataclasses.fields(Request) if f.name != "hidiff_config")
_LOCAL_PATH_FIELDS = ("image", "mask", "control_image", "config_folder")


def request_from_args(args: Any) -> tuple[Request, Optional[int]]:
    """The request of a command line: ``--from-image`` metadata (if given) overridden by the flags given.

    Returns the request and, for an image taken from a batch, its index in the batch.
    """
    index = None
    if args.from_image:
        base, index = read_metadata(args.from_image)
    else:
        if not args.model:
            raise UsageError(
                "--model is required (a hub id, a local diffusers folder or a .safetensors/.ckpt file), "
                "unless --from-image FILE gives it"
            )
        base = Request(model=args.model)
    given = {name: getattr(args, name) for name in _FLAG_FIELDS if getattr(args, name) is not None}
    if "batch" in given:
        index = None  # a new batch size: write every image
    config = config_from_args(args, base=HiDiffusionConfig.from_options(**base.hidiff_config))
    request = dataclasses.replace(base, **given, hidiff_config=config.to_dict())
    return _absolute_paths(request), index


def _absolute_paths(request: Request) -> Request:
    """Local paths made absolute, so that the metadata re-runs from any folder."""
    changes = {name: os.path.abspath(getattr(request, name)) for name in _LOCAL_PATH_FIELDS if getattr(request, name)}
    for name in ("model", "controlnet"):
        value = getattr(request, name)
        if value and os.path.exists(value):
            changes[name] = os.path.abspath(value)
    return dataclasses.replace(request, **changes)


def check_request(request: Request) -> dict[str, Any]:
    """Refuse bad input before anything is loaded; returns the opened input images."""
    for name, check in CHECKS.items():
        if getattr(request, name) is not None:
            check_value(_flag_name(name), getattr(request, name), check)
    for name, choices in CHOICES.items():
        value = getattr(request, name)
        if value is not None and value not in choices:
            raise UsageError(f"{_flag_name(name)} {value!r} is not one of {', '.join(choices)}")
    if request.seed is not None and request.seed + request.batch - 1 > SEED_MAX:
        raise UsageError(
            f"--seed {request.seed} with --batch {request.batch}: image k uses seed + k, which must stay "
            f"at most 2**64 - 1; pass --seed {SEED_MAX - request.batch + 1} or less"
        )
    if request.mask and not request.image:
        raise UsageError("--mask needs --image: inpainting repaints the white part of the mask on that image")
    if request.controlnet and not request.control_image:
        raise UsageError("--controlnet needs --control-image FILE (the conditioning image: edges, depth, pose...)")
    if request.control_image and not request.controlnet:
        raise UsageError("--control-image needs --controlnet MODEL (a ControlNet hub id or local diffusers folder)")
    if request.cfgpp is not None:
        if request.scheduler not in CFGPP_SCHEDULERS:
            raise UsageError(
                f"--cfgpp needs --scheduler, one of {', '.join(CFGPP_SCHEDULERS)} (got {request.scheduler})"
            )
        if request.guidance is not None and request.guidance <= 1:
            raise UsageError(
                "--cfgpp needs the unconditional branch: leave --guidance unset or above 1 "
                "(its value is not used under CFG++)"
            )
    if not request.progressive and (request.progressive_start is not None or request.progressive_strength is not None):
        raise UsageError("--progressive-start and --progressive-strength need --progressive")
    if request.progressive and request.task == "inpaint":
        raise UsageError(
            "--progressive does not run with --mask: inpainting repaints a region of the given image at its size; "
            "drop --progressive"
        )
    if request.progressive and not request.hidiff:
        raise UsageError("--progressive runs HiDiffusion in every pass; drop --no-hidiff")
    if request.task != "text2img" and request.steps is not None and request.strength is not None:
        denoising_steps(request.steps, request.strength)
    if request.config_folder and not os.path.isdir(request.config_folder):
        raise UsageError(
            f"--config {request.config_folder}: not a folder; pass a local diffusers model folder "
            "(one with model_index.json) of the checkpoint's family"
        )
    resolve_device(request.device, request.dtype)
    return {
        name: load_image(getattr(request, name), flag_name, mode)
        for name, flag_name, mode in (
            ("image", "--image", "RGB"),
            ("mask", "--mask", "L"),
            ("control_image", "--control-image", "RGB"),
        )
        if getattr(request, name)
    }


def check_size(width: Optional[int], height: Optional[int], multiple: int) -> None:
    """Refuse a side (of those given) that is not a positive multiple of the VAE's scale factor."""
    for name, side in (("--width", width), ("--height", height)):
        if side is not None:
            check_value(name, side, side_multiple_of(multiple))


def load_image(path: str, flag_name: str, mode: str) -> Any:
    from PIL import Image, UnidentifiedImageError

    if not os.path.isfile(path):
        raise UsageError(f"{flag_name} {path}: no such file")
    try:
        with Image.open(path) as image:
            return image.convert(mode)
    except (UnidentifiedImageError, OSError) as error:
        raise UsageError(
            f"{flag_name} {path} is not an image that can be read ({error}); pass a PNG, JPEG or WebP file"
        ) from None


# ------------------------------------------------------------------ running
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


def with_seed(request: Request) -> Request:
    """The request with a seed: a random one (recorded in the metadata) when none was given."""
    return (
        request
        if request.seed is not None
        else dataclasses.replace(request, seed=random.SystemRandom().randrange(2**32))
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


def prepare(request: Request, images: Optional[dict] = None) -> tuple[Request, Any, Any, dict, torch.device, Any]:
    """Check (unless ``images``, what :func:`check_request` returned, are given), load and configure:
    (resolved request, pipeline, layout, input images, device, memory plan)."""
    if images is None:
        images = check_request(request)
    pipe, layout, device = load(request)
    request, plan = configure_with_plan(request, pipe, layout, images, device)
    return request, pipe, layout, images, device, plan


def load(request: Request) -> tuple[Any, Any, torch.device]:
    """The pipeline a request needs, on its device: (pipeline, layout, device)."""
    device, dtype = resolve_device(request.device, request.dtype)
    quiet_libraries()
    pipe, layout = load_pipeline(request.model, request.config_folder, request.controlnet, request.task, dtype)
    pipe.to(device)
    return pipe, layout, device


def configure(request: Request, pipe: Any, layout: Any, images: dict, device: torch.device) -> Request:
    """A loaded pipeline set up for a request (scheduler, CFG++, memory plan); returns the resolved request."""
    return configure_with_plan(request, pipe, layout, images, device)[0]


def configure_with_plan(
    request: Request, pipe: Any, layout: Any, images: dict, device: torch.device
) -> tuple[Request, Any]:
    """:func:`configure`, also returning the memory plan it applied (:class:`~hidiff.app.memory_plan.MemoryPlan`)."""
    from .memory_plan import apply_plan, make_plan

    request = resolve(request, pipe, layout, images)
    if request.strength is not None:  # the model's default steps or strength
        denoising_steps(request.steps, request.strength)
    set_scheduler(pipe, request.scheduler)
    if request.cfgpp is not None:
        from ..diffusers.cfgpp import enable_cfgpp

        try:
            enable_cfgpp(pipe, scheduler=request.scheduler, guidance=request.cfgpp)
        except (TypeError, ValueError) as error:  # a model or scheduler CFG++ cannot run on
            raise UsageError(f"--cfgpp: {error}") from None
    plan = make_plan(
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
    apply_plan(pipe, plan, device)
    return request, plan


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
    layout = hidiff.detect_layout(pipe.unet)
    native = (factor * layout.native[0], factor * layout.native[1])
    start = request.progressive_start
    if start is None:
        start = default_start((request.height, request.width), native)
    strength = request.progressive_strength if request.progressive_strength is not None else DEFAULT_STRENGTH
    plan = schedule((request.height, request.width), 8 * factor, start=start, strength=strength)

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
    pictures, preset = run_diffusers(pipe, plan, first, refine, config, cfgpp)
    return pictures, preset, plan.to_dict()


# ------------------------------------------------------------------ metadata
def a1111_parameters(request: Request, index: int, run: Run) -> str:
    """The ``parameters`` text that A1111-style tools read."""
    sampler = SCHEDULERS[request.scheduler][2] if request.scheduler else run.scheduler
    fields = [
        ("Steps", request.steps),
        ("Sampler", sampler),
        ("CFG scale", request.guidance),
        ("Seed", request.seed + index),
        ("Size", f"{request.width}x{request.height}"),
        ("Model", Path(request.model).stem if os.path.exists(request.model) else request.model),
        ("Denoising strength", request.strength),
        ("ControlNet", request.controlnet and Path(request.controlnet).name),
        ("HiDiffusion", (run.preset or "inactive at this size") if request.hidiff else "off"),
        ("CFG++", request.cfgpp),
    ]
    line = ", ".join(f"{k}: {v}" for k, v in fields if v is not None)
    negative = f"Negative prompt: {request.negative_prompt}\n" if request.negative_prompt else ""  # as A1111 writes it
    return f"{request.prompt}\n{negative}{line}"


def metadata(request: Request, index: int, run: Run, pipe: Any, device: torch.device) -> dict[str, Any]:
    import diffusers

    import hidiff

    return {
        "format": 1,
        "request": dataclasses.asdict(request),
        "index": index,
        "inputs_sha256": {
            name: _sha256(getattr(request, name))
            for name in ("image", "mask", "control_image")
            if getattr(request, name)
        },
        "run": {
            "pipeline": type(pipe).__name__,
            "scheduler": run.scheduler,
            "preset": run.preset,
            "seconds": round(run.seconds, 3),
            "device": str(device),
            "dtype": str(pipe.unet.dtype).replace("torch.", ""),
            "vae_tiling": bool(getattr(getattr(pipe, "vae", None), "use_tiling", False)),
            "memory": run.memory,
            "progressive": run.progressive,
            "hidiff_version": hidiff.__version__,
            "diffusers_version": diffusers.__version__,
            "torch_version": torch.__version__,
        },
    }


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def save_png(image: Any, path: Path, text: dict[str, str]) -> None:
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in text.items():
        info.add_text(key, value)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, pnginfo=info)


def read_metadata(path: str) -> tuple[Request, Optional[int]]:
    """(request, index in its batch) from a PNG written by ``hidiff generate``."""
    request, meta = read_request(path, METADATA_KEY, Request, "hidiff generate")
    index = meta.get("index")
    if not (index is None or _of_type(index, int)):
        raise UsageError(f"--from-image {path}: unreadable hidiff metadata (its index is of the wrong type)")
    return request, index if request.batch > 1 else None


def read_request(path: str, key: str, kind: type, command: str) -> tuple[Any, dict]:
    """(request of dataclass ``kind``, the whole metadata) from the ``key`` JSON chunk of a PNG that
    ``command`` wrote; a UsageError for a missing or malformed chunk, a warning for changed inputs."""
    from PIL import Image

    load_image(path, "--from-image", "RGB")  # refuses a missing or non-image file
    with Image.open(path) as image:
        text = dict(getattr(image, "text", {}) or {})
    if key not in text:
        raise UsageError(
            f"--from-image {path} has no '{key}' metadata: only PNGs written by {command} "
            "can be re-run (their text chunks may also have been stripped by an image editor)"
        )
    try:
        meta = json.loads(text[key])
        if not isinstance(meta, dict) or not isinstance(meta.get("request"), dict):
            raise ValueError("it holds no 'request' object")
        fields, hints = meta["request"], get_type_hints(kind)
        unknown = sorted(set(fields) - set(hints))
        if unknown:
            raise ValueError(f"unknown field(s) {', '.join(unknown)} (written by a newer hidiff?)")
        for name, value in fields.items():
            if not _of_type(value, hints[name]):
                raise ValueError(f"{name} is {value!r}, of the wrong type")
        request = kind(**fields)
        if hasattr(request, "config"):
            request.config  # noqa: B018 - validates the stored HiDiffusion config
        digests = meta.get("inputs_sha256") or {}
        if not isinstance(digests, dict):
            raise ValueError("its inputs_sha256 is of the wrong type")
    except (ValueError, KeyError, TypeError) as error:
        raise UsageError(
            f"--from-image {path}: unreadable {key} metadata ({error}); re-run from a PNG that {command} wrote"
        ) from None
    for name, digest in digests.items():
        value = getattr(request, name, None)
        if value and os.path.isfile(value) and _sha256(value) != digest:
            print(f"warning: {value} changed since {path} was made; the result will differ")
    return request, meta


def _kind(hint: Any) -> Any:
    """The type of a Request field's annotation: ``X`` of ``Optional[X]`` or of ``X``."""
    return next((a for a in get_args(hint) if a is not type(None)), hint)


def _of_type(value: Any, hint: Any) -> bool:
    """Whether a JSON value fits a Request field's annotation (``Optional[X]``, ``X``; no bool for a number)."""
    if value is None:
        return type(None) in get_args(hint)
    kind = _kind(hint)
    if isinstance(value, bool) and kind is not bool:
        return False
    return isinstance(value, (int, float) if kind is float else kind)


# ------------------------------------------------------------------ output
def output_base(out: Optional[str], seed: int) -> Path:
    """The PNG that ``--out`` names, before the batch and --compare suffixes: ``hidiff-SEED.png`` by default
    or inside a folder (one that exists, or a name ending in /); ``.png`` added to a name without a suffix."""
    default = f"hidiff-{seed}.png"
    if not out:
        return Path(default)
    if os.path.isdir(out) or out.endswith(("/", os.sep)):
        return Path(out) / default
    try:
        return png_path(
            Path(out), "hidiff writes PNG only, as the metadata that re-runs an image needs PNG text chunks"
        )
    except ValueError as error:
        raise UsageError(f"--out {error}") from None


def output_path(out: Optional[str], request: Request, index: Optional[int], suffix: str = "") -> Path:
    base = output_base(out, request.seed)
    stem = base.stem + (f"-{index}" if request.batch > 1 else "")
    return base.with_name(f"{stem}{suffix}.png")


def check_outputs(paths: list[Path], overwrite: bool) -> None:
    """Refuse, before anything runs, outputs that exist (unless ``overwrite``) or cannot be written."""
    for path in paths:
        if path.is_dir():
            raise UsageError(f"cannot write {path}: a folder of that name exists; pass another --out")
        if path.exists() and not overwrite:
            raise UsageError(f"{path} exists; pass --overwrite to replace it, or another --out")
        folder = path.parent
        while not folder.exists():
            folder = folder.parent
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            raise UsageError(f"cannot write {path}: {folder} is not a writable folder; pass another --out")


def side_by_side(left: Any, right: Any) -> Any:
    from PIL import Image

    both = Image.new("RGB", (left.width + right.width, max(left.height, right.height)))
    both.paste(left, (0, 0))
    both.paste(right, (left.width, 0))
    return both


def generate(
    request: Request,
    out: Optional[str] = None,
    compare: bool = False,
    only_index: Optional[int] = None,
    quiet: bool = False,
    overwrite: bool = False,
) -> list[Path]:
    """Run a request and write its PNGs (refusing to replace files unless ``overwrite``); returns the paths written.

    ``only_index``: write that image of the batch only (what ``--from-image`` of a batch image asks for)."""
    import hidiff

    if compare and not request.hidiff:
        raise UsageError("--compare runs with and without HiDiffusion; drop --no-hidiff")
    if compare and request.progressive:
        raise UsageError("--compare times one direct run against another; drop --progressive or --compare")
    images = check_request(request)
    request = with_seed(request)  # the default file name has it
    if only_index is not None and not 0 <= only_index < request.batch:
        raise UsageError(
            f"the --from-image metadata names image {only_index} of a batch of {request.batch}, which does not "
            f"exist; pass --batch {request.batch} to re-run the whole batch"
        )
    indices = [only_index] if only_index is not None else list(range(request.batch))
    suffixes = _suffixes(compare)
    check_outputs([output_path(out, request, i, s) for s in suffixes.values() for i in indices], overwrite)
    request, pipe, layout, images, device, plan = prepare(request, images)
    memory = plan.to_dict()
    written: list[Path] = []
    runs: dict[str, Run] = {}
    if compare:
        plain = dataclasses.replace(request, hidiff=False)
        # one short untimed call first, so that neither timed run pays the first-call set-up
        # (img2img runs int(steps * strength) steps: enough steps for one)
        warmup_steps = math.ceil(1 / request.strength) + 1 if request.strength else 1
        pipe.set_progress_bar_config(desc="warm-up", disable=quiet)
        pipe(**dict(call_kwargs(plain, pipe, images), num_inference_steps=warmup_steps, output_type="latent"))
        runs["plain"] = run_pipeline(plain, pipe, images, device, "plain", quiet, memory)
        written += _write(plain, runs["plain"], pipe, device, out, indices, suffixes["plain"])
    if request.hidiff:
        hidiff.apply_hidiffusion(pipe, config=request.config)
    runs["hidiff"] = run = run_pipeline(
        request, pipe, images, device, "hidiff" if request.hidiff else "plain", quiet, memory
    )
    written += _write(request, run, pipe, device, out, indices, suffixes["hidiff"])
    if compare:
        times = {
            "plain_s": round(runs["plain"].seconds, 3),
            "hidiff_s": round(run.seconds, 3),
            "speedup": round(runs["plain"].seconds / run.seconds, 3),
        }
        for i in indices:
            path = output_path(out, request, i, suffixes["compare"])
            save_png(
                side_by_side(runs["plain"].images[i], run.images[i]),
                path,
                {"hidiff-compare": json.dumps({"left": "plain", "right": "hidiff", **times})},
            )
            written.append(path)
        print(
            f"plain {times['plain_s']:.2f} s, hidiff {times['hidiff_s']:.2f} s: {times['speedup']:.2f}x "
            f"(side by side: plain left, hidiff right)"
        )
    peak = max(r.peak_bytes for r in runs.values())
    memory = "max allocated" if device.type == "cuda" else "process RSS"
    state = f"hidiff {run.preset or 'inactive at this size'}" if request.hidiff else "hidiff off"
    print(
        f"{len(indices)} image(s) {request.width}x{request.height}, {request.steps} steps, {state}: "
        f"{run.seconds:.2f} s, peak memory {peak / 2**20:.0f} MiB ({memory}), {device} {pipe.unet.dtype}"
    )
    for path in written:
        print(f"wrote {path}")
    return written


def _suffixes(compare: bool) -> dict[str, str]:
    """The file name suffix of each image a run writes: with --compare plain, hidiff and side by side."""
    return {"plain": "-plain", "hidiff": "-hidiff", "compare": "-compare"} if compare else {"hidiff": ""}


def _write(
    request: Request, run: Run, pipe: Any, device: torch.device, out: Optional[str], indices: list, suffix: str
) -> list[Path]:
    paths = []
    for i in indices:
        path = output_path(out, request, i, suffix)
        save_png(run.images[i], path, png_text(request, i, run, pipe, device))
        paths.append(path)
    return paths


def png_text(request: Request, index: int, run: Run, pipe: Any, device: torch.device) -> dict[str, str]:
    """The PNG text chunks of image ``index`` of a run: ``parameters`` (A1111) and ``hidiff`` (what re-runs it)."""
    return {
        "parameters": a1111_parameters(request, index, run),
        METADATA_KEY: json.dumps(metadata(request, index, run, pipe, device)),
    }


def main(args: Any) -> int:
    """``hidiff generate`` from the flags of :func:`add_arguments`."""
    request, index = request_from_args(args)
    out = args.out
    if args.from_image and not out:
        out = str(Path(args.from_image).with_name(Path(args.from_image).stem + "-rerun.png"))
    generate(request, out=out, compare=args.compare, only_index=index, quiet=args.quiet, overwrite=args.overwrite)
    return 0
