"""Validate ``hidiff bench --per-phase`` against real multi-step runs (docs/speed.md).

For each mode, a real denoising loop (every step run, as ``hidiff bench``) and the per-phase
composition (one U-Net call per distinct phase, as ``hidiff bench --per-phase``) run
interleaved, ``--repeats`` times, on the same random-weight SD 1.5-layout U-Net; medians are
compared. ``--width-scale 1`` is the tiny width (32/64/64/64), ``2`` half of SD 1.5's
widths (160/320/640/640, 8 heads), ``4`` a quarter.

Run: .venv/bin/python tools/phase_validate.py --width-scale tiny --size 1024 --steps 10 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from hidiff.app.bench import _inputs, _local_run, _phase_run, kv_mode
from hidiff.diffusers.testing import make_unet, tiny_unet_config
from hidiff.diffusers.unet_configs import FULL_UNET_CONFIGS


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--width-scale", default="tiny", help="tiny, or N: SD 1.5's widths divided by N")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--modes", default=f"baseline,hidiff,{kv_mode(2)}")
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from diffusers import DDIMScheduler

    if args.width_scale == "tiny":
        config = tiny_unet_config("sd15")
    else:
        k = int(args.width_scale)
        config = dict(FULL_UNET_CONFIGS["sd15"], block_out_channels=tuple(c // k for c in (320, 640, 1280, 1280)))
    unet = make_unet(config)
    latent = (args.size // 8, args.size // 8)
    inputs = _inputs(config, 1, latent)
    scheduler = DDIMScheduler()
    modes = args.modes.split(",")
    real = {m: _local_run(m, unet, scheduler, inputs) for m in modes}
    phase = {m: _phase_run(m, unet, scheduler, inputs) for m in modes}
    for m in modes:  # warm-up: every phase's shapes once (a one-step loop warms only the first)
        phase[m](args.steps)
    samples: dict = {m: {"real": [], "per_phase": [], "calls": 0} for m in modes}
    for _ in range(args.repeats):
        for m in modes:
            samples[m]["real"].append(sum(real[m](args.steps)["times"]))
            p = phase[m](args.steps)
            samples[m]["per_phase"].append(sum(p["times"]))
            samples[m]["calls"] = p["unet_calls"]
    out = {}
    print(f"width {args.width_scale}, {args.size}x{args.size}, {args.steps} steps, batch 1, {args.threads} thread(s)")
    for m in modes:
        r, p = statistics.median(samples[m]["real"]), statistics.median(samples[m]["per_phase"])
        out[m] = {"real_s": r, "per_phase_s": p, "error": p / r - 1, **samples[m]}
        print(
            f"  {m:<11} real {r:8.2f} s   per-phase {p:8.2f} s ({samples[m]['calls']} calls)   "
            f"difference {100 * (p / r - 1):+5.1f}%   real runs {[round(x, 2) for x in samples[m]['real']]}   "
            f"per-phase runs {[round(x, 2) for x in samples[m]['per_phase']]}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "modes": out}, f, indent=2)


if __name__ == "__main__":
    main()
