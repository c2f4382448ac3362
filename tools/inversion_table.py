"""Invert-then-regenerate on the shipped toy model: reconstruction PSNR, ordinary CFG versus CFG++.

    .venv/bin/python tools/inversion_table.py          # the docs/cfgpp.md table (~3 min, 1 thread)

The 24 toy prompts' training pictures (one random scene each, 16 px, a function of --seed)
are DDIM-inverted to noise under their own prompt and sampled back with the same guidance
and steps: CFG++ at lam (``hidiff.invert`` + CFG++ DDIM), and ordinary CFG at the matched
scale w = 1 + 11.5 lam (``hidiff.invert(cfg_scale=w)`` + the stock DDIM scheduler). Per
cell: the PSNR of the regenerated pictures against the originals (pixels in [0, 1], mean
squared error over all 24), and the share still counted as the prompt's object.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hidiff  # noqa: E402
from hidiff.app.toy.count import count_objects  # noqa: E402
from hidiff.app.toy.pipeline import load_toy_pipeline  # noqa: E402
from hidiff.app.toy.shapes import PROMPTS, random_scene, render  # noqa: E402
from hidiff.diffusers import cfgpp  # noqa: E402


def reconstruct(pipe, images, prompts, steps: int, lam: float, cfgpp_on: bool) -> torch.Tensor:
    original = pipe.scheduler
    try:
        if cfgpp_on:
            hidiff.enable_cfgpp(pipe, "ddim", guidance=lam)
            noise = hidiff.invert(pipe, images, prompts, num_inference_steps=steps)
            scale = 2.0  # only switches the unconditional branch on; CFG++ uses lam
        else:
            scale = cfgpp.cfg_scale_for(lam)
            noise = hidiff.invert(pipe, images, prompts, cfg_scale=scale, num_inference_steps=steps)
            pipe.scheduler = cfgpp.stock_scheduler("ddim", original.config)
        return pipe(prompts, latents=noise, num_inference_steps=steps, guidance_scale=scale, output_type="pt").images
    finally:
        hidiff.disable_cfgpp(pipe)
        pipe.scheduler = original


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(10 * torch.log10(1 / (a - b).pow(2).mean()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="toy model folder (default: the shipped weights)")
    parser.add_argument("--steps", default="10,20,50")
    parser.add_argument("--lambdas", default="0.1,0.2,0.4,0.6,1.0")
    parser.add_argument("--seed", type=int, default=0, help="seed of the pictures")
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.time()
    pipe = load_toy_pipeline(args.model)
    rng = random.Random(args.seed)
    prompts = list(PROMPTS)
    images = torch.stack([render(random_scene(rng, pipe.native_size, p), pipe.native_size) for p in prompts])
    print("| steps | lam | w = 1 + 11.5 lam | CFG PSNR | CFG++ PSNR | CFG right | CFG++ right |")
    print("|---|---|---|---|---|---|---|")
    for steps in [int(s) for s in args.steps.split(",")]:
        for lam in [float(x) for x in args.lambdas.split(",")]:
            cfg = reconstruct(pipe, images, prompts, steps, lam, cfgpp_on=False)
            plus = reconstruct(pipe, images, prompts, steps, lam, cfgpp_on=True)
            right = [sum(count_objects(x).matches(p) for x, p in zip(out, prompts)) for out in (cfg, plus)]
            print(
                f"| {steps} | {lam:g} | {cfgpp.cfg_scale_for(lam):.2f} | {psnr(cfg, images):.1f} | "
                f"{psnr(plus, images):.1f} | {right[0]}/24 | {right[1]}/24 |",
                flush=True,
            )
    print(f"({time.time() - started:.0f} s)")


if __name__ == "__main__":
    main()
