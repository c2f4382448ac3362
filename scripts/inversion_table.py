"""Invert-then-sample reconstruction error, ordinary CFG versus CFG++ at matched guidance.

For each lam, an image batch is DDIM-inverted to noise and sampled back with the same
guidance: CFG++ at lam (``hidiff.invert`` + CFG++ DDIM), and ordinary CFG at the matched
scale w = 1 + 11.5 * lam (``hidiff.invert(cfg_scale=w)`` + the stock DDIM scheduler). The
error is the RMS difference between the reconstructed latents and the image's VAE
latents, relative to the RMS of those latents (0 = perfect; 1 = as far as the latents are
from zero).

The model is a tiny random-weight pipeline (hidiff.diffusers.testing): there is no trained model in
this project yet, so the numbers say how well each sampler inverts *this* network, not
how images look. Its VAE's latent scale is set as Stable Diffusion's 0.18215 was chosen:
so that image latents have unit standard deviation (measured on other random pictures),
which makes the errors comparable to SD's latent units.

    .venv/bin/python scripts/inversion_table.py            # the README table
"""

from __future__ import annotations

import argparse
import time

import torch

import hidiff
from hidiff.diffusers import cfgpp
from hidiff.diffusers.testing import tiny_pipeline

PROMPT, NEGATIVE = "a red circle on a blue square", ""


def smooth_images(count: int, side: int, seed: int) -> torch.Tensor:
    """Random smooth pictures in [0, 1] (bicubic upsampling of a 4x4 grid of colours)."""
    coarse = torch.rand(count, 3, 4, 4, generator=torch.Generator().manual_seed(seed))
    return torch.nn.functional.interpolate(coarse, size=(side, side), mode="bicubic", align_corners=False).clamp(0, 1)


def reconstruct(pipe, images, steps: int, lam: float, cfgpp_on: bool) -> torch.Tensor:
    count, side = images.shape[0], images.shape[-1]
    prompts, negatives = [PROMPT] * count, [NEGATIVE] * count
    original = pipe.scheduler
    if cfgpp_on:
        hidiff.enable_cfgpp(pipe, "ddim", guidance=lam)
        noise = hidiff.invert(pipe, images, prompts, negative_prompt=negatives, num_inference_steps=steps)
        scale = 7.5  # only switches the unconditional branch on; CFG++ uses lam
    else:
        scale = cfgpp.cfg_scale_for(lam)
        noise = hidiff.invert(
            pipe, images, prompts, negative_prompt=negatives, cfg_scale=scale, num_inference_steps=steps
        )
        pipe.scheduler = cfgpp.stock_scheduler("ddim", original.config)  # the DDIM that CFG++ DDIM extends
    try:
        out = pipe(
            prompts,
            negative_prompt=negatives,
            latents=noise,
            height=side,
            width=side,
            num_inference_steps=steps,
            guidance_scale=scale,
            output_type="latent",
        )
    finally:
        hidiff.disable_cfgpp(pipe)
        pipe.scheduler = original
    return out.images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", default="sd15", choices=("sd15", "sd21-768", "sdxl"))
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--lambdas", type=float, nargs="+", default=[0.2, 0.4, 0.6, 0.8, 1.0])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    started = time.time()
    pipe = tiny_pipeline(args.family, seed=args.seed)
    with torch.no_grad():
        calibration = cfgpp._encode_image(pipe, smooth_images(16, args.size, seed=args.seed + 2), "cpu")
        scale = pipe.vae.config.scaling_factor / float(calibration.std())
        pipe.vae.register_to_config(scaling_factor=scale)
        images = smooth_images(args.images, args.size, seed=args.seed + 1)
        target = cfgpp._encode_image(pipe, images, "cpu")
    rms = target.pow(2).mean().sqrt()

    def error(latents: torch.Tensor) -> float:
        return float((latents - target).pow(2).mean().sqrt() / rms)

    print(
        f"tiny random-weight {args.family}, {args.images} images {args.size}x{args.size}, "
        f"{args.steps} DDIM steps, weights seed {args.seed}, latent scale {scale:.3f}"
    )
    print()
    print("| lam | CFG scale w = 1 + 11.5 lam | CFG error | CFG++ error |")
    print("|---|---|---|---|")
    for lam in args.lambdas:
        cfg = error(reconstruct(pipe, images, args.steps, lam, cfgpp_on=False))
        plus = error(reconstruct(pipe, images, args.steps, lam, cfgpp_on=True))
        print(f"| {lam:.1f} | {cfgpp.cfg_scale_for(lam):.2f} | {cfg:.4f} | {plus:.4f} |")
    print()
    print(f"({time.time() - started:.0f} s)")


if __name__ == "__main__":
    main()
