"""The ``hidiff`` command: ``info`` (a dry run of what HiDiffusion would do) and ``demo``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

FAMILY_NAMES = ("sd15", "sd21", "sd21-768", "sdxl")
EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """Bad command-line input: exit code 2."""


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("HiDiffusion options (see hidiff.HiDiffusionConfig)")
    on_off = argparse.BooleanOptionalAction
    group.add_argument("--raunet", action=on_off, help="RAU-Net on or off (default on)")
    group.add_argument("--window-attn", action=on_off, help="MSW-MSA on or off (default on)")
    group.add_argument("--preset", help="force a preset instead of the automatic choice")
    group.add_argument("--t1", type=float, dest="t1_ratio", help="T1 ratio override, in [0, 1]")
    group.add_argument("--t2", type=float, dest="t2_ratio", help="T2 ratio override, in [0, 1]")
    group.add_argument("--aggressive", action=on_off, help="SDXL below 4x native: strided conv first, then pool")
    group.add_argument("--aggressive-step-ratio", type=float, help="where the aggressive schedule switches to pool")
    group.add_argument("--window-shift", choices=("seeded", "reference", "none"), help="window shift mode")
    group.add_argument("--window-seed", type=int, help="fixed seed for 'seeded' window shifts")
    group.add_argument("--at-native", choices=("skip", "apply"), help="behaviour at or below native size")
    group.add_argument("--controlnet-mode", choices=("native", "resize"), help="how ControlNets run under HiDiffusion")
    group.add_argument("--controlnet-steps-ratio", type=float, help="share of steps ControlNets run in 'native' mode")


def config_from_args(args: argparse.Namespace, base: Any = None):
    """The HiDiffusionConfig of the flags given, on top of ``base`` (a config, or the defaults)."""
    from ..core.config import HiDiffusionConfig

    options: dict[str, Any] = {}
    for name in (
        "raunet",
        "window_attn",
        "preset",
        "t1_ratio",
        "t2_ratio",
        "aggressive",
        "aggressive_step_ratio",
        "window_shift",
        "window_seed",
        "at_native",
        "controlnet_steps_ratio",
    ):
        value = getattr(args, name)
        if value is not None:
            options[name] = value
    if args.controlnet_mode is not None:
        options["controlnet"] = args.controlnet_mode
    try:
        return HiDiffusionConfig.from_options(base, **options)
    except (TypeError, ValueError) as error:
        raise UsageError(str(error)) from None


def load_unet_skeleton(model: str):
    """A U-Net with no weights (meta device) and the pixels per latent cell, for a family name or a
    local model folder: 8 for the Stable Diffusion families (their VAE), otherwise read from the folder's
    VAE config, and 1 for a pipeline without a VAE (a pixel-space model such as the shipped toy model)."""
    import torch
    from diffusers import UNet2DConditionModel

    from ..diffusers.testing import FULL_UNET_CONFIGS

    if model in FULL_UNET_CONFIGS:
        config, factor = dict(FULL_UNET_CONFIGS[model]), 8
    else:
        path = Path(model)
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


def describe(model: str, height: int, width: int, steps: int, config) -> dict[str, Any]:
    """What ``apply_hidiffusion`` would do for one call, without running anything."""
    from ..diffusers.model import detect_layout
    from ..diffusers.patch import Patch

    unet, factor = load_unet_skeleton(model)
    layout = detect_layout(unet)
    if height % factor or width % factor or height <= 0 or width <= 0:
        raise UsageError(f"height and width must be positive multiples of {factor}, got {height}x{width}")
    latent = (height // factor, width // factor)
    patch = Patch(unet, None, layout, config, None)
    plans = [patch.plan(latent, i, steps) for i in range(steps)]
    preset = plans[0][0]
    info: dict[str, Any] = {
        "model": model,
        "family": layout.family,
        "layout": layout.kind,
        "inpainting": layout.inpainting,
        "pixels_per_latent": factor,
        "native": [factor * layout.native[0], factor * layout.native[1]],
        "size": [height, width],
        "steps": steps,
        "preset": preset.name if preset else None,
        "why": _why(layout, (height, width), latent, steps, config, preset),
        "modules": layout.module_names(config.raunet, config.window_attn, unet=unet) if preset else {},
        "conv_steps": [i for i, p in enumerate(plans) if p[1]],
        "pool_steps": [i for i, p in enumerate(plans) if p[2]],
        "window_steps": [i for i, p in enumerate(plans) if p[3] and p[0] is not None],
        "config": config.to_dict(),
    }
    return info


def _why(layout, size, latent, steps, config, preset) -> str:
    if preset is None:
        return f"{size[1]}x{size[0]} is at or below native; at_native='skip' leaves it untouched"
    if config.preset:
        return "forced by --preset"
    return (
        f"{preset.note} (latent {latent[0]}x{latent[1]}, native {layout.native[0]}x{layout.native[1]}, {steps} steps)"
    )


def cmd_info(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    info = describe(args.model, args.height, args.width, args.steps, config)
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
    for key in ("conv_steps", "pool_steps", "window_steps"):
        print(f"{key:<13} {_ranges(info[key])}")
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
    from .bench import format_table, run_bench, write_plot

    if args.plot:
        try:
            import matplotlib  # noqa: F401  (checked before minutes of timing, not after)
        except ImportError:
            raise UsageError("--plot needs matplotlib: pip install 'hidiff[bench]'") from None
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    modes = tuple(args.modes.split(",")) if args.modes else None
    try:
        result = run_bench(
            family=args.family,
            height=args.height,
            width=args.width,
            steps=args.steps,
            batch=args.batch,
            repeats=args.repeats,
            warmup=args.warmup,
            modes=modes,
            device=args.device,
            dtype=args.dtype,
            tiny=args.tiny,
            reference_python=args.reference_python,
            model=args.model,
            config_folder=args.config_folder,
        )
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


def _add_generate_parser(sub: Any) -> None:
    from .generate import SCHEDULERS

    gen = sub.add_parser(
        "generate",
        help="generate images with HiDiffusion; every PNG carries what re-runs it",
        description="Text-to-image; --image: img2img; --image --mask: inpaint; --controlnet with --control-image: "
        "ControlNet (with any of those). Unset flags take the model's defaults; the size defaults to 2x the "
        "model's native size (or the input image's size). Exit codes: 0 done, 2 bad usage, 1 failure.",
    )
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
    model.add_argument("--strength", type=float, help="img2img/inpaint strength, in (0, 1]")
    model.add_argument(
        "--controlnet",
        metavar="MODEL",
        help="ControlNet: hub id, local diffusers folder, or one original-layout .safetensors/.pth/.ckpt file",
    )
    model.add_argument("--control-image", metavar="FILE", help="the ControlNet conditioning image")
    model.add_argument("--controlnet-scale", type=float, help="ControlNet conditioning scale")
    model.add_argument("--from-image", metavar="PNG", help="re-run a PNG written by hidiff generate (flags override)")
    run = gen.add_argument_group("generation")
    run.add_argument("--prompt")
    run.add_argument("--negative-prompt")
    run.add_argument("--width", type=int)
    run.add_argument("--height", type=int)
    run.add_argument("--steps", type=int)
    run.add_argument("--guidance", type=float, help="classifier-free guidance scale")
    run.add_argument("--seed", type=int, help="image k of a batch uses seed + k (default: random, recorded)")
    run.add_argument("--scheduler", choices=tuple(SCHEDULERS), help="default: the model's own")
    run.add_argument("--batch", type=int, help="images per run")
    run.add_argument(
        "--cfgpp",
        type=float,
        metavar="LAMBDA",
        help="CFG++ guidance (needs --scheduler ddim, euler, euler-a or dpmpp-2m)",
    )
    run.add_argument("--hidiff", action=argparse.BooleanOptionalAction, help="HiDiffusion on (default) or off")
    run.add_argument(
        "--compare",
        action="store_true",
        help="same seed without and with HiDiffusion: both images, a side-by-side PNG and both times",
    )
    run.add_argument("--device", help="auto (default: cuda, then mps, then cpu), cpu, cuda, cuda:N, mps")
    run.add_argument(
        "--dtype",
        choices=("auto", "float32", "float16", "bfloat16"),
        help="auto (default): float16 on GPUs, float32 on CPU",
    )
    run.add_argument(
        "--vae-tiling",
        choices=("auto", "on", "off"),
        help="auto (default): on when decoding in one piece would not fit in free memory",
    )
    run.add_argument(
        "--out", help="output PNG (default hidiff-SEED.png; batches add -K, --compare adds -plain/-hidiff/-compare)"
    )
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_config_flags(gen)
    gen.set_defaults(run=cmd_generate)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hidiff", description="HiDiffusion for diffusers Stable Diffusion pipelines")
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="dry run: what HiDiffusion would change for a model and size")
    info.add_argument(
        "--model", required=True, help=f"a family name ({', '.join(FAMILY_NAMES)}) or a local diffusers folder"
    )
    info.add_argument("--width", type=int, required=True)
    info.add_argument("--height", type=int, required=True)
    info.add_argument("--steps", type=int, default=50)
    info.add_argument("--json", action="store_true", help="print JSON")
    _add_config_flags(info)
    info.set_defaults(run=cmd_info)

    _add_generate_parser(sub)

    from .eval import add_demo_arguments

    demo = sub.add_parser("demo", help="the shipped toy model at 4x native without and with HiDiffusion (CPU, ~1 min)")
    add_demo_arguments(demo)
    demo.set_defaults(run=cmd_demo)

    from .eval import add_arguments as add_eval_arguments

    evaluate = sub.add_parser(
        "eval", help="duplication metric on the shipped toy model: methods x sizes, counted objects"
    )
    add_eval_arguments(evaluate)
    evaluate.set_defaults(run=cmd_eval)

    bench = sub.add_parser(
        "bench", help="time baseline / hidiff / RAU-Net only / MSW-MSA only (/ the published package) side by side"
    )
    bench.add_argument("--family", choices=FAMILY_NAMES, help="random-weight U-Net of this family (default sd15)")
    bench.add_argument(
        "--model",
        help="a real model instead (hub id, diffusers folder or single file): its U-Net, "
        "and its text encoders and VAE timed on their own",
    )
    bench.add_argument(
        "--config",
        dest="config_folder",
        metavar="FOLDER",
        help="component configs for a single-file --model (a local diffusers folder)",
    )
    bench.add_argument("--width", type=int, default=1024)
    bench.add_argument("--height", type=int, default=1024)
    bench.add_argument("--steps", type=int, default=4)
    bench.add_argument("--batch", type=int, default=2, help="U-Net batch (classifier-free guidance doubles it)")
    bench.add_argument("--repeats", type=int, default=1)
    bench.add_argument("--warmup", type=int, default=1, help="one-step warm-up runs per mode")
    bench.add_argument(
        "--modes",
        help="comma-separated subset of baseline,hidiff,raunet,msw,published, or all "
        "(default: baseline,hidiff, plus published with --reference-python)",
    )
    bench.add_argument(
        "--reference-python",
        metavar="PATH",
        help="a Python with the published hidiffusion (and diffusers 0.27.x): adds the mode 'published'",
    )
    bench.add_argument("--device", default="cpu")
    bench.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    bench.add_argument("--threads", type=int, help="torch CPU threads")
    bench.add_argument("--tiny", action="store_true", help="tiny widths (for a quick check, not for timing)")
    bench.add_argument(
        "--json",
        nargs="?",
        const="-",
        metavar="FILE",
        help="print JSON instead of the table; with FILE: write it there and print the table",
    )
    bench.add_argument("--plot", metavar="FILE.png", help="also write a chart of the times and speed-ups")
    bench.set_defaults(run=cmd_bench)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
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
