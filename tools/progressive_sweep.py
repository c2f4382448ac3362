"""The sweep that chose the progressive mode's default schedule (docs/progressive.md).

On the shipped toy model, at each scale: direct HiDiffusion, then every schedule of the
grid (first size as a share of the target's side, refinement strength, refinements),
each group of strengths timed right after its own direct-hidiff reference, in wall time and in
this process's CPU time (one thread: what the run computed, far less sensitive to other jobs on
the machine than wall time). Prints one JSON line per row.

    .venv/bin/python tools/progressive_sweep.py --scales 4,8 --threads 1
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from hidiff.app.eval import DOCS_PROMPTS, EVAL_GUIDANCE, generate, progressive_pictures
from hidiff.app.toy.count import count_objects, summarize
from hidiff.app.toy.pipeline import load_toy_pipeline

PROMPTS = list(DOCS_PROMPTS)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scales", default="4,8")
    parser.add_argument("--starts", default="0.125,0.25,0.5", help="first side over the target's")
    parser.add_argument("--strengths", default="0.3,0.4,0.5,0.6")
    parser.add_argument("--levels", default="1,2")
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--direct-once", action="store_true", help="time direct HiDiffusion once per scale")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pipe = load_toy_pipeline()
    native = pipe.native_size
    batch = [p for p in PROMPTS for _ in range(args.samples)]

    def row(label: str, make) -> dict:
        make(1)  # untimed one-step warm-up at this shape
        start, cpu = time.perf_counter(), time.process_time()
        pictures = make(args.steps)
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        return {
            "method": label,
            **summarize([count_objects(p) for p in pictures], batch),
            "seconds": seconds,
            "cpu": cpu,
        }

    for scale in [int(s) for s in args.scales.split(",")]:
        size = scale * native
        direct = None
        for start in args.starts.split(","):
            share = float(start)
            if not 0 < share < 1 or share * scale < 1:
                continue  # the first picture below native size
            for levels in [int(x) for x in args.levels.split(",")]:
                # direct HiDiffusion timed again before each group of strengths
                if direct is None or not args.direct_once:
                    direct = row(
                        "hidiff", lambda n, size=size: generate(pipe, "hidiff", batch, size, n, 0, EVAL_GUIDANCE)
                    )
                for strength in [float(x) for x in args.strengths.split(",")]:
                    prog = row(
                        "progressive",
                        lambda n, size=size, share=share, strength=strength, levels=levels: progressive_pictures(
                            pipe, batch, size, n, 0, EVAL_GUIDANCE, start=share, strength=strength, levels=levels
                        ),
                    )
                    out = {
                        "scale": scale,
                        "start": share,
                        "levels": levels,
                        "strength": strength,
                        "dup": prog["duplicated"],
                        "right": prog["right"],
                        "empty": prog["empty"],
                        "direct_right": direct["right"],
                        "direct_dup": direct["duplicated"],
                        "time_ratio": prog["seconds"] / direct["seconds"],
                        "cpu_ratio": prog["cpu"] / direct["cpu"],
                        "seconds": prog["seconds"],
                        "direct_seconds": direct["seconds"],
                    }
                    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
