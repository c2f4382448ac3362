"""``hidiff generate``: images from a Stable Diffusion model with HiDiffusion, each PNG able to re-run itself.

The model (hub id, local diffusers folder or single ``.safetensors``/``.ckpt`` file) is
loaded as it is, its family read from the U-Net's structure, and the pipeline class
picked from the inputs (text-to-image, img2img, inpaint, each with or without a
ControlNet). Every PNG carries an A1111-style ``parameters`` text chunk and a ``hidiff``
JSON chunk holding the whole :class:`~hidiff.app.request.Request` and HiDiffusion config, so that
``hidiff generate --from-image FILE`` re-runs it.

This module is the command's order of work; each step is its own module:

- :mod:`~hidiff.app.request`: the Request, its fields' checks and choices;
- :mod:`~hidiff.app.generate_flags`: the flags and the Request they make;
- :mod:`~hidiff.app.validation`: the rules a Request must meet (no I/O);
- :mod:`~hidiff.app.inputs`: the input files, read before anything is loaded;
- :mod:`~hidiff.app.pipeline`: loading and setting up the pipeline, its call arguments;
- :mod:`~hidiff.app.run`: the timed call;
- :mod:`~hidiff.app.output` and :mod:`~hidiff.app.metadata`: the PNGs and what they carry.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Optional

from .args import UsageError
from .generate_flags import add_arguments, request_from_args
from .inputs import checked_inputs
from .metadata import png_text, save_png
from .output import check_outputs, output_path, side_by_side
from .pipeline import call_kwargs, prepare
from .request import Request, with_seed
from .run import Run, run_pipeline

__all__ = ["add_arguments", "generate", "main"]


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

    _check_command(request, compare)
    images = checked_inputs(request)
    request = with_seed(request)  # the default file name has it
    indices = _indices(request, only_index)
    suffixes = _suffixes(compare)
    check_outputs([output_path(out, request, i, s) for s in suffixes.values() for i in indices], overwrite)
    request, pipe, _, images, device, memory_plan = prepare(request, images)
    memory = memory_plan.to_dict()
    written: list[Path] = []
    plain = None
    if compare:
        plain = _plain_run(request, pipe, images, device, quiet, memory)
        written += _write(dataclasses.replace(request, hidiff=False), plain, pipe, device, out, indices, "-plain")
    if request.hidiff:
        hidiff.apply_hidiffusion(pipe, config=request.config)
    run = run_pipeline(request, pipe, images, device, "hidiff" if request.hidiff else "plain", quiet, memory)
    written += _write(request, run, pipe, device, out, indices, suffixes["hidiff"])
    if plain is not None:
        written += _write_comparison(request, plain, run, out, indices)
    _report(request, run, [r for r in (plain, run) if r is not None], pipe, device, len(indices), written)
    return written


def _check_command(request: Request, compare: bool) -> None:
    """The rules of the command's own flags (the request's are :func:`~hidiff.app.validation.check_request`)."""
    if compare and not request.hidiff:
        raise UsageError("--compare runs with and without HiDiffusion; drop --no-hidiff")
    if compare and request.progressive:
        raise UsageError("--compare times one direct run against another; drop --progressive or --compare")


def _indices(request: Request, only_index: Optional[int]) -> list[int]:
    """The images of the batch to write."""
    if only_index is None:
        return list(range(request.batch))
    if not 0 <= only_index < request.batch:
        raise UsageError(
            f"the --from-image metadata names image {only_index} of a batch of {request.batch}, which does not "
            f"exist; pass --batch {request.batch} to re-run the whole batch"
        )
    return [only_index]


def _suffixes(compare: bool) -> dict[str, str]:
    """The file name suffix of each image a run writes: with --compare plain, hidiff and side by side."""
    return {"plain": "-plain", "hidiff": "-hidiff", "compare": "-compare"} if compare else {"hidiff": ""}


def _plain_run(request: Request, pipe: Any, images: dict, device: Any, quiet: bool, memory: dict) -> Run:
    """--compare's run without HiDiffusion, after one short untimed call, so that neither timed run
    pays the first call's set-up."""
    plain = dataclasses.replace(request, hidiff=False)
    # img2img runs int(steps * strength) steps: enough steps for one
    warmup_steps = math.ceil(1 / request.strength) + 1 if request.strength else 1
    pipe.set_progress_bar_config(desc="warm-up", disable=quiet)
    pipe(**dict(call_kwargs(plain, pipe, images), num_inference_steps=warmup_steps, output_type="latent"))
    return run_pipeline(plain, pipe, images, device, "plain", quiet, memory)


def _write(
    request: Request, run: Run, pipe: Any, device: Any, out: Optional[str], indices: list, suffix: str
) -> list[Path]:
    paths = []
    for i in indices:
        path = output_path(out, request, i, suffix)
        save_png(run.images[i], path, png_text(request, i, run, pipe, device))
        paths.append(path)
    return paths


def _write_comparison(request: Request, plain: Run, run: Run, out: Optional[str], indices: list) -> list[Path]:
    """--compare's side-by-side PNGs (plain left, hidiff right) with both times; prints the speed-up."""
    times = {
        "plain_s": round(plain.seconds, 3),
        "hidiff_s": round(run.seconds, 3),
        "speedup": round(plain.seconds / run.seconds, 3),
    }
    paths = []
    for i in indices:
        path = output_path(out, request, i, "-compare")
        text = {"hidiff-compare": json.dumps({"left": "plain", "right": "hidiff", **times})}
        save_png(side_by_side(plain.images[i], run.images[i]), path, text)
        paths.append(path)
    print(
        f"plain {times['plain_s']:.2f} s, hidiff {times['hidiff_s']:.2f} s: {times['speedup']:.2f}x "
        f"(side by side: plain left, hidiff right)"
    )
    return paths


def _report(request: Request, run: Run, runs: list, pipe: Any, device: Any, count: int, written: list) -> None:
    peak = max(r.peak_bytes for r in runs)
    memory = "max allocated" if device.type == "cuda" else "process RSS"
    state = f"hidiff {run.preset or 'inactive at this size'}" if request.hidiff else "hidiff off"
    print(
        f"{count} image(s) {request.width}x{request.height}, {request.steps} steps, {state}: "
        f"{run.seconds:.2f} s, peak memory {peak / 2**20:.0f} MiB ({memory}), {device} {pipe.unet.dtype}"
    )
    for path in written:
        print(f"wrote {path}")


def main(args: Any) -> int:
    """``hidiff generate`` from the flags of :func:`~hidiff.app.generate_flags.add_arguments`."""
    request, index = request_from_args(args)
    out = args.out
    if args.from_image and not out:
        out = str(Path(args.from_image).with_name(Path(args.from_image).stem + "-rerun.png"))
    generate(request, out=out, compare=args.compare, only_index=index, quiet=args.quiet, overwrite=args.overwrite)
    return 0
