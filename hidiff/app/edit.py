"""``hidiff edit``: change a picture from a source prompt to a target prompt by CFG++ inversion.

The command runs :func:`hidiff.edit` on a Stable Diffusion model (hub id, local folder or
single file, as ``hidiff generate`` loads them) or on the shipped toy model (``--model toy``,
or a folder written by tools/train_toy.py). The PNG it writes carries a ``hidiff-edit``
JSON chunk with the whole :class:`EditRequest` (input paths made absolute, their SHA-256),
so ``hidiff edit --from-image OUT.png`` re-runs the edit (flags given override it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from ..core.cfgpp import SAMPLERS
from ..diffusers.edit import DEFAULT_EDIT_GUIDANCE
from .args import (
    AUTO,
    DTYPES,
    UsageError,
    cfgpp_lambda,
    finite,
    img2img_strength,
    positive,
    seed,
)
from .inputs import load_image, sha256
from .metadata import read_request, save_png
from .output import check_outputs, output_base
from .request import check_fields, typed_flag

METADATA_KEY = "hidiff-edit"
TOY = "toy"
HIDIFF_MODES = (AUTO, "on", "off")


@dataclass
class EditRequest:
    """Everything that determines an edit: what the ``hidiff-edit`` PNG chunk stores and re-runs."""

    model: str
    image: str
    source_prompt: str
    prompt: str
    negative_prompt: str = ""
    mask: Optional[str] = None
    strength: float = 0.6
    steps: int = 50
    cfgpp: Optional[float] = None  # CFG++ lam; None with cfg_scale None: the default lam
    cfg_scale: Optional[float] = None  # ordinary CFG inversion and sampling instead
    scheduler: str = "ddim"
    seed: Optional[int] = None
    hidiff: str = AUTO
    device: str = AUTO
    dtype: str = AUTO


CHECKS: dict[str, Any] = {
    "strength": img2img_strength,
    "steps": positive,
    "cfgpp": cfgpp_lambda,
    "cfg_scale": finite,
    "seed": seed,
}
CHOICES: dict[str, tuple[str, ...]] = {"scheduler": SAMPLERS, "hidiff": HIDIFF_MODES, "dtype": (AUTO, *DTYPES)}
_FLAG_FIELDS = tuple(f.name for f in dataclasses.fields(EditRequest))


def _typed(name: str) -> Any:
    return typed_flag(EditRequest, CHECKS, name)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    inputs = parser.add_argument_group("model and inputs")
    inputs.add_argument("--model", help=f"hub id, local diffusers folder, single file, or '{TOY}' (the shipped toy)")
    inputs.add_argument("--image", help="the picture to edit (its size is kept: multiples of 8)")
    inputs.add_argument("--mask", help="where the picture may change (white), the image's size; default: everywhere")
    inputs.add_argument("--from-image", metavar="PNG", help="re-run a PNG written by hidiff edit (flags override)")
    run = parser.add_argument_group("edit")
    run.add_argument("--source-prompt", help="what the picture shows (the inversion's prompt)")
    run.add_argument("--prompt", help="what it should show")
    run.add_argument("--negative-prompt")
    run.add_argument(
        "--strength", type=_typed("strength"), help="share of the steps inverted and redrawn, in (0, 1] (default 0.6)"
    )
    run.add_argument("--steps", type=_typed("steps"), help="schedule length (default 50); strength x steps run")
    run.add_argument(
        "--cfgpp",
        type=_typed("cfgpp"),
        metavar="LAMBDA",
        help=f"CFG++ guidance in [0, 1] (default {DEFAULT_EDIT_GUIDANCE})",
    )
    run.add_argument(
        "--cfg-scale", type=_typed("cfg_scale"), help="ordinary CFG inversion and sampling at this scale instead"
    )
    run.add_argument("--scheduler", choices=SAMPLERS, help="the sampler after the DDIM inversion (default ddim)")
    run.add_argument("--seed", type=_typed("seed"), help="for euler-a's noise (default: random, recorded)")
    run.add_argument("--hidiff", choices=HIDIFF_MODES, help="HiDiffusion: auto (default: above native size), on, off")
    run.add_argument("--device", help="auto (default), cpu, cuda, cuda:N, mps")
    run.add_argument("--dtype", choices=CHOICES["dtype"], help="auto (default): float16 on GPUs, float32 on CPU")
    run.add_argument("--out", help="output PNG (default hidiff-SEED.png, or inside a folder)")
    run.add_argument("--overwrite", action="store_true", help="replace an output file that exists")


def request_from_args(args: Any) -> EditRequest:
    """The request of a command line: ``--from-image`` metadata (if given) overridden by the flags given."""
    given = {name: getattr(args, name) for name in _FLAG_FIELDS if getattr(args, name, None) is not None}
    if args.from_image:
        request = dataclasses.replace(read_metadata(args.from_image), **given)
    else:
        missing = [f"--{n.replace('_', '-')}" for n in ("model", "image", "source_prompt", "prompt") if n not in given]
        if missing:
            raise UsageError(f"{', '.join(missing)} required (or --from-image PNG written by hidiff edit)")
        request = EditRequest(**given)
    if "cfg_scale" in given and "cfgpp" not in given:
        request = dataclasses.replace(request, cfgpp=None)
    if "cfgpp" in given and "cfg_scale" not in given:
        request = dataclasses.replace(request, cfg_scale=None)
    changes = {n: os.path.abspath(getattr(request, n)) for n in ("image", "mask") if getattr(request, n)}
    if request.model != TOY and os.path.exists(request.model):
        changes["model"] = os.path.abspath(request.model)
    return dataclasses.replace(request, **changes)


def check_request(request: EditRequest) -> dict[str, Any]:
    """Refuse bad input before a model is loaded; returns the opened image (and mask)."""
    check_fields(request, CHECKS, CHOICES)
    if request.cfgpp is not None and request.cfg_scale is not None:
        raise UsageError("--cfgpp (CFG++) and --cfg-scale (ordinary CFG) exclude each other; pass one")
    if request.cfg_scale is not None and request.cfg_scale < 1:
        raise UsageError(f"--cfg-scale must be at least 1, got {request.cfg_scale}")
    for name in ("source_prompt", "prompt"):
        if not getattr(request, name).strip():
            raise UsageError(f"--{name.replace('_', '-')} is empty; describe the picture (source) and the change")
    images = {"image": load_image(request.image, "--image", "RGB")}
    if request.mask:
        images["mask"] = load_image(request.mask, "--mask", "L")
        if images["mask"].size != images["image"].size:
            raise UsageError(
                f"--mask is {images['mask'].width}x{images['mask'].height} but --image is "
                f"{images['image'].width}x{images['image'].height}; pass a mask of the image's size"
            )
    return images


def load(request: EditRequest) -> tuple[Any, Any]:
    """(pipeline, device) of the request's model."""
    from .loading import load_pipeline, quiet_libraries, resolve_device
    from .toy.pipeline import ToyPipeline, load_toy_pipeline

    device, dtype = resolve_device(request.device, request.dtype)
    quiet_libraries()
    index = Path(request.model) / "model_index.json"
    if request.model == TOY or (index.is_file() and ToyPipeline.__name__ in index.read_text()):
        pipe = load_toy_pipeline(None if request.model == TOY else request.model).to(dtype)
    else:
        pipe, _ = load_pipeline(request.model, None, None, "text2img", dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device), device


def run_edit(request: EditRequest, pipe: Any, images: dict) -> Any:
    """The edited PIL image."""
    import torch

    import hidiff

    hidiffusion = {AUTO: None, "on": True, "off": False}[request.hidiff]
    try:
        out = hidiff.edit(
            pipe,
            images["image"],
            request.source_prompt,
            request.prompt,
            strength=request.strength,
            num_inference_steps=request.steps,
            guidance=request.cfgpp,
            cfg_scale=request.cfg_scale,
            sampler=request.scheduler,
            mask=images.get("mask"),
            negative_prompt=request.negative_prompt or None,
            hidiffusion=hidiffusion,
            generator=torch.Generator("cpu").manual_seed(request.seed or 0),
        )
    except (ValueError, TypeError) as error:  # the picture, prompts or model the edit cannot take
        raise UsageError(str(error)) from None
    return out.images[0]


def metadata(request: EditRequest, pipe: Any) -> dict[str, Any]:
    import diffusers
    import torch

    import hidiff

    return {
        "format": 1,
        "request": dataclasses.asdict(request),
        "inputs_sha256": {n: sha256(getattr(request, n)) for n in ("image", "mask") if getattr(request, n)},
        "run": {
            "pipeline": type(pipe).__name__,
            "dtype": str(pipe.unet.dtype).replace("torch.", ""),
            "hidiff_version": hidiff.__version__,
            "diffusers_version": diffusers.__version__,
            "torch_version": torch.__version__,
        },
    }


def read_metadata(path: str) -> EditRequest:
    """The request of a PNG written by ``hidiff edit``."""
    request, _ = read_request(path, METADATA_KEY, EditRequest, "hidiff edit")
    return request


def main(args: Any) -> int:
    request = request_from_args(args)
    images = check_request(request)
    if request.seed is None:
        request = dataclasses.replace(request, seed=random.SystemRandom().randrange(2**32))
    if request.cfgpp is None and request.cfg_scale is None:
        request = dataclasses.replace(request, cfgpp=DEFAULT_EDIT_GUIDANCE)
    out = args.out
    if args.from_image and not out:
        out = str(Path(args.from_image).with_name(Path(args.from_image).stem + "-rerun.png"))
    path = output_base(out, request.seed)
    check_outputs([path], args.overwrite)
    pipe, _ = load(request)
    edited = run_edit(request, pipe, images)
    save_png(edited, path, {METADATA_KEY: json.dumps(metadata(request, pipe))})
    guidance = f"CFG++ lam {request.cfgpp}" if request.cfgpp is not None else f"CFG {request.cfg_scale}"
    print(f"edited {edited.width}x{edited.height}, {request.steps} x {request.strength} steps, {guidance}")
    print(f"wrote {path}")
    return 0
