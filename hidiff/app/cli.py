"""The ``hidiff`` command: its parser and subcommands, and ``info`` (a dry run of what HiDiffusion would do).

``generate``, ``demo``/``eval`` and ``bench`` live in their own modules (their flags too);
what they share (flags, checks, choices, exit codes) is in :mod:`hidiff.app.args`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from .args import (
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_USAGE,
    FAMILY_NAMES,
    ArgumentParser,
    UsageError,
    add_config_flags,
    config_from_args,
    flag,
    keywords_for,
    positive,
    set_threads,
)


def load_unet_skeleton(model: str):
    """A U-Net with no weights (meta device) and the pixels per latent cell, for a family name, ``toy`` or a
    local model folder: 8 for the Stable Diffusion families (their VAE), otherwise read from the folder's
    VAE config, and 1 for a pipeline without a VAE (a pixel-space model such as the shipped toy model)."""
    import torch
    from diffusers import UNet2DConditionModel

    from ..diffusers.unet_configs import FULL_UNET_CONFIGS

    if model in FULL_UNET_CONFIGS:
        config, factor = dict(FULL_UNET_CONFIGS[model]), 8
    else:
        from .loading import toy_folder

        path = Path(toy_folder(model) or model)  # "toy": the shipped toy model's folder
        if not path.is_dir():
            raise UsageError(
                f"--model {model!r} is neither a family name ({', '.join(FAMILY_NAMES)}) nor a local diffusers folder"
            )
        sub = "unet" if (path / "unet" / "config.json").exists() else None
        try:
            config = UNet2DConditionModel.load_config(str(path), subfolder=sub)
        except (OSError, ValueError) as error:
            raise UsageError(f"cannot read a U-Net config in {path}: {error}") from None
        factor = _pixels_per_latent(path)
    with torch.device("meta"):
        return UNet2DConditionModel.from_config(config), factor


def _pixels_per_latent(pipeline_folder: Path) -> int:
    vae_config, index = pipeline_folder / "vae" / "config.json", pipeline_folder / "model_index.json"
    try:
        if vae_config.exists():
            return 2 ** (len(json.loads(vae_config.read_text())["block_out_channels"]) - 1)
        if index.exists() and "vae" not in json.loads(index.read_text()):
            return 1  # a whole pipeline without a VAE: the U-Net denoises pixels
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise UsageError(f"cannot read the VAE's scale in {pipeline_folder}: {error}") from None
    return 8  # a U-Net alone: assume a Stable Diffusion VAE


def describe(model: str, height: int, width: int, steps: int, config, memory=None) -> dict[str, Any]:
    """What ``apply_hidiffusion`` would do for one call, without running anything."""
    from ..core.presets import PRESETS
    from ..diffusers.model import detect_architecture
    from ..diffusers.patch import Patch

    unet, factor = load_unet_skeleton(model)
    arch = detect_architecture(unet)
    if height % factor or width % factor or height <= 0 or width <= 0:
        raise UsageError(f"height and width must be positive multiples of {factor}, got {height}x{width}")
    latent = (height // factor, width // factor)
    patch = Patch(unet, None, arch, config, None)
    plans = [patch.plan(latent, i, steps) for i in range(steps)]
    preset = PRESETS[plans[0].preset] if plans[0].active else None
    info: dict[str, Any] = {
        "model": model,
        "family": arch.family,
        "layout": arch.kind,
        "inpainting": arch.inpainting,
        "pixels_per_latent": factor,
        "native": [factor * arch.native[0], factor * arch.native[1]],
        "size": [height, width],
        "steps": steps,
        "preset": preset.name if preset else None,
        "why": _why(arch, (height, width), latent, steps, config, preset),
        "modules": patch.describe() if preset else {},
        "conv_steps": [i for i, p in enumerate(plans) if p.conv],
        "pool_steps": [i for i, p in enumerate(plans) if p.pool],
        "window_steps": [i for i, p in enumerate(plans) if p.windows],
        "kv_steps": [i for i, p in enumerate(plans) if p.kv > 1],
        "kv_stages": _kv_paths(arch, config) if preset and config.kv_downsample > 1 else [],
        "config": config.to_dict(),
    }
    if memory is not None:
        from .memory_plan import info_rows

        info["memory"] = info_rows(unet, arch, factor, height, width, steps, config, *memory)
    return info


def _kv_paths(arch, config) -> list[str]:
    """The stages whose self-attention key/value downsampling acts on (down stage, then its mirror)."""
    return [
        f"{kind}_blocks.{k if kind == 'down' else arch.up_index(k)}"
        for k in arch.kv_stages(config.kv_levels)
        for kind in ("down", "up")
    ]


def _why(arch, size, latent, steps, config, preset) -> str:
    if preset is None:
        return f"{size[1]}x{size[0]} is at or below native; at_native='skip' leaves it untouched"
    if config.preset:
        return "forced by --preset"
    return f"{preset.note} (latent {latent[0]}x{latent[1]}, native {arch.native[0]}x{arch.native[1]}, {steps} steps)"


def cmd_info(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    memory = (args.batch, args.dtype, args.attention)
    info = describe(args.model, args.height, args.width, args.steps, config, memory)
    if args.json:
        print(json.dumps(info, indent=2))
        return EXIT_OK
    print(f"model     {info['model']}")
    print(f"family    {info['family']} (layout {info['layout']}{', inpainting' if info['inpainting'] else ''})")
    print(f"native    {info['native'][1]}x{info['native'][0]}")
    print(f"size      {args.width}x{args.height}, {args.steps} steps")
    print(f"preset    {info['preset']}: {info['why']}")
    print("modules")
    for name, what in info["modules"].items():
        print(f"  {name}: {what}")
    for key in ("conv_steps", "pool_steps", "window_steps", "kv_steps"):
        print(f"{key:<13} {_ranges(info[key])}")
    from .memory_plan import format_info

    for line in format_info(info["memory"], *memory):
        print(line)
    if info["kv_stages"]:
        print(f"{'kv_stages':<13} {', '.join(info['kv_stages'])}")
    return EXIT_OK


def _ranges(steps: list) -> str:
    if not steps:
        return "none"
    spans, start = [], steps[0]
    for prev, cur in zip(steps, steps[1:] + [None]):
        if cur is None or cur != prev + 1:
            spans.append(f"{start}" if start == prev else f"{start}-{prev}")
            start = cur
    return ", ".join(spans)


def cmd_demo(args: argparse.Namespace) -> int:
    from .eval import demo_main

    return _run_toy_command(demo_main, args)


def _run_toy_command(run: Any, args: argparse.Namespace) -> int:
    """``hidiff eval`` / ``hidiff demo``: a bad prompt, size or model folder is a usage error."""
    try:
        run(args)
    except (ValueError, FileNotFoundError) as error:
        raise UsageError(str(error)) from None
    return EXIT_OK


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import run_bench
    from .bench_report import format_table, write_plot

    if args.plot:
        try:
            import matplotlib  # noqa: F401  (checked before minutes of timing, not after)
        except ImportError:
            raise UsageError("--plot needs matplotlib: pip install 'hidiff[bench]'") from None
    from .loading import resolve_device

    device, _ = resolve_device(args.device, args.dtype)  # a device this torch has, before any model is built
    set_threads(args)
    try:
        result = run_bench(**keywords_for(run_bench, args, device=str(device)))
    except ValueError as error:
        raise UsageError(str(error)) from None
    if args.json and args.json != "-":
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2) if args.json == "-" else format_table(result))
    if args.plot:
        write_plot(result, args.plot)
        print(f"chart written to {args.plot}", file=sys.stderr)
    return EXIT_OK


def cmd_eval(args: argparse.Namespace) -> int:
    from .eval import main as eval_main

    return _run_toy_command(eval_main, args)


def cmd_generate(args: argparse.Namespace) -> int:
    from .generate import main as generate_main

    return generate_main(args)


def cmd_edit(args: argparse.Namespace) -> int:
    from .edit import main as edit_main

    return edit_main(args)


def cmd_batch(args: argparse.Namespace) -> int:
    from .batch import main as batch_main

    return batch_main(args)


GENERATE_DESCRIPTION = (
    "Text-to-image; --image: img2img; --image --mask: inpaint; --controlnet with --control-image: "
    "ControlNet (with any of those). Unset flags take the model's defaults; the size defaults to 2x the "
    "model's native size (or the input image's size). Output files that exist are kept unless --overwrite. "
    "Exit codes: 0 done, 2 bad usage, 1 failure."
)


def build_parser() -> argparse.ArgumentParser:
    from .batch import BATCH_DESCRIPTION
    from .batch import add_arguments as add_batch_arguments
    from .bench import add_arguments as add_bench_arguments
    from .edit import add_arguments as add_edit_arguments
    from .eval import add_arguments as add_eval_arguments
    from .eval import add_demo_arguments
    from .generate_flags import add_arguments as add_generate_arguments

    parser = ArgumentParser(prog="hidiff", description="HiDiffusion for diffusers Stable Diffusion pipelines")
    sub = parser.add_subparsers(dest="command", required=True)
    commands = (
        ("info", "dry run: what HiDiffusion would change for a model and size", _add_info_arguments, cmd_info),
        (
            "generate",
            "generate images with HiDiffusion; every PNG carries what re-runs it",
            add_generate_arguments,
            cmd_generate,
        ),
        (
            "edit",
            "edit a picture from a source prompt to a target prompt by CFG++ inversion",
            add_edit_arguments,
            cmd_edit,
        ),
        (
            "batch",
            "images for every line of a prompt file: resumable, sharded under accelerate launch",
            add_batch_arguments,
            cmd_batch,
        ),
        (
            "demo",
            "the shipped toy model at 4x native without and with HiDiffusion (CPU, ~1 min)",
            add_demo_arguments,
            cmd_demo,
        ),
        (
            "eval",
            "duplication metric on the shipped toy model: methods x sizes, counted objects",
            add_eval_arguments,
            cmd_eval,
        ),
        (
            "bench",
            "time baseline / hidiff / RAU-Net only / MSW-MSA only (/ the published package) side by side",
            add_bench_arguments,
            cmd_bench,
        ),
    )
    descriptions = {"generate": GENERATE_DESCRIPTION, "batch": BATCH_DESCRIPTION}
    for name, summary, add_arguments, run in commands:
        command = sub.add_parser(name, help=summary, description=descriptions.get(name, summary))
        add_arguments(command)
        command.set_defaults(run=run)
    return parser


def _add_info_arguments(info: argparse.ArgumentParser) -> None:
    info.add_argument(
        "--model", required=True, help=f"a family name ({', '.join(FAMILY_NAMES)}) or a local diffusers folder"
    )
    info.add_argument("--width", type=flag(positive), required=True)
    info.add_argument("--height", type=flag(positive), required=True)
    info.add_argument("--steps", type=flag(positive), default=50)
    info.add_argument("--json", action="store_true", help="print JSON")
    info.add_argument("--batch", type=flag(positive), default=1, help="images per run, for the memory estimate")
    info.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default="float16")
    info.add_argument(
        "--attention",
        choices=("flash", "math", "sliced"),
        default="flash",
        help="attention backend of the estimate: flash (fused SDPA, default), math (scores held), sliced",
    )
    add_config_flags(info)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # --help (0), or bad usage already told in one line (2)
        return stop.code if isinstance(stop.code, int) else EXIT_USAGE
    try:
        return args.run(args)
    except UsageError as error:
        print(f"hidiff {args.command}: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as error:  # an error the user can read, not a traceback
        from ..diffusers.model import UnsupportedModelError

        code = EXIT_USAGE if isinstance(error, UnsupportedModelError) else EXIT_FAILURE
        print(f"hidiff {args.command}: error: {type(error).__name__}: {error}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
