"""``hidiff generate``: images from a Stable Diffusion model with HiDiffusion, each PNG able to re-run itself.

The model (hub id, local diffusers folder or single ``.safetensors``/``.ckpt`` file) is
loaded as it is, its family read from the U-Net's structure, and the pipeline class
picked from the inputs (text-to-image, img2img, inpaint, each with or without a
ControlNet). Every PNG carries an A1111-style ``parameters`` text chunk and a ``hidiff``
JSON chunk holding the whole :class:`Request` and HiDiffusion config, so that
``hidiff generate --from-image FILE`` re-runs it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import math
import os
import random
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

from ..core.config import HiDiffusionConfig
from .cli import UsageError, config_from_args

#: --scheduler name -> (diffusers class, config overrides, A1111 sampler name)
SCHEDULERS: dict[str, tuple[str, dict, str]] = {
    "ddim": ("DDIMScheduler", {}, "DDIM"),
    "euler": ("EulerDiscreteScheduler", {}, "Euler"),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}, "Euler a"),
    "dpmpp-2m": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": False},
        "DPM++ 2M",
    ),
    "dpmpp-2m-karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
        "DPM++ 2M Karras",
    ),
    "unipc": ("UniPCMultistepScheduler", {}, "UniPC"),
}
CFGPP_SCHEDULERS = ("ddim", "euler", "euler-a", "dpmpp-2m")

_TASK_NAMES = {"text2img": "", "img2img": "Img2Img", "inpaint": "Inpaint"}


def pipeline_class_name(kind: str, task: str, controlnet: bool) -> str:
    """The diffusers pipeline for a U-Net layout and task, e.g. StableDiffusionXLControlNetInpaintPipeline."""
    return f"StableDiffusion{'XL' if kind == 'sdxl' else ''}{'ControlNet' if controlnet else ''}{_TASK_NAMES[task]}Pipeline"


SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
METADATA_KEY = "hidiff"
# Peak memory of decoding in one piece, in full-resolution maps of the decoder's last stage
# (measured about 8 on CPU for SD's VAE at 256 and 512 px, fp32).
VAE_DECODE_MAPS = 8
VAE_FREE_SHARE = 0.8  # tile when a one-piece decode would take more than this share of the free memory


class ModelLoadError(RuntimeError):
    """The model or ControlNet could not be loaded (exit code 1)."""


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
    device: str = "auto"
    dtype: str = "auto"
    vae_tiling: str = "auto"

    @property
    def task(self) -> str:
        return "inpaint" if self.mask else "img2img" if self.image else "text2img"

    @property
    def config(self) -> HiDiffusionConfig:
        return HiDiffusionConfig.from_options(**self.hidiff_config)


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
    if request.mask and not request.image:
        raise UsageError("--mask needs --image: inpainting repaints the white part of the mask on that image")
    if request.controlnet and not request.control_image:
        raise UsageError("--controlnet needs --control-image FILE (the conditioning image: edges, depth, pose...)")
    if request.control_image and not request.controlnet:
        raise UsageError("--control-image needs --controlnet MODEL (a ControlNet hub id or local diffusers folder)")
    if request.scheduler is not None and request.scheduler not in SCHEDULERS:
        raise UsageError(f"unknown scheduler {request.scheduler!r}; choose one of {', '.join(SCHEDULERS)}")
    if request.cfgpp is not None:
        if request.scheduler not in CFGPP_SCHEDULERS:
            raise UsageError(
                f"--cfgpp needs --scheduler, one of {', '.join(CFGPP_SCHEDULERS)} (got {request.scheduler})"
            )
        if not 0.0 <= request.cfgpp <= 1.0:
            raise UsageError(
                f"--cfgpp takes lambda in [0, 1] (it stands for a guidance scale of 1 + 11.5 lambda), "
                f"got {request.cfgpp}"
            )
        if request.guidance is not None and request.guidance <= 1:
            raise UsageError(
                "--cfgpp needs the unconditional branch: leave --guidance unset or above 1 "
                "(its value is not used under CFG++)"
            )
    check_size(request.width, request.height, 8)  # every supported family's VAE scales by 8
    for name in ("steps", "batch"):
        value = getattr(request, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name} must be at least 1, got {value}")
    if request.strength is not None and not 0.0 < request.strength <= 1.0:
        raise UsageError(f"--strength must lie in (0, 1], got {request.strength}")
    if request.config_folder and not os.path.isdir(request.config_folder):
        raise UsageError(
            f"--config {request.config_folder}: not a folder; pass a local diffusers model folder "
            "(one with model_index.json) of the checkpoint's family"
        )
    resolve_device(request.device, request.dtype)
    return {
        name: load_image(getattr(request, name), flag, mode)
        for name, flag, mode in (
            ("image", "--image", "RGB"),
            ("mask", "--mask", "L"),
            ("control_image", "--control-image", "RGB"),
        )
        if getattr(request, name)
    }


def check_size(width: Optional[int], height: Optional[int], multiple: int) -> None:
    """Refuse a side (of those given) that is not a positive multiple of the VAE's scale factor."""
    for flag, side in (("--width", width), ("--height", height)):
        if side is not None and (side <= 0 or side % multiple):
            raise UsageError(
                f"{flag} {side}: sizes must be positive multiples of {multiple} for this model family "
                f"(its VAE scales by {multiple}); e.g. {max(multiple, side // multiple * multiple)}"
            )


def load_image(path: str, flag: str, mode: str) -> Any:
    from PIL import Image, UnidentifiedImageError

    if not os.path.isfile(path):
        raise UsageError(f"{flag} {path}: no such file")
    try:
        with Image.open(path) as image:
            return image.convert(mode)
    except (UnidentifiedImageError, OSError) as error:
        raise UsageError(
            f"{flag} {path} is not an image that can be read ({error}); pass a PNG, JPEG or WebP file"
        ) from None


def resolve_device(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    """``auto``: cuda, then mps, then cpu; half precision on GPUs, float32 on CPU."""
    if device == "auto":
        mps = getattr(torch.backends, "mps", None)
        device = "cuda" if torch.cuda.is_available() else "mps" if mps is not None and mps.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UsageError(f"--device {device!r} is not a torch device; use auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda, but this torch sees no CUDA GPU; use --device auto or cpu")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UsageError("--device mps, but MPS is not available here; use --device auto or cpu")
    if dtype == "auto":
        return dev, torch.float16 if dev.type in ("cuda", "mps") else torch.float32
    return dev, getattr(torch, dtype)


# ------------------------------------------------------------------ loading
def model_source(model: str) -> str:
    """``file``, ``folder`` or ``hub`` for a --model value; bad local paths are refused."""
    if os.path.isdir(model):
        return "folder"
    if os.path.isfile(model):
        if not model.lower().endswith(SINGLE_FILE_SUFFIXES):
            raise UsageError(
                f"--model {model}: a single checkpoint must be a .safetensors or .ckpt file; "
                "for a diffusers model pass its folder"
            )
        return "file"
    if model.lower().endswith(SINGLE_FILE_SUFFIXES) or model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise UsageError(f"--model {model}: no such file or folder")
    return "hub"


def _hub_error(what: str, name: str, error: Exception) -> ModelLoadError:
    return ModelLoadError(
        f"{what} {name!r} is not a local file or folder, and the Hugging Face Hub could not provide it "
        f"({_short(error)}). Offline, pass a local path instead: a diffusers folder (saved with "
        "save_pretrained or downloaded beforehand) or a .safetensors/.ckpt file with --config FOLDER."
    )


def _short(error: Exception, limit: int = 160) -> str:
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def checkpoint_shapes(path: str, flag: str = "--model") -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of a single-file checkpoint, without loading a .safetensors file's tensors."""
    try:
        if path.lower().endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(path, framework="pt") as f:
                return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # safetensors and pickle raise many types for a file that is not theirs
        raise UsageError(f"{flag} {path} is not a readable checkpoint ({type(error).__name__}: {error})") from None
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict):
        raise UsageError(f"{flag} {path} holds no state dict")
    return {k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}


def checkpoint_keys(path: str) -> list[str]:
    """Tensor names of a single-file checkpoint."""
    return list(checkpoint_shapes(path))


def single_file_kind(keys: list[str]) -> str:
    """``sd`` or ``sdxl`` from an original-layout (LDM/SGM) checkpoint's tensor names."""
    if (
        any(k.startswith("conditioner.embedders.") for k in keys)
        or "model.diffusion_model.label_emb.0.0.weight" in keys
    ):
        return "sdxl"
    if any(k.startswith("model.diffusion_model.input_blocks.") for k in keys):
        return "sd"
    raise UsageError(
        "the checkpoint has no Stable Diffusion U-Net in the original layout "
        "(model.diffusion_model.input_blocks.*); pass an SD 1.x/2.x/SDXL checkpoint or a diffusers folder"
    )


def single_file_takes_config() -> bool:
    """Whether this diffusers' ``from_single_file`` takes ``config=`` (a local diffusers folder for the configs).

    It came with the single-file loaders shared by every model class (``FromOriginalModelMixin``);
    before them, configs came only from the original LDM YAML files.
    """
    import diffusers.loaders

    return hasattr(diffusers.loaders, "FromOriginalModelMixin")


def load_base_pipeline(request: Request, dtype: torch.dtype) -> Any:
    """The model as diffusers loads it (its own pipeline class)."""
    import diffusers

    source = model_source(request.model)
    if source == "file":
        kind = single_file_kind(checkpoint_keys(request.model))
        cls = getattr(diffusers, pipeline_class_name(kind, "text2img", False))
        kwargs: dict[str, Any] = {"torch_dtype": dtype}
        if request.config_folder:
            if not single_file_takes_config():
                raise ModelLoadError(
                    f"this diffusers ({diffusers.__version__}) builds single-file pipelines only from the original "
                    "LDM YAML configs, fetched online, and ignores a local diffusers folder: --config needs a newer "
                    "diffusers (with the single-file loaders of FromOriginalModelMixin). Upgrade diffusers, or convert "
                    "the checkpoint to a diffusers folder once while online and pass that folder as --model."
                )
            kwargs["config"] = request.config_folder
        try:
            return cls.from_single_file(request.model, **kwargs)
        except Exception as error:
            if request.config_folder:
                raise ModelLoadError(
                    f"cannot load {request.model} with the configs of {request.config_folder}: {error}"
                ) from None
            raise ModelLoadError(
                f"cannot load {request.model} ({_short(error)}). Without --config, diffusers fetches the component "
                "configs of the checkpoint's family from the Hugging Face Hub; offline, pass --config FOLDER, a "
                "local diffusers folder of the same family (SD 1.x, 2.x or SDXL)."
            ) from None
    if source == "folder" and not os.path.isfile(os.path.join(request.model, "model_index.json")):
        raise UsageError(
            f"--model {request.model} is a folder without model_index.json: pass the folder of a whole "
            "diffusers pipeline (the one save_pretrained writes), not of one component"
        )
    try:
        return diffusers.DiffusionPipeline.from_pretrained(request.model, torch_dtype=dtype)
    except (OSError, ValueError) as error:
        if source == "hub":
            raise _hub_error("--model", request.model, error) from None
        raise ModelLoadError(f"cannot load the diffusers folder {request.model}: {error}") from None


def load_controlnet(name: str, dtype: torch.dtype, unet: Any) -> Any:
    """A ControlNet from a hub id, a diffusers folder or one original-layout file (configured from ``unet``)."""
    import diffusers

    if os.path.isfile(name):
        return load_controlnet_file(name, dtype, unet)
    source = "folder" if os.path.isdir(name) else "hub"
    if source == "hub" and (
        name.lower().endswith(CONTROLNET_FILE_SUFFIXES) or name.startswith((".", "/", "~")) or name.count("/") > 1
    ):
        raise UsageError(
            f"--controlnet {name}: no such file or folder; pass a ControlNet hub id, a local diffusers "
            "ControlNet folder or a .safetensors/.pth/.ckpt file"
        )
    try:
        return diffusers.ControlNetModel.from_pretrained(name, torch_dtype=dtype)
    except OSError as error:
        if source == "hub":
            raise _hub_error("--controlnet", name, error) from None
        raise ModelLoadError(f"cannot load the ControlNet folder {name}: {error}") from None


CONTROLNET_FILE_SUFFIXES = (".safetensors", ".pth", ".ckpt")


def load_controlnet_file(path: str, dtype: torch.dtype, unet: Any) -> Any:
    """A ControlNet file in the original layout (``input_hint_block``, ``zero_convs``, as ControlNet releases
    ship them), offline: its config is the base U-Net's encoder (a ControlNet copies it) with the
    conditioning embedding's widths and the input channels read from the file's tensor shapes."""
    import tempfile

    import diffusers

    if not path.lower().endswith(CONTROLNET_FILE_SUFFIXES):
        raise UsageError(f"--controlnet {path}: a ControlNet file must be .safetensors, .pth or .ckpt")
    if not single_file_takes_config():
        raise ModelLoadError(
            f"this diffusers ({diffusers.__version__}) cannot configure a single-file ControlNet "
            "offline; upgrade diffusers, or pass the ControlNet as a diffusers folder"
        )
    shapes = checkpoint_shapes(path, "--controlnet")
    prefix = "control_model." if any(k.startswith("control_model.") for k in shapes) else ""
    hint = sorted(
        (int(k.split(".")[-2]), shape)
        for k, shape in shapes.items()
        if k.startswith(prefix + "input_hint_block.") and k.endswith(".weight")
    )
    conv_in = shapes.get(prefix + "input_blocks.0.0.weight")
    if not hint or conv_in is None or prefix + "zero_convs.0.0.weight" not in shapes:
        raise UsageError(
            f"--controlnet {path} is not a ControlNet in the original layout (no input_hint_block / "
            "zero_convs tensors); pass a diffusers ControlNet folder instead"
        )
    # hint convs: conv_in, then (c_i -> c_i, c_i -> c_i+1) pairs, then conv_out: every other output, last dropped
    widths = tuple(shape[0] for _, shape in hint[:-1])[0::2]
    with torch.device("meta"):
        skeleton = diffusers.ControlNetModel.from_unet(
            unet, load_weights_from_unet=False, conditioning_embedding_out_channels=widths
        )
    skeleton.register_to_config(in_channels=conv_in[1], conditioning_channels=hint[0][1][1])
    with tempfile.TemporaryDirectory(prefix="hidiff-controlnet-") as folder:
        skeleton.save_config(folder)
        try:
            return diffusers.ControlNetModel.from_single_file(path, config=folder, torch_dtype=dtype)
        except Exception as error:
            raise ModelLoadError(
                f"cannot load the ControlNet file {path} for this model ({_short(error)}); it may "
                "be for another family (SD 1.x, 2.x, SDXL)"
            ) from None


@contextmanager
def torch_dtype_accepted() -> Iterator[None]:
    """Newer diffusers renamed ``torch_dtype`` (still accepted, with a FutureWarning); older ones need it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
        yield


def load_pipeline(request: Request, dtype: torch.dtype) -> tuple[Any, Any]:
    """(pipeline of the class the request needs, U-Net layout)."""
    import diffusers

    from ..diffusers.model import detect_layout, find_unet

    with torch_dtype_accepted():
        base = load_base_pipeline(request, dtype)
        controlnet = load_controlnet(request.controlnet, dtype, base.unet) if request.controlnet else None
    layout = detect_layout(find_unet(base)[0])
    if layout.inpainting and request.task != "inpaint":
        raise UsageError(f"{request.model} is an inpainting model (9-channel U-Net): pass --image and --mask")
    if controlnet is not None and controlnet.config.cross_attention_dim != base.unet.config.cross_attention_dim:
        raise UsageError(
            f"--controlnet {request.controlnet} is for another family (text width "
            f"{controlnet.config.cross_attention_dim}, the model's is {base.unet.config.cross_attention_dim})"
        )
    name = pipeline_class_name(layout.kind, request.task, controlnet is not None)
    cls = getattr(diffusers, name, None)
    if cls is None:
        raise ModelLoadError(f"this diffusers ({diffusers.__version__}) has no {name}; upgrade diffusers for this task")
    return _rebuild(base, cls, controlnet), layout


def _rebuild(pipe: Any, cls: Any, controlnet: Any) -> Any:
    """The same components as a pipeline of class ``cls`` (plus a ControlNet)."""
    params = inspect.signature(cls.__init__).parameters
    kwargs = {name: value for name, value in pipe.components.items() if name in params}
    for name in params:  # pipeline options kept in the config (requires_safety_checker, force_zeros_...)
        if name not in kwargs and name in pipe.config and not isinstance(pipe.config[name], (list, tuple)):
            kwargs[name] = pipe.config[name]
    if controlnet is not None:
        kwargs["controlnet"] = controlnet
    return cls(**kwargs)


def set_scheduler(pipe: Any, name: Optional[str]) -> None:
    if name is None:
        return
    import diffusers

    class_name, overrides, _ = SCHEDULERS[name]
    pipe.scheduler = getattr(diffusers, class_name).from_config(pipe.scheduler.config, **overrides)


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
        seed=request.seed if request.seed is not None else random.SystemRandom().randrange(2**32),
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


def vae_decode_bytes(vae: Any, width: int, height: int, batch: int, dtype: torch.dtype) -> int:
    """Rough peak memory of decoding the whole image in one piece."""
    channels = vae.config.block_out_channels[0]  # the decoder's last stage runs at full resolution
    return VAE_DECODE_MAPS * batch * channels * width * height * torch.finfo(dtype).bits // 8


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


def decide_vae_tiling(mode: str, needed: int, free: Optional[int]) -> bool:
    if mode in ("on", "off"):
        return mode == "on"
    return free is not None and needed > VAE_FREE_SHARE * free


def _gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB"


def prepare(request: Request) -> tuple[Request, Any, Any, dict, torch.device]:
    """Check, load and configure: (resolved request, pipeline, layout, input images, device)."""
    images = check_request(request)
    device, dtype = resolve_device(request.device, request.dtype)
    _quiet_libraries()
    pipe, layout = load_pipeline(request, dtype)
    request = resolve(request, pipe, layout, images)
    set_scheduler(pipe, request.scheduler)
    if request.cfgpp is not None:
        from ..diffusers.cfgpp import enable_cfgpp

        try:
            enable_cfgpp(pipe, scheduler=request.scheduler, guidance=request.cfgpp)
        except (TypeError, ValueError) as error:  # a model or scheduler CFG++ cannot run on
            raise UsageError(f"--cfgpp: {error}") from None
    pipe.to(device)
    # SDXL's VAE config asks the pipelines to decode in float32 whatever the model's dtype
    vae_dtype = torch.float32 if getattr(pipe.vae.config, "force_upcast", False) else pipe.vae.dtype
    needed = vae_decode_bytes(pipe.vae, request.width, request.height, request.batch, vae_dtype)
    free = free_memory_bytes(device)
    if decide_vae_tiling(request.vae_tiling, needed, free):
        pipe.vae.enable_tiling()
        why = (
            "as asked"
            if request.vae_tiling == "on"
            else f"decoding in one piece needs about {_gb(needed)}, {_gb(free)} free"
        )
        print(f"VAE tiling on: {request.width}x{request.height} x{request.batch} ({why})")
    return request, pipe, layout, images, device


def _quiet_libraries() -> None:
    """Loading chatter off (safety-checker notices, weight-loading bars); the step bar stays."""
    import diffusers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    try:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except (ImportError, AttributeError):
        pass


@dataclass
class Run:
    """One pipeline call: its images, time, peak memory, HiDiffusion preset and scheduler class."""

    images: list
    seconds: float
    peak_bytes: int
    preset: Optional[str]
    scheduler: str


def run_pipeline(request: Request, pipe: Any, images: dict, device: torch.device, label: str, quiet: bool) -> Run:
    import hidiff

    from .timing import PeakMemory

    kwargs = call_kwargs(request, pipe, images)
    pipe.set_progress_bar_config(desc=label, disable=quiet)
    with PeakMemory(device) as memory:
        start = time.perf_counter()
        out = pipe(**kwargs)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
    record = hidiff.last_call(pipe) if hidiff.is_patched(pipe) else None
    return Run(list(out.images), seconds, memory.peak, record.preset if record else None, type(pipe.scheduler).__name__)


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
            "vae_tiling": bool(getattr(pipe.vae, "use_tiling", False)),
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
    from PIL import Image

    load_image(path, "--from-image", "RGB")  # refuses a missing or non-image file
    with Image.open(path) as image:
        text = dict(getattr(image, "text", {}) or {})
    if METADATA_KEY not in text:
        raise UsageError(
            f"--from-image {path} has no '{METADATA_KEY}' metadata: only PNGs written by hidiff generate "
            "can be re-run (their text chunks may also have been stripped by an image editor)"
        )
    try:
        meta = json.loads(text[METADATA_KEY])
        known = {f.name for f in dataclasses.fields(Request)}
        unknown = sorted(set(meta["request"]) - known)
        if unknown:
            raise ValueError(f"unknown field(s) {', '.join(unknown)} (written by a newer hidiff?)")
        request = Request(**meta["request"])
        request.config  # noqa: B018 - validates the stored HiDiffusion config
    except (ValueError, KeyError, TypeError) as error:
        raise UsageError(f"--from-image {path}: unreadable hidiff metadata: {error}") from None
    for name, digest in (meta.get("inputs_sha256") or {}).items():
        value = getattr(request, name)
        if value and os.path.isfile(value) and _sha256(value) != digest:
            print(f"warning: {value} changed since {path} was made; the result will differ")
    return request, meta.get("index") if request.batch > 1 else None


# ------------------------------------------------------------------ output
def output_path(out: Optional[str], request: Request, index: Optional[int], suffix: str = "") -> Path:
    base = Path(out) if out else Path(f"hidiff-{request.seed}.png")
    stem = base.stem if base.suffix.lower() == ".png" else base.name
    if request.batch > 1:
        stem += f"-{index}"
    return base.with_name(f"{stem}{suffix}.png")


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
) -> list[Path]:
    """Run a request and write its PNGs; returns the paths written."""
    import hidiff

    if compare and not request.hidiff:
        raise UsageError("--compare runs with and without HiDiffusion; drop --no-hidiff")
    request, pipe, layout, images, device = prepare(request)
    indices = [only_index] if only_index is not None else list(range(request.batch))
    written: list[Path] = []
    runs: dict[str, Run] = {}
    if compare:
        plain = dataclasses.replace(request, hidiff=False)
        # one short untimed call first, so that neither timed run pays the first-call set-up
        # (img2img runs int(steps * strength) steps: enough steps for one)
        warmup_steps = math.ceil(1 / request.strength) + 1 if request.strength else 1
        pipe.set_progress_bar_config(desc="warm-up", disable=quiet)
        pipe(**dict(call_kwargs(plain, pipe, images), num_inference_steps=warmup_steps, output_type="latent"))
        runs["plain"] = run_pipeline(plain, pipe, images, device, "plain", quiet)
        written += _write(plain, runs["plain"], pipe, device, out, indices, "-plain")
    if request.hidiff:
        hidiff.apply_hidiffusion(pipe, config=request.config)
    runs["hidiff"] = run = run_pipeline(request, pipe, images, device, "hidiff" if request.hidiff else "plain", quiet)
    written += _write(request, run, pipe, device, out, indices, "-hidiff" if compare else "")
    if compare:
        times = {
            "plain_s": round(runs["plain"].seconds, 3),
            "hidiff_s": round(run.seconds, 3),
            "speedup": round(runs["plain"].seconds / run.seconds, 3),
        }
        for i in indices:
            path = output_path(out, request, i, "-compare")
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


def _write(
    request: Request, run: Run, pipe: Any, device: torch.device, out: Optional[str], indices: list, suffix: str
) -> list[Path]:
    paths = []
    for i in indices:
        path = output_path(out, request, i, suffix)
        save_png(
            run.images[i],
            path,
            {
                "parameters": a1111_parameters(request, i, run),
                METADATA_KEY: json.dumps(metadata(request, i, run, pipe, device)),
            },
        )
        paths.append(path)
    return paths


def main(args: Any) -> int:
    """``hidiff generate`` (argument parsing lives in :mod:`hidiff.cli`)."""
    request, index = request_from_args(args)
    out = args.out
    if args.from_image and not out:
        out = str(Path(args.from_image).with_name(Path(args.from_image).stem + "-rerun.png"))
    generate(request, out=out, compare=args.compare, only_index=index, quiet=args.quiet)
    return 0
