"""``hidiff eval``: does a method stop the toy model from duplicating objects above its native size?

The shipped toy model (:mod:`hidiff.app.toy`) generates K samples of each prompt at 1x, 2x
and 4x its native size with each method, from the same seeds (the same initial noise
for every method that starts from noise at full size), and the counter
(:mod:`hidiff.app.toy.count`) reads every picture. Per method and size: the duplication
rate (share of pictures with more than one object), the share with exactly one object
of the prompt's shape and colour, the share with none, and the time (after an untimed
one-step warm-up of the same method, size and batch).

Methods:

* ``baseline``: the stock model at the requested size;
* ``hidiff``: HiDiffusion (RAU-Net + MSW-MSA); ``raunet`` / ``msw``: one part only;
* ``deepshrink``: a Deep Shrink-style baseline (Kohya's "Deep Shrink", ComfyUI's
  PatchModelAddDownscale): for the first 35% of the steps, the output of the first
  stage's downsampler is shrunk bicubically by size / native, so the deep stages see
  native-size maps, and the first up stage's output is resized back bicubically to the
  full-size skip connection; forward hooks of this module, removed after the run;
* ``hiresfix``: native-size generation, bicubic upscale, then image-to-image at
  strength 0.5 (its time includes both passes);
* ``progressive``: hidiff's progressive mode (:func:`hidiff.progressive`): HiDiffusion
  at an intermediate size, bicubic upscale, image-to-image with HiDiffusion at the target
  size, on the measured default schedule (its time includes every pass);
* ``published``: the published ``hidiffusion`` package (0.1.10) on the same model,
  prompts and seeds, run by another Python that has it (``--reference-python``; see
  ``reference_eval.py``). Its presets go by absolute latent size (SD: below 256 the
  "1024" preset, T1 0.4, no T2), so on the 16 px toy model it runs that preset at every
  size, where hidiff picks its 4x preset at 4x.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F

from ..core import progressive
from .args import (
    BASELINE,
    HIDIFF_METHODS,
    PUBLISHED,
    add_method_flags,
    add_threads_flag,
    comma_list,
    finite,
    flag,
    keywords_for,
    names,
    png_file,
    positive,
    seed,
    set_threads,
)
from .reference import check_reference_python, reference_env
from .toy.count import count_objects, summarize
from .toy.pipeline import load_toy_pipeline, tensor_to_pil

#: The methods compared; ``published`` (the published package, in the Python given as
#: reference_python) comes on top.
METHODS = (BASELINE, *HIDIFF_METHODS, "deepshrink", "hiresfix", "progressive")
#: apply_hidiffusion options of the HiDiffusion methods.
HIDIFF_OPTIONS = HIDIFF_METHODS
DEEP_SHRINK_END = 0.35
#: Classifier-free guidance of ``hidiff eval``: a scale the guidance-trained toy model draws
#: well at (docs/cfgpp.md measures it from 1 to 12.5).
EVAL_GUIDANCE = 5.0
#: The six prompts of the docs' toy tables (each colour, each shape and both backgrounds once).
DOCS_PROMPTS = (
    "one red circle on white",
    "one green square on black",
    "one blue triangle on white",
    "one yellow circle on black",
    "one blue square on white",
    "one red triangle on black",
)
HIRES_STRENGTH = 0.5


@contextmanager
def deep_shrink(pipe: Any, factor: int, end_ratio: float = DEEP_SHRINK_END) -> Iterator[list]:
    """Deep Shrink hooks on ``pipe.unet`` inside the block; yields the list of shrunk sizes (one per shrunk call)."""
    from ..diffusers.steps import StepTracker

    unet = pipe.unet
    tracker, state, shrunk = StepTracker(), {"on": False, "full": None}, []

    def on_call(module, args, kwargs):
        progress = tracker.locate(args[1] if len(args) > 1 else kwargs["timestep"], pipe.scheduler)
        state["on"] = factor > 1 and progress.index < int(progress.total * end_ratio)

    def record_full(module, args):
        state["full"] = tuple(args[0].shape[-2:])

    def shrink(module, args, output):
        if state["on"]:
            size = tuple(max(1, s // factor) for s in output.shape[-2:])
            shrunk.append(size)
            return F.interpolate(output, size=size, mode="bicubic", align_corners=False)
        return None

    def grow(module, args, output):
        if state["on"] and tuple(output.shape[-2:]) != state["full"]:
            return F.interpolate(output, size=state["full"], mode="bicubic", align_corners=False)
        return None

    down, up = unet.down_blocks[0].downsamplers[0], unet.up_blocks[-2].upsamplers[0]
    handles = [
        unet.register_forward_pre_hook(on_call, with_kwargs=True),
        down.register_forward_pre_hook(record_full),
        down.register_forward_hook(shrink),
        up.register_forward_hook(grow),
    ]
    try:
        yield shrunk
    finally:
        for handle in handles:
            handle.remove()


def generate(
    pipe: Any, method: str, prompts: list[str], size: int, steps: int, seed: int, guidance: float
) -> torch.Tensor:
    """All pictures of one method at one size (B x 3 x size x size in [0, 1])."""
    import hidiff

    kwargs = dict(num_inference_steps=steps, guidance_scale=guidance, output_type="pt")

    def sample(height: int, **extra: Any) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        return pipe(prompts, height=height, width=height, generator=gen, **kwargs, **extra).images

    if method == BASELINE:
        return sample(size)
    if method in HIDIFF_OPTIONS:
        with hidiff.hidiffusion(pipe, **HIDIFF_OPTIONS[method]):
            return sample(size)
    if method == "deepshrink":
        with deep_shrink(pipe, factor=max(1, size // pipe.native_size)):
            return sample(size)
    if method == "progressive":
        return progressive_pictures(pipe, prompts, size, steps, seed, guidance)
    if method == "hiresfix":
        small = sample(pipe.native_size)
        if size == pipe.native_size:
            return small
        big = F.interpolate(small, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)
        return sample(size, image=big, strength=HIRES_STRENGTH)
    raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")


def progressive_pictures(
    pipe: Any,
    prompts: list[str],
    size: int,
    steps: int,
    seed: int,
    guidance: float,
    start: Optional[float] = None,
    strength: float = progressive.DEFAULT_STRENGTH,
    levels: int = 1,
) -> torch.Tensor:
    """The progressive mode on the toy model: HiDiffusion in every pass, the same seed in each."""
    import hidiff

    if size <= pipe.native_size:
        return generate(pipe, "hidiff", prompts, size, steps, seed, guidance)
    multiple = 2 ** (len(pipe.unet.config.block_out_channels) - 1)
    if start is None:
        start = progressive.default_start((size, size), (pipe.native_size, pipe.native_size))
    passes = progressive.schedule((size, size), multiple, start=start, strength=strength, levels=levels)
    kwargs = dict(num_inference_steps=steps, guidance_scale=guidance, output_type="pt")

    def first(side: tuple[int, int]) -> torch.Tensor:
        with hidiff.hidiffusion(pipe):
            return pipe(prompts, height=side[0], width=side[1], generator=torch.Generator().manual_seed(seed), **kwargs)

    def refine(side: tuple[int, int], pictures: torch.Tensor, s: float) -> torch.Tensor:
        big = F.interpolate(pictures, size=side, mode="bicubic", align_corners=False).clamp(0, 1)
        with hidiff.hidiffusion(pipe):
            gen = torch.Generator().manual_seed(seed)
            return pipe(prompts, image=big, strength=s, generator=gen, **kwargs).images

    return progressive.run_progressive(passes, lambda side: first(side).images, refine)


def published_pictures(
    reference_python: str,
    model: Optional[str],
    prompts: list[str],
    sizes: Sequence[int],
    steps: int,
    seed: int,
    guidance: float,
) -> dict[str, Any]:
    """Every size's pictures and seconds from the published package (see ``reference_eval.py``)."""
    from .toy.pipeline import WEIGHTS

    with tempfile.TemporaryDirectory(prefix="hidiff-published-") as tmp:
        # the other Python sees this package and nothing else of this environment
        os.symlink(Path(__file__).resolve().parents[1], Path(tmp) / "hidiff", target_is_directory=True)
        spec = {
            "package_parent": tmp,
            "model": str(Path(model).resolve()) if model else str(WEIGHTS),
            "prompts": prompts,
            "sizes": list(sizes),
            "steps": steps,
            "seed": seed,
            "guidance": guidance,
            "threads": torch.get_num_threads(),
            "out": str(Path(tmp) / "out.pt"),
        }
        (Path(tmp) / "spec.json").write_text(json.dumps(spec))
        proc = subprocess.run(
            [reference_python, str(Path(__file__).with_name("reference_eval.py")), str(Path(tmp) / "spec.json")],
            capture_output=True,
            text=True,
            env=reference_env(),
        )
        if proc.returncode != 0:
            raise RuntimeError(f"the published package failed in {reference_python}:\n{proc.stderr[-3000:]}")
        return torch.load(spec["out"])


def _methods(methods: Optional[Sequence[str]], reference_python: Optional[str]) -> Sequence[str]:
    """The methods to run (default: all, ``published`` with a reference Python); ValueError for unknown
    ones or ``published`` without a Python that has the package."""
    if methods is None:
        methods = METHODS + ((PUBLISHED,) if reference_python else ())
    names(methods, (*METHODS, PUBLISHED), "method")
    if PUBLISHED in methods:
        check_reference_python(reference_python, f"method {PUBLISHED!r}")
    return methods


def run_eval(
    pipe: Any,
    prompts: Sequence[str],
    samples: int = 4,
    scales: Sequence[int] = (1, 2, 4),
    methods: Optional[Sequence[str]] = None,
    steps: int = 20,
    seed: int = 0,
    guidance: float = EVAL_GUIDANCE,
    log: Any = None,
    reference_python: Optional[str] = None,
    model: Optional[str] = None,
) -> dict[str, Any]:
    """The eval table (a dict; see :func:`format_table`) and, under ``"images"``, every picture.

    ``methods`` defaults to all of :data:`METHODS`, plus ``published`` when ``reference_python``
    is given; ``model`` is the folder ``pipe`` was loaded from (default: the shipped weights),
    which the published package loads too.
    """
    methods = _methods(methods, reference_python)
    bad_scales = [s for s in scales if not isinstance(s, int) or s < 1]
    if bad_scales:
        raise ValueError(f"scales must be whole multiples of the native size (1, 2, 4, ...), got {bad_scales}")
    if samples < 1:
        raise ValueError(f"samples must be at least 1, got {samples}")
    batch = [p for p in prompts for _ in range(samples)]
    native = pipe.native_size
    published = None
    if PUBLISHED in methods:
        published = published_pictures(
            reference_python, model, batch, [s * native for s in scales], steps, seed, guidance
        )
    rows, images = [], {}
    for scale in scales:
        for method in methods:
            size = scale * native
            if method == PUBLISHED:
                pictures, seconds = published["images"][size], published["seconds"][size]
            else:
                pictures, seconds = _timed_pictures(pipe, method, batch, size, steps, seed, guidance)
            row = _row(method, size, scale, batch, pictures, seconds)
            rows.append(row)
            images[(method, scale)] = pictures
            if log is not None:
                log(_format_row(row))
    result = {
        "native": native,
        "prompts": list(prompts),
        "samples": samples,
        "steps": steps,
        "seed": seed,
        "guidance": guidance,
        "rows": rows,
        "images": images,
    }
    if published is not None:
        result["published_versions"] = published["versions"]
    return result


def _timed_pictures(
    pipe: Any, method: str, batch: list, size: int, steps: int, seed: int, guidance: float
) -> tuple[list, float]:
    """The pictures of one method at one size, and the seconds they took."""
    # one untimed step first: the first call at a new shape pays one-time kernel setup
    generate(pipe, method, batch, size, 1, seed, guidance)
    start = time.perf_counter()
    pictures = generate(pipe, method, batch, size, steps, seed, guidance)
    return pictures, time.perf_counter() - start


def _row(method: str, size: int, scale: int, batch: list, pictures: list, seconds: float) -> dict:
    """One row of the eval table: the method's counted objects at one size, and its time."""
    counts = [count_objects(p) for p in pictures]
    return {
        "method": method,
        "size": size,
        "scale": scale,
        "images": len(batch),
        **summarize(counts, batch),
        "seconds": seconds,
        "seconds_per_image": seconds / len(batch),
    }


HEADER = f"{'method':<11} {'size':>7} {'dup %':>6} {'right %':>8} {'empty %':>8} {'objects':>8} {'s/image':>8}"


def _format_row(row: dict) -> str:
    size = f"{row['size']}px"
    return (
        f"{row['method']:<11} {size:>7} {100 * row['duplicated']:6.1f} {100 * row['right']:8.1f} "
        f"{100 * row['empty']:8.1f} {row['mean_objects']:8.2f} {row['seconds_per_image']:8.3f}"
    )


def format_table(result: dict) -> str:
    lines = [
        f"toy model, native {result['native']}px, {len(result['prompts'])} prompts x {result['samples']} "
        f"samples, {result['steps']} steps, guidance {result['guidance']}, seed {result['seed']}",
        HEADER,
    ]
    lines += [_format_row(row) for row in result["rows"]]
    return "\n".join(lines)


def to_json(result: dict) -> str:
    return json.dumps({k: v for k, v in result.items() if k != "images"}, indent=2)


def save_grid(result: dict, path: str, per_cell: int = 4, cell: int = 64) -> None:
    """One row per method, one block of ``per_cell`` samples per size, each upscaled (nearest) to ``cell`` px."""
    from PIL import Image, ImageDraw

    methods = list(dict.fromkeys(r["method"] for r in result["rows"]))
    scales = list(dict.fromkeys(r["scale"] for r in result["rows"]))
    gap, label = 4, 80
    width = label + len(scales) * (per_cell * cell + gap)
    canvas = Image.new("RGB", (width, 16 + len(methods) * (cell + gap)), "gray")
    draw = ImageDraw.Draw(canvas)
    for j, scale in enumerate(scales):
        draw.text((label + j * (per_cell * cell + gap), 2), f"{scale}x ({scale * result['native']}px)", fill="white")
    for i, method in enumerate(methods):
        top = 16 + i * (cell + gap)
        draw.text((2, top + cell // 2 - 6), method, fill="white")
        for j, scale in enumerate(scales):
            pictures = result["images"].get((method, scale))
            if pictures is None:
                continue
            step = max(1, len(pictures) // per_cell)  # spread over the prompts
            for k, picture in enumerate(pictures[::step][:per_cell]):
                tile = tensor_to_pil(picture).resize((cell, cell), Image.NEAREST)
                canvas.paste(tile, (label + j * (per_cell * cell + gap) + k * cell, top))
    canvas.save(path)


def _add_common_arguments(parser: Any) -> None:
    """The flags that ``hidiff eval`` and ``hidiff demo`` share."""
    parser.add_argument("--model", help="a toy model folder (default: the weights shipped with hidiff)")
    parser.add_argument("--steps", type=flag(positive), default=20)
    parser.add_argument("--seed", type=flag(seed), default=0)
    add_threads_flag(parser)


def add_arguments(parser: Any) -> None:
    """The ``hidiff eval`` flags."""
    _add_common_arguments(parser)
    parser.add_argument("--samples", type=flag(positive), default=2, help="samples per prompt (K)")
    parser.add_argument("--prompts", help="comma-separated prompts (default: every prompt of the toy vocabulary)")
    parser.add_argument(
        "--scales",
        type=comma_list(noun="scale", item=flag(positive)),
        default="1,2,4",
        help="sizes as whole multiples of the native size",
    )
    add_method_flags(parser, "--methods", METHODS, "all of them")
    parser.add_argument(
        "--guidance",
        type=flag(finite, float),
        default=EVAL_GUIDANCE,
        help=f"classifier-free guidance scale (default {EVAL_GUIDANCE:g}; 1: off)",
    )
    parser.add_argument("--grid", metavar="FILE.png", type=png_file, help="write a grid of samples per method and size")
    parser.add_argument("--json", action="store_true", help="print the table as JSON")


def main(args: Any) -> dict:
    """Run ``hidiff eval`` from parsed flags; prints the table and returns the result."""
    import sys

    from .toy.shapes import PROMPTS, parse_prompt

    set_threads(args)
    prompts = [p.strip() for p in args.prompts.split(",")] if args.prompts else list(PROMPTS)
    for prompt in prompts:
        parse_prompt(prompt)  # a clear error before any work
    methods = _methods(args.methods, args.reference_python)
    pipe = load_toy_pipeline(args.model)
    log = None if args.json else (lambda line: print(line, file=sys.stderr, flush=True))
    if log:
        log(HEADER)
    result = run_eval(**keywords_for(run_eval, args, pipe=pipe, prompts=prompts, methods=methods, log=log))
    print(to_json(result) if args.json else format_table(result))
    if args.grid:
        save_grid(result, args.grid)
        print(f"grid written to {args.grid}", file=sys.stderr)
    return result


#: The rows of ``hidiff demo``: method -> label.
DEMO_ROWS = {BASELINE: "without HiDiffusion", "hidiff": "with HiDiffusion"}


def run_demo(
    pipe: Any, prompt: str, samples: int = 4, scale: int = 4, steps: int = 20, seed: int = 0, guidance: float = 1.0
) -> dict[str, Any]:
    """``prompt`` at ``scale`` x native without and with HiDiffusion, same seed: pictures, counts, times."""
    out: dict[str, Any] = {"prompt": prompt, "size": scale * pipe.native_size, "steps": steps, "seed": seed}
    for method in DEMO_ROWS:
        start = time.perf_counter()
        pictures = generate(pipe, method, [prompt] * samples, scale * pipe.native_size, steps, seed, guidance)
        seconds = time.perf_counter() - start
        counts = [count_objects(p) for p in pictures]
        out[method] = {
            "images": pictures,
            "counts": [c.n for c in counts],
            "right": [c.matches(prompt) for c in counts],
            "seconds": seconds,
        }
    return out


def save_side_by_side(demo: dict, path: str, cell: int = 192) -> None:
    """Top row without HiDiffusion, bottom row with it (nearest upscale, each sample ``cell`` px)."""
    from PIL import Image, ImageDraw

    n = len(demo[BASELINE]["images"])
    label, gap = 20, 4
    canvas = Image.new("RGB", (n * (cell + gap), len(DEMO_ROWS) * (cell + label)), "gray")
    draw = ImageDraw.Draw(canvas)
    for i, (method, name) in enumerate(DEMO_ROWS.items()):
        top = i * (cell + label)
        draw.text((4, top + 4), f"{name}: objects {demo[method]['counts']}", fill="white")
        for k, picture in enumerate(demo[method]["images"]):
            canvas.paste(tensor_to_pil(picture).resize((cell, cell), Image.NEAREST), (k * (cell + gap), top + label))
    canvas.save(path)


def demo_main(args: Any) -> dict:
    """Run ``hidiff demo`` from parsed flags: prints counts and times, writes the side-by-side PNG."""
    from .toy.shapes import parse_prompt

    parse_prompt(args.prompt)
    set_threads(args)
    pipe = load_toy_pipeline(args.model)
    demo = run_demo(**keywords_for(run_demo, args, pipe=pipe))
    print(
        f"toy model (SD 1.5 layout, pixel space, native {pipe.native_size}px): {args.prompt!r} at "
        f"{demo['size']}x{demo['size']} ({args.scale}x native), {args.samples} samples, {args.steps} steps, "
        f"seed {args.seed}"
    )
    width = max(map(len, DEMO_ROWS.values()))
    for method, name in DEMO_ROWS.items():
        row = demo[method]
        print(
            f"{name:<{width}}  objects per image {row['counts']}  one {args.prompt.split()[1]} {args.prompt.split()[2]}: "
            f"{sum(row['right'])}/{len(row['right'])}  {row['seconds']:.1f} s"
        )
    save_side_by_side(demo, args.out)
    print(f"side by side: {args.out}")
    return demo


def add_demo_arguments(parser: Any) -> None:
    """The ``hidiff demo`` flags."""
    _add_common_arguments(parser)
    parser.add_argument("--prompt", default="one red circle on white", help="a prompt of the toy vocabulary")
    parser.add_argument("--scale", type=flag(positive), default=4, help="size as a whole multiple of the native size")
    parser.add_argument(
        "--samples", type=flag(positive), default=4, help="images per row (one batch drawn from --seed)"
    )
    parser.add_argument("--out", type=png_file, default="hidiff-demo.png", help="the side-by-side PNG")
