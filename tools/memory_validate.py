"""Validate the memory estimate (hidiff/core/memory.py) against measured peaks on CPU (docs/memory.md).

Each case runs in a fresh Python: a U-Net with random weights built from a family's config (full or
reduced width), one call to pay one-time allocations, then the measured call. Two measurements:
the peak allocated through PyTorch's CPU allocator during the call (profiler allocation events; the
counterpart of CUDA's max_memory_allocated, which is what the estimate models) and, as a cross-check,
the process's resident memory sampled every 20 ms over another call (peak minus the level before it;
it includes allocator caching and misses peaks shorter than a sample). float32, one thread.

    .venv/bin/python tools/memory_validate.py            # every case, a table
    .venv/bin/python tools/memory_validate.py --json     # one JSON line per case
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

#: (family, width divisor, latent side, batch, mode, attention); all stay under 5 GB of peak memory.
CASES = [
    ("sd15", 1, 64, 2, "plain", "flash"),
    ("sd15", 1, 96, 2, "hidiff", "flash"),
    ("sd15", 2, 96, 2, "windows", "math"),
    ("sd15", 2, 64, 2, "plain", "sliced"),
    ("sd21", 2, 96, 2, "hidiff", "flash"),
    ("sdxl", 2, 128, 2, "hidiff", "flash"),
    ("sdxl", 2, 96, 2, "plain", "flash"),
    ("sdxl", 4, 96, 2, "hidiff", "math"),
    ("sdxl-refiner", 2, 96, 2, "hidiff", "flash"),
]


def run_case(family: str, width: int, side: int, batch: int, mode: str, attention: str) -> dict:
    import torch

    from hidiff.app.memory_plan import measure_unet_call
    from hidiff.core.config import HiDiffusionConfig
    from hidiff.diffusers.unet_configs import FULL_UNET_CONFIGS

    torch.set_num_threads(1)
    config = dict(FULL_UNET_CONFIGS[family])
    if width > 1:
        config["block_out_channels"] = tuple(c // width for c in config["block_out_channels"])
        config["norm_num_groups"] = 16
    config["sample_size"] = min(config["sample_size"], side // 2) if mode != "plain" else config["sample_size"]
    hidiff = {"plain": None, "hidiff": HiDiffusionConfig(), "windows": HiDiffusionConfig(raunet=False)}[mode]
    result = measure_unet_call(
        config, side, batch, hidiff, attention, rss=True, time_ids=5 if "refiner" in family else 6
    )
    return {
        "family": family,
        "width": f"1/{width}",
        "latent": side,
        "batch": batch,
        "mode": mode,
        "attention": attention,
        **result,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        family, width, side, batch, mode, attention = args.case.split(":")
        print(json.dumps(run_case(family, int(width), int(side), int(batch), mode, attention)))
        return
    if not args.json:
        print(
            f"{'family':<13} {'width':>5} {'latent':>6} {'B':>2} {'mode':<8} {'attn':<7} {'measured':>9} {'estimate':>9} {'ratio':>6} {'RSS':>9}"
        )
    for case in CASES:
        spec = ":".join(map(str, case))
        proc = subprocess.run([sys.executable, __file__, "--case", spec], capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"{spec}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
            continue
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        row["ratio"] = row["estimated"] / row["measured"]
        if args.json:
            print(json.dumps(row), flush=True)
        else:
            mib = 2**20
            print(
                f"{row['family']:<13} {row['width']:>5} {row['latent']:>6} {row['batch']:>2} {row['mode']:<8} "
                f"{row['attention']:<7} {row['measured'] / mib:7.0f}Mi {row['estimated'] / mib:7.0f}Mi "
                f"{row['ratio']:6.3f} {row['rss_delta'] / mib:7.0f}Mi",
                flush=True,
            )


if __name__ == "__main__":
    main()
