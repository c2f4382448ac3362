"""CFG versus CFG++ sampling on the toy model: prompt accuracy and an off-manifold measure.

    .venv/bin/python tools/cfgpp_sampling.py                       # the docs/cfgpp.md table (~20 min, 1 thread)
    .venv/bin/python tools/cfgpp_sampling.py --samplers ddim --steps 20 --scales 1,3,5,7.5   # one slice
    .venv/bin/python tools/cfgpp_sampling.py --model runs/x --checkpoint   # a training checkpoint (EMA)

For each sampler, number of steps and ordinary guidance scale w, the 24 toy prompts x
--seeds seeds are sampled at native size (16 px) with ordinary CFG at w and with CFG++ at
lam = (w - 1) / 11.5 (hidiff's mapping, the line through (1, 0) and (12.5, 1)), from the
same noise. Per cell:

* right: share of pictures with exactly one object of the prompt's shape and colour
  (``count_objects(...).matches(prompt)``);
* off: the off-manifold measure, the root mean square distance of each pixel's colour to the
  nearest colour a training picture can hold (a mix of a background and an object colour,
  as anti-aliased edges are), over all pixels; training pictures score 0, and residual
  noise, washed-out or over-saturated colours raise it.

--lams adds a CFG++ row at each given lam for the first sampler and step count (the mapping
check: which lam gives CFG's accuracy at w). Output: a markdown table on stdout and JSON in
--json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hidiff.app.toy.count import count_objects  # noqa: E402
from hidiff.app.toy.pipeline import load_toy_pipeline  # noqa: E402
from hidiff.app.toy.shapes import BACKGROUNDS, COLOURS, PROMPTS  # noqa: E402
from hidiff.diffusers.cfgpp import disable_cfgpp, enable_cfgpp, guidance_for, stock_scheduler  # noqa: E402


def off_manifold(pictures: torch.Tensor) -> float:
    """RMS distance of each pixel's colour to the nearest colour a training picture can hold (a
    point on a segment from a background colour to an object colour), over all pixels."""
    flat = pictures.permute(0, 2, 3, 1).reshape(-1, 3)
    best = torch.full((flat.shape[0],), float("inf"))
    for background in BACKGROUNDS.values():
        for colour in COLOURS.values():
            a, d = torch.tensor(background), torch.tensor(colour) - torch.tensor(background)
            share = (((flat - a) @ d) / (d @ d)).clamp(0, 1)
            best = torch.minimum(best, ((flat - a - share[:, None] * d) ** 2).sum(1))
    return float(best.mean().sqrt())


def load(model: str | None, checkpoint: bool):
    if checkpoint:
        from train_toy import load_pipeline

        return load_pipeline(model)
    return load_toy_pipeline(model)


def sample(pipe, sampler: str, steps: int, prompts: list[str], seed: int, w: float | None, lam: float | None):
    """Pictures (B x 3 x H x W in [0, 1]) with CFG at w, or CFG++ at lam."""
    original = pipe.scheduler
    pipe.scheduler = stock_scheduler(sampler, original.config)
    try:
        if lam is not None:
            enable_cfgpp(pipe, sampler, lam)
        generator = torch.Generator().manual_seed(seed)
        scale = 2.0 if lam is not None else w  # under CFG++ the scale only turns the branch on
        return pipe(
            prompts, num_inference_steps=steps, guidance_scale=scale, generator=generator, output_type="pt"
        ).images
    finally:
        disable_cfgpp(pipe)
        pipe.scheduler = original


def cell(pipe, sampler, steps, seeds, w=None, lam=None) -> dict:
    prompts = list(PROMPTS)
    pictures, all_prompts = [], []
    for seed in range(seeds):
        pictures.append(sample(pipe, sampler, steps, prompts, seed, w, lam))
        all_prompts += prompts
    pictures = torch.cat(pictures)
    right = sum(count_objects(p).matches(q) for p, q in zip(pictures, all_prompts)) / len(all_prompts)
    return {"right": right, "off": off_manifold(pictures), "n": len(all_prompts)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="toy model folder (default: the shipped weights), or a run folder")
    parser.add_argument("--checkpoint", action="store_true", help="--model is a train_toy.py run folder")
    parser.add_argument("--samplers", default="ddim,euler,euler-a,dpmpp-2m")
    parser.add_argument("--steps", default="10,20,50")
    parser.add_argument("--scales", default="1,3,7.5,12.5", help="ordinary guidance scales w (CFG++: (w-1)/11.5)")
    parser.add_argument("--lams", default="", help="extra CFG++ lams for the first sampler and steps (mapping check)")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    pipe = load(args.model, args.checkpoint)
    samplers = args.samplers.split(",")
    step_list = [int(s) for s in args.steps.split(",")]
    scales = [float(s) for s in args.scales.split(",")]
    rows = []
    start = time.time()
    print("| sampler | steps | w | CFG right | CFG off | lam | CFG++ right | CFG++ off |")
    print("|---|---|---|---|---|---|---|---|")
    for sampler in samplers:
        for steps in step_list:
            for w in scales:
                cfg = cell(pipe, sampler, steps, args.seeds, w=w)
                lam = guidance_for(w)
                pp = cell(pipe, sampler, steps, args.seeds, lam=lam) if w > 1 else None
                rows.append({"sampler": sampler, "steps": steps, "w": w, "lam": lam, "cfg": cfg, "cfgpp": pp})
                ppr = f"{pp['right']:.2f} | {pp['off']:.3f}" if pp else "- | -"
                print(
                    f"| {sampler} | {steps} | {w:g} | {cfg['right']:.2f} | {cfg['off']:.3f} | {lam:.2f} | {ppr} |",
                    flush=True,
                )
    extra = []
    for lam in [float(x) for x in args.lams.split(",") if x]:
        pp = cell(pipe, samplers[0], step_list[0], args.seeds, lam=lam)
        extra.append({"sampler": samplers[0], "steps": step_list[0], "lam": lam, "cfgpp": pp})
        print(
            f"| {samplers[0]} | {step_list[0]} | - | - | - | {lam:g} | {pp['right']:.2f} | {pp['off']:.3f} |",
            flush=True,
        )
    print(f"{time.time() - start:.0f} s", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "lams": extra, "seeds": args.seeds}, indent=1))


if __name__ == "__main__":
    main()
