"""Loading what the commands run: a diffusers pipeline from a hub id, a local folder or one
single-file checkpoint (``hidiff generate``, ``hidiff bench --model``), or the shipped toy model
(``toy``, or a folder it was saved to), a ControlNet, the pipeline class a task needs, a named
scheduler, and the device and dtype.

Bad local paths and inputs are :class:`~hidiff.app.args.UsageError` (exit 2); what a
model that exists could not do is :class:`ModelLoadError` (exit 1).
"""

from __future__ import annotations

import inspect
import json
import os
import warnings
from contextlib import contextmanager
from typing import Any, Iterator, Optional

import torch

from .args import AUTO, SCHEDULERS, UsageError

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
CONTROLNET_FILE_SUFFIXES = (".safetensors", ".pth", ".ckpt")
TASKS = ("text2img", "img2img", "inpaint")
_TASK_NAMES = dict(zip(TASKS, ("", "Img2Img", "Inpaint")))


class ModelLoadError(RuntimeError):
    """The model or ControlNet could not be loaded (exit code 1)."""


#: The --model name of the toy model hidiff ships (hidiff.app.toy).
TOY = "toy"


def toy_folder(model: str) -> Optional[str]:
    """The folder of the toy model that ``model`` names: the shipped weights for ``toy``, the folder
    itself for a folder the toy pipeline was saved to; None for any other model."""
    if model == TOY:
        from .toy.pipeline import WEIGHTS

        return str(WEIGHTS)
    index = os.path.join(model, "model_index.json")
    if os.path.isfile(index):
        try:
            with open(index) as f:
                if json.load(f).get("_class_name") == "ToyPipeline":
                    return model
        except (OSError, ValueError, AttributeError):
            return None
    return None


def pixels_per_cell(model: str) -> int:
    """Image pixels per U-Net cell of a --model: 1 for the toy (pixel space), 8 for the Stable
    Diffusion families (their VAE)."""
    return 1 if toy_folder(model) is not None else 8


def load_toy(folder: str, dtype: torch.dtype) -> Any:
    """The toy pipeline from ``folder`` (diffusers cannot: its class is hidiff's, not diffusers')."""
    from .toy.pipeline import load_toy_pipeline

    try:
        return load_toy_pipeline(folder).to(dtype)
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"cannot load the toy model from {folder}: {_short(error)}") from None


def pipeline_class_name(kind: str, task: str, controlnet: bool) -> str:
    """The diffusers pipeline for a U-Net layout and task, e.g. StableDiffusionXLControlNetInpaintPipeline."""
    return f"StableDiffusion{'XL' if kind == 'sdxl' else ''}{'ControlNet' if controlnet else ''}{_TASK_NAMES[task]}Pipeline"


def resolve_device(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    """``auto``: cuda, then mps, then cpu; half precision on GPUs, float32 on CPU."""
    if device == AUTO:
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
    if dtype == AUTO:
        return dev, torch.float16 if dev.type in ("cuda", "mps") else torch.float32
    return dev, getattr(torch, dtype)


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
    if _local_looking(model, SINGLE_FILE_SUFFIXES):
        raise UsageError(f"--model {model}: no such file or folder")
    return "hub"


def _local_looking(name: str, suffixes: tuple[str, ...]) -> bool:
    """Whether a name that is no local file or folder was meant as one (not a hub id ``org/model``)."""
    return name.lower().endswith(suffixes) or name.startswith((".", "/", "~")) or name.count("/") > 1


def _from_pretrained(cls: Any, name: str, flag: str, what: str, dtype: torch.dtype, errors: tuple) -> Any:
    """``cls.from_pretrained`` of a hub id or local folder, its ``errors`` a ModelLoadError that says what to pass."""
    try:
        return cls.from_pretrained(name, torch_dtype=dtype)
    except errors as error:
        if not os.path.isdir(name):
            raise _hub_error(flag, name, error) from None
        raise ModelLoadError(f"cannot load the {what} folder {name}: {error}") from None


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


def load_base_pipeline(model: str, config_folder: Optional[str], dtype: torch.dtype) -> Any:
    """The model as diffusers loads it (its own pipeline class); ``config_folder``: the component
    configs of a single-file checkpoint (a local diffusers folder of its family)."""
    import diffusers

    toy = toy_folder(model)
    if toy is not None:
        return load_toy(toy, dtype)
    source = model_source(model)
    if source == "file":
        kind = single_file_kind(checkpoint_keys(model))
        cls = getattr(diffusers, pipeline_class_name(kind, "text2img", False))
        kwargs: dict[str, Any] = {"torch_dtype": dtype}
        if config_folder:
            if not single_file_takes_config():
                raise ModelLoadError(
                    f"this diffusers ({diffusers.__version__}) builds single-file pipelines only from the original "
                    "LDM YAML configs, fetched online, and ignores a local diffusers folder: --config needs a newer "
                    "diffusers (with the single-file loaders of FromOriginalModelMixin). Upgrade diffusers, or convert "
                    "the checkpoint to a diffusers folder once while online and pass that folder as --model."
                )
            kwargs["config"] = config_folder
        try:
            return cls.from_single_file(model, **kwargs)
        except Exception as error:
            if config_folder:
                raise ModelLoadError(f"cannot load {model} with the configs of {config_folder}: {error}") from None
            raise ModelLoadError(
                f"cannot load {model} ({_short(error)}). Without --config, diffusers fetches the component "
                "configs of the checkpoint's family from the Hugging Face Hub; offline, pass --config FOLDER, a "
                "local diffusers folder of the same family (SD 1.x, 2.x or SDXL)."
            ) from None
    if source == "folder" and not os.path.isfile(os.path.join(model, "model_index.json")):
        raise UsageError(
            f"--model {model} is a folder without model_index.json: pass the folder of a whole "
            "diffusers pipeline (the one save_pretrained writes), not of one component"
        )
    return _from_pretrained(diffusers.DiffusionPipeline, model, "--model", "diffusers", dtype, (OSError, ValueError))


def load_controlnet(name: str, dtype: torch.dtype, unet: Any) -> Any:
    """A ControlNet from a hub id, a diffusers folder or one original-layout file (configured from ``unet``)."""
    import diffusers

    if os.path.isfile(name):
        return load_controlnet_file(name, dtype, unet)
    if not os.path.isdir(name) and _local_looking(name, CONTROLNET_FILE_SUFFIXES):
        raise UsageError(
            f"--controlnet {name}: no such file or folder; pass a ControlNet hub id, a local diffusers "
            "ControlNet folder or a .safetensors/.pth/.ckpt file"
        )
    return _from_pretrained(diffusers.ControlNetModel, name, "--controlnet", "ControlNet", dtype, (OSError,))


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


def load_pipeline(
    model: str, config_folder: Optional[str], controlnet_name: Optional[str], task: str, dtype: torch.dtype
) -> tuple[Any, Any]:
    """(pipeline of the class a task (one of :data:`TASKS`) needs, with the ControlNet if named; U-Net layout)."""
    import diffusers

    from ..diffusers.model import detect_layout, find_unet

    toy = toy_folder(model) is not None
    if toy:
        check_toy_task(model, controlnet_name, task)
    with torch_dtype_accepted():
        base = load_base_pipeline(model, config_folder, dtype)
        controlnet = load_controlnet(controlnet_name, dtype, base.unet) if controlnet_name else None
    layout = detect_layout(find_unet(base)[0])
    if toy:
        return base, layout  # the toy pipeline runs text-to-image and image-to-image itself
    if layout.inpainting and task != "inpaint":
        raise UsageError(f"{model} is an inpainting model (9-channel U-Net): pass --image and --mask")
    if controlnet is not None and controlnet.config.cross_attention_dim != base.unet.config.cross_attention_dim:
        raise UsageError(
            f"--controlnet {controlnet_name} is for another family (text width "
            f"{controlnet.config.cross_attention_dim}, the model's is {base.unet.config.cross_attention_dim})"
        )
    name = pipeline_class_name(layout.kind, task, controlnet is not None)
    cls = getattr(diffusers, name, None)
    if cls is None:
        raise ModelLoadError(f"this diffusers ({diffusers.__version__}) has no {name}; upgrade diffusers for this task")
    return _rebuild(base, cls, controlnet), layout


def check_toy_task(model: str, controlnet_name: Optional[str], task: str) -> None:
    """The toy model runs text-to-image and image-to-image, nothing else."""
    if controlnet_name:
        raise UsageError(f"--model {model} is the toy model, which takes no ControlNet; leave out --controlnet")
    if task == "inpaint":
        raise UsageError(f"--model {model} is the toy model, which cannot inpaint; leave out --mask")


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


def quiet_libraries() -> None:
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
