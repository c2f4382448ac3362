"""tomesd with hidiff: time of a U-Net loop, RAU-Net alone with and without tomesd, and the
refusal under MSW-MSA (docs/speed.md).

Interleaved modes on one random-weight SD 1.5-layout U-Net (``--width-scale`` as in
tools/phase_validate.py), ``--repeats`` times, medians of the whole loop (U-Net + DDIM step).

Run: .venv/bin/python tools/tome_measure.py --width-scale tiny --size 1024 --steps 4 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics

import torch

import hidiff
from hidiff.app.bench import _inputs
from hidiff.app.timing import timed_loop
from hidiff.diffusers.testing import make_unet, tiny_unet_config
from hidiff.diffusers.unet_configs import FULL_UNET_CONFIGS


def main() -> None:
    import tomesd
    from diffusers import DDIMScheduler

    parser = argparse.ArgumentParser()
    parser.add_argument("--width-scale", default="tiny")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--ratio", type=float, default=0.5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.width_scale == "tiny":
        config = tiny_unet_config("sd15")
    else:
        k = int(args.width_scale)
        config = dict(FULL_UNET_CONFIGS["sd15"], block_out_channels=tuple(c // k for c in (320, 640, 1280, 1280)))
    unet = make_unet(config)
    inputs = _inputs(config, 1, (args.size // 8, args.size // 8))
    scheduler = DDIMScheduler()
    modes = {
        "baseline": (None, False),
        "tomesd": (None, True),
        "raunet": ({"window_attn": False}, False),
        "raunet+tomesd": ({"window_attn": False}, True),
        "hidiff": ({}, False),
    }

    def run(mode: str, steps: int) -> float:
        options, tome = modes[mode]
        if tome:
            tomesd.apply_patch(unet, ratio=args.ratio)
        if options is not None:
            hidiff.apply_hidiffusion(unet, scheduler=scheduler, window_seed=0, **options)
        try:
            return sum(timed_loop(unet, scheduler, inputs, steps)["times"])
        finally:
            hidiff.remove_hidiffusion(unet)
            tomesd.remove_patch(unet)

    for m in modes:
        run(m, 1)
    times: dict = {m: [] for m in modes}
    for _ in range(args.repeats):
        for m in modes:
            times[m].append(run(m, args.steps))
    base = statistics.median(times["baseline"])
    print(f"width {args.width_scale}, {args.size}x{args.size}, {args.steps} steps, tomesd ratio {args.ratio}")
    for m, v in times.items():
        t = statistics.median(v)
        print(f"  {m:<14} {t:8.2f} s   {base / t:5.2f}x baseline   all {[round(x, 2) for x in v]}")
    tomesd.apply_patch(unet, ratio=args.ratio)
    try:
        hidiff.apply_hidiffusion(unet, scheduler=scheduler)
    except ValueError as error:
        print(f"  hidiff (windows) after tomesd: refused: {error}")
    tomesd.remove_patch(unet)


if __name__ == "__main__":
    main()
