"""Editing on the shipped toy model: CFG++ inversion editing against CFG inversion editing and img2img.

    .venv/bin/python tools/cfgpp_edit.py            # the docs/cfgpp.md table (~5 min, 1 thread)

--pictures random training pictures (16 px, one object; a function of --seed) are each
edited twice: a colour change (same shape, another object colour) and a shape change
(same colour, another shape), the target drawn at random. Methods, all at the same
strength and steps:

* ``cfgpp``: ``hidiff.edit`` (DDIM inversion under the source prompt, CFG++ DDIM with the
  target prompt) at lam;
* ``cfgpp+mask``: the same, confined to the source object's bounding box grown by 2 px;
* ``cfg``: ``hidiff.edit(cfg_scale=w)``, ordinary CFG both ways at w = 1 + 11.5 lam;
* ``img2img``: the toy pipeline's image-to-image (noise to ``strength``, denoise with CFG at w).

Per method, strength and edit kind: ``done``, the share of results counted as exactly one
object of the target's shape and colour; ``IoU``, the overlap of the object masks (pixels
more than 0.3 from the background colour) before and after (position and size held);
``bg``, the mean absolute pixel change outside both object masks grown by 1 px (the
background held; 0 is untouched).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hidiff  # noqa: E402
from hidiff.app.toy.count import count_objects  # noqa: E402
from hidiff.app.toy.pipeline import load_toy_pipeline  # noqa: E402
from hidiff.app.toy.shapes import BACKGROUNDS, COLOURS, SHAPES, prompt_for, random_scene, render  # noqa: E402
from hidiff.diffusers.cfgpp import cfg_scale_for  # noqa: E402

METHODS = ("cfgpp", "cfgpp+mask", "cfg", "img2img")


def object_mask(picture: torch.Tensor, background: str) -> torch.Tensor:
    colour = torch.tensor(BACKGROUNDS[background]).view(3, 1, 1)
    return (picture - colour).abs().amax(0) > 0.3


def grow(mask: torch.Tensor, pixels: int) -> torch.Tensor:
    return F.max_pool2d(mask[None, None].float(), 2 * pixels + 1, stride=1, padding=pixels)[0, 0] > 0


def box_mask(scene, size: int, margin: int) -> torch.Tensor:
    shape = scene.shapes[0]
    half = shape.size / 2 + margin
    ys, xs = torch.arange(size).view(-1, 1) + 0.5, torch.arange(size).view(1, -1) + 0.5
    return ((ys - shape.cy).abs() <= half) & ((xs - shape.cx).abs() <= half)


def edits(count: int, seed: int, size: int):
    """(scene, source prompt, target prompt, kind) for a colour and a shape change of each picture."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        scene = random_scene(rng, size)
        shape = scene.shapes[0]
        source = prompt_for(shape.colour, shape.kind, scene.background)
        colour = rng.choice([c for c in COLOURS if c != shape.colour])
        kind = rng.choice([k for k in SHAPES if k != shape.kind])
        out.append((scene, source, prompt_for(colour, shape.kind, scene.background), "colour"))
        out.append((scene, source, prompt_for(shape.colour, kind, scene.background), "shape"))
    return out


def run(pipe, method: str, picture, scene, source: str, target: str, strength: float, steps: int, lam: float):
    w = cfg_scale_for(lam)
    if method == "img2img":
        generator = torch.Generator().manual_seed(0)
        return pipe(
            target,
            image=picture,
            strength=strength,
            num_inference_steps=steps,
            guidance_scale=w,
            generator=generator,
            output_type="pt",
        ).images[0]
    kwargs = {"cfg_scale": w} if method == "cfg" else {"guidance": lam}
    mask = box_mask(scene, picture.shape[-1], 2).float() if method == "cfgpp+mask" else None
    out = hidiff.edit(
        pipe,
        picture,
        source,
        target,
        strength=strength,
        num_inference_steps=steps,
        mask=mask,
        output_type="pt",
        **kwargs,
    )
    return out.images[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="toy model folder (default: the shipped weights)")
    parser.add_argument("--pictures", type=int, default=24)
    parser.add_argument("--strengths", default="0.4,0.6,0.8")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--lam", type=float, default=0.6)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.time()
    pipe = load_toy_pipeline(args.model)
    size = pipe.native_size
    cases = edits(args.pictures, args.seed, size)
    print(
        f"toy model, {args.pictures} pictures x (colour, shape) edits, {args.steps} steps, CFG++ lam {args.lam} "
        f"/ CFG w {cfg_scale_for(args.lam):.2f}"
    )
    print()
    print("| method | strength | colour: done | IoU | bg | shape: done | IoU | bg |")
    print("|---|---|---|---|---|---|---|---|")
    for method in args.methods.split(","):
        for strength in [float(s) for s in args.strengths.split(",")]:
            stats = {"colour": [], "shape": []}
            for scene, source, target, kind in cases:
                picture = render(scene, size)
                out = run(pipe, method, picture, scene, source, target, strength, args.steps, args.lam)
                before, after = object_mask(picture, scene.background), object_mask(out, scene.background)
                iou = float((before & after).sum() / (before | after).sum().clamp(min=1))
                outside = ~grow(before | after, 1)
                bg = float((out - picture).abs()[:, outside].mean()) if outside.any() else 0.0
                stats[kind].append((count_objects(out).matches(target), iou, bg))
            cells = []
            for kind in ("colour", "shape"):
                done, iou, bg = (sum(v) / len(v) for v in zip(*stats[kind]))
                cells.append(f"{done:.2f} | {iou:.2f} | {bg:.3f}")
            print(f"| {method} | {strength:g} | {' | '.join(cells)} |", flush=True)
    print(f"({time.time() - started:.0f} s)")


if __name__ == "__main__":
    main()
