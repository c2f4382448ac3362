"""Time the HiDiffusion node against plain ComfyUI on a full-width random SD 1.5 U-Net.

    .comfy/bin/python -m hidiff.app.comfy_bench [--size 1024] [--steps 3] [--threads 2] [--json out.json]

Builds SD 1.5's U-Net (model_channels 320, ComfyUI's own ``supported_models.SD15``) with random
weights, then runs ComfyUI's KSampler (euler, normal, cfg 1: one U-Net call per step) for
``--steps`` steps at ``--size`` x ``--size`` pixels, plain and with the node, and prints both
times and their ratio. A benchmark, not a test: the weights are random, only the speed counts.
Run it on a quiet machine; ``--comfyui`` is the ComfyUI root (default: ``<venv>/ComfyUI``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from ..comfy.testing import build_patcher, unet_config

#: SD 1.5's U-Net as ComfyUI configures it: the shared layout at full width.
SD15_UNET = unet_config("sd15", model_channels=320, channel_mult=[1, 2, 4, 4], context_dim=768)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--comfyui",
        default=os.environ.get("HIDIFF_COMFY_ROOT")
        or os.environ.get("HIDIFF_COMFYUI")
        or os.path.join(sys.prefix, "ComfyUI"),
    )
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    opts = ap.parse_args(argv)

    sys.path.insert(0, os.path.abspath(opts.comfyui))
    saved, sys.argv = sys.argv, [sys.argv[0], "--cpu", "--use-pytorch-cross-attention"]
    import comfy.options

    comfy.options.enable_args_parsing()
    import comfy.sample
    import torch

    sys.argv = saved
    torch.set_num_threads(opts.threads)
    torch.set_flush_denormal(True)
    patcher, _ = build_patcher("sd15", SD15_UNET, seed=0)
    g = torch.Generator().manual_seed(0)

    from .patch import apply_hidiffusion

    side = opts.size // 8
    latent = torch.zeros(1, 4, side, side)
    noise = comfy.sample.prepare_noise(latent, 0)
    positive = [[torch.randn(1, 77, 768, generator=g), {}]]
    negative = [[torch.randn(1, 77, 768, generator=g), {}]]

    def run(m) -> float:
        t = time.perf_counter()
        comfy.sample.sample(
            m, noise, opts.steps, 1.0, "euler", "normal", positive, negative, latent, disable_pbar=True, seed=0
        )
        return time.perf_counter() - t

    hidiff_model = apply_hidiffusion(patcher)
    result = {"size": opts.size, "steps": opts.steps, "threads": opts.threads}
    result["comfyui_s"] = run(patcher)
    result["hidiffusion_s"] = run(hidiff_model)
    result["ratio"] = result["hidiffusion_s"] / result["comfyui_s"]
    print(
        f"SD 1.5 (random, full width) {opts.size}x{opts.size}, {opts.steps} steps, {opts.threads} threads: "
        f"ComfyUI {result['comfyui_s']:.1f} s, with HiDiffusion {result['hidiffusion_s']:.1f} s, "
        f"ratio {result['ratio']:.2f}"
    )
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":  # pragma: no cover
    main()
