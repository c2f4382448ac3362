"""The ``hidiff generate`` flags (``hidiff batch`` takes them too) and the :class:`Request` they make:
``--from-image`` metadata overridden by the flags given, local paths made absolute."""

from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Any, Optional

from ..core.config import HiDiffusionConfig
from ..core.progressive import DEFAULT_STRENGTH
from .args import CFGPP_SCHEDULERS, UsageError, add_config_flags, config_from_args
from .metadata import read_metadata
from .request import CHECKS, CHOICES, Request, typed_flag


def _typed(name: str) -> Any:
    return typed_flag(Request, CHECKS, name)


def add_arguments(gen: argparse.ArgumentParser) -> None:
    """The ``hidiff generate`` flags; each Request field but the config has one of the same name (its dest)."""
    _add_input_flags(gen.add_argument_group("model and inputs"))
    run = gen.add_argument_group("generation")
    _add_generation_flags(run)
    _add_device_flags(run)
    _add_progressive_flags(run)
    _add_output_flags(run)
    add_config_flags(gen)


def _add_input_flags(model: Any) -> None:
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


def _add_generation_flags(run: Any) -> None:
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


def _add_device_flags(run: Any) -> None:
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


def _add_progressive_flags(run: Any) -> None:
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


def _add_output_flags(run: Any) -> None:
    run.add_argument(
        "--out",
        help="output PNG (default hidiff-SEED.png; a name without a suffix gets .png; an existing folder, or a "
        "name ending in /: hidiff-SEED.png inside it); batches add -K, --compare adds -plain/-hidiff/-compare",
    )
    run.add_argument("--overwrite", action="store_true", help="replace output files that exist (default: refuse)")
    run.add_argument("--quiet", action="store_true", help="no progress bar")


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
