"""The rules a :class:`~hidiff.app.request.Request` must meet, checked without reading a file or
loading a model: each refusal is a :class:`~hidiff.app.args.UsageError` naming the flag and the fix."""

from __future__ import annotations

from typing import Optional

from .args import CFGPP_SCHEDULERS, SEED_MAX, UsageError, check_value, denoising_steps, side_multiple_of
from .request import CHECKS, CHOICES, Request, check_fields


def check_request(request: Request) -> None:
    """Refuse a request that breaks a rule, before anything is read or loaded."""
    _check_values(request)
    _check_inputs(request)
    _check_cfgpp(request)
    _check_progressive(request)
    if request.task != "text2img" and request.steps is not None and request.strength is not None:
        denoising_steps(request.steps, request.strength)


def _check_values(request: Request) -> None:
    """Each field's own check and choices, and the seeds of a batch."""
    check_fields(request, CHECKS, CHOICES)
    if request.seed is not None and request.seed + request.batch - 1 > SEED_MAX:
        raise UsageError(
            f"--seed {request.seed} with --batch {request.batch}: image k uses seed + k, which must stay "
            f"at most 2**64 - 1; pass --seed {SEED_MAX - request.batch + 1} or less"
        )


def _check_inputs(request: Request) -> None:
    """The input images that go together."""
    if request.mask and not request.image:
        raise UsageError("--mask needs --image: inpainting repaints the white part of the mask on that image")
    if request.controlnet and not request.control_image:
        raise UsageError("--controlnet needs --control-image FILE (the conditioning image: edges, depth, pose...)")
    if request.control_image and not request.controlnet:
        raise UsageError("--control-image needs --controlnet MODEL (a ControlNet hub id or local diffusers folder)")


def _check_cfgpp(request: Request) -> None:
    if request.cfgpp is None:
        return
    if request.scheduler not in CFGPP_SCHEDULERS:
        raise UsageError(f"--cfgpp needs --scheduler, one of {', '.join(CFGPP_SCHEDULERS)} (got {request.scheduler})")
    if request.guidance is not None and request.guidance <= 1:
        raise UsageError(
            "--cfgpp needs the unconditional branch: leave --guidance unset or above 1 "
            "(its value is not used under CFG++)"
        )


def _check_progressive(request: Request) -> None:
    if not request.progressive and (request.progressive_start is not None or request.progressive_strength is not None):
        raise UsageError("--progressive-start and --progressive-strength need --progressive")
    if request.progressive and request.task == "inpaint":
        raise UsageError(
            "--progressive does not run with --mask: inpainting repaints a region of the given image at its size; "
            "drop --progressive"
        )
    if request.progressive and not request.hidiff:
        raise UsageError("--progressive runs HiDiffusion in every pass; drop --no-hidiff")


def check_size(width: Optional[int], height: Optional[int], multiple: int) -> None:
    """Refuse a side (of those given) that is not a positive multiple of the VAE's scale factor."""
    for name, side in (("--width", width), ("--height", height)):
        if side is not None:
            check_value(name, side, side_multiple_of(multiple))
