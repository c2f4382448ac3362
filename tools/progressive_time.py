"""Time of the progressive mode against direct HiDiffusion at the same size, on the shipped toy model
(docs/progressive.md): the two alternate, REPEATS times each, one thread; reported as the ratio of the
fastest runs, in wall time and in this process's CPU time (with one thread, CPU time is what the run
computed, and depends far less on other jobs sharing the machine than wall time).

    .venv/bin/python tools/progressive_time.py --scales 4,8 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from hidiff.app.eval import DOCS_PROMPTS, EVAL_GUIDANCE, generate, progressive_pictures
from hidiff.app.toy.pipeline import load_toy_pipeline

PROMPTS = list(DOCS_PROMPTS)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scales", default="4,8")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--start", type=float, default=None)
    parser.add_argument("--strength", type=float, default=None)
    parser.add_argument("--levels", type=int, default=1)
    parser.add_argument("--methods", default="hidiff,progressive", help="what to time against each other")
    args = parser.parse_args()
    torch.set_num_threads(1)
    pipe = load_toy_pipeline()
    batch = [p for p in PROMPTS for _ in range(args.samples)]
    options = {k: v for k, v in (("start", args.start), ("strength", args.strength)) if v is not None}

    def make(method: str, size: int, steps: int):
        if method == "progressive":
            return progressive_pictures(pipe, batch, size, steps, 0, EVAL_GUIDANCE, levels=args.levels, **options)
        return generate(pipe, method, batch, size, steps, 0, EVAL_GUIDANCE)

    methods = args.methods.split(",")
    for scale in [int(s) for s in args.scales.split(",")]:
        size = scale * pipe.native_size
        for method in methods:
            make(method, size, 1)  # warm-up
        wall = {m: [] for m in methods}
        cpu = {m: [] for m in methods}
        for _ in range(args.repeats):
            for method in methods:
                w, c = time.perf_counter(), time.process_time()
                make(method, size, args.steps)
                wall[method].append(time.perf_counter() - w)
                cpu[method].append(time.process_time() - c)
        base = methods[0]
        print(
            json.dumps(
                {
                    "scale": scale,
                    "options": {**options, "levels": args.levels},
                    "wall_min_s": {m: round(min(v), 3) for m, v in wall.items()},
                    "cpu_min_s": {m: round(min(v), 3) for m, v in cpu.items()},
                    "wall_ratio": {m: round(min(wall[m]) / min(wall[base]), 3) for m in methods},
                    "cpu_ratio": {m: round(min(cpu[m]) / min(cpu[base]), 3) for m in methods},
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
