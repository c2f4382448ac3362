"""Where one U-Net call's time goes, module by module, in hidiff and in the published package.

``hidiff bench`` gives whole-call times; when hidiff and the published package differ there,
this says in which blocks. One side per process (the published package needs its own Python,
``.venv-ref``), the same random-weight U-Net config and inputs on both, one call at a chosen
step of a ``--steps`` schedule, timed per block (resnets, attentions, samplers, mid block) and
per transformer part (attn1, attn2, ff), ``--calls`` times after one warm-up call; medians.

Run (docs/benchmarks.md, SDXL against the published package):
    .venv/bin/python tools/module_times.py hidiff --family sdxl --size 2048 --step 30 --out /tmp/mt
    .venv-ref/bin/python tools/module_times.py published --out /tmp/mt
    .venv/bin/python tools/module_times.py compare --out /tmp/mt

The hidiff side writes the config and inputs to ``--out``; the published side reads them there
(and never imports hidiff), with the same step, size and threads.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time
from collections import defaultdict

import torch

# timing.py and reference_bench.py import no hidiff, so the published side can use them too
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "hidiff", "app"))

import reference_bench  # noqa: E402
import timing  # noqa: E402

# Blocks and transformer parts timed; repeated transformer blocks of a layer are summed.
TIMED = re.compile(
    r"^(down_blocks\.\d+\.(resnets|attentions|downsamplers)\.\d+|mid_block|up_blocks\.\d+\.(resnets|attentions|upsamplers)"
    r"\.\d+|.*transformer_blocks\.\d+\.(attn1|attn2|ff))$"
)
PARTS = re.compile(r"\.(attn1|attn2|ff)$")


def hidiff_setup(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from hidiff.app.bench import _inputs
    from hidiff.app.bench_published import PUBLISHED_NAMES
    from hidiff.diffusers.unet_configs import FULL_UNET_CONFIGS

    if args.family not in FULL_UNET_CONFIGS:
        parser.error(f"--family must be one of {', '.join(FULL_UNET_CONFIGS)}")
    if not 0 <= args.step < args.steps:
        parser.error(f"--step must be in 0..{args.steps - 1}")
    config = dict(FULL_UNET_CONFIGS[args.family])
    setup = {k: getattr(args, k) for k in ("family", "size", "step", "steps", "dtype", "threads", "calls")}
    setup.update(config=config, name_or_path=PUBLISHED_NAMES[args.family])
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "setup.json"), "w") as f:
        json.dump(setup, f)
    torch.save(_inputs(config, 1, (args.size // 8, args.size // 8)), os.path.join(args.out, "inputs.pt"))
    return setup


def build(setup: dict, out: str):
    import diffusers

    torch.set_num_threads(setup["threads"])
    dtype = getattr(torch, setup["dtype"])
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel.from_config(setup["config"]).to(dtype).eval()
    inputs = timing.move(torch.load(os.path.join(out, "inputs.pt")), "cpu", dtype)
    scheduler = diffusers.DDIMScheduler()
    scheduler.set_timesteps(setup["steps"])
    return diffusers, unet, inputs, scheduler


def time_side(side: str, setup: dict, out: str) -> dict:
    diffusers, unet, inputs, scheduler = build(setup, out)
    step, sample = setup["step"], inputs.pop("sample")
    if side == "hidiff":
        from hidiff.diffusers.patch import apply_hidiffusion

        apply_hidiffusion(unet, scheduler=scheduler, window_seed=0)

        def call() -> None:
            # hidiff reads the step off the scheduler's timesteps, and the first call it sees in
            # a run is that run's step 0: start the run at step 0, untimed
            if step:
                unet(sample, scheduler.timesteps[0], **inputs)
            run(scheduler.timesteps[step])
    else:
        pipe = reference_bench.published_pipeline(diffusers, unet, setup["name_or_path"])
        pipe._num_timesteps = setup["steps"]
        counters = reference_bench.call_counters(unet)

        def call() -> None:
            for module in counters:  # the package counts its own calls: put it at the step
                module.timestep = step
            run(scheduler.timesteps[step])

    spent: dict = defaultdict(float)
    started: dict = {}
    for name, module in unet.named_modules():
        if TIMED.match(name):
            key = re.sub(r"transformer_blocks\.\d+", "blocks", name)
            module.register_forward_pre_hook(lambda m, a, name=name: started.__setitem__(name, time.perf_counter()))
            module.register_forward_hook(
                lambda m, a, o, name=name, key=key: spent.__setitem__(
                    key, spent[key] + time.perf_counter() - started[name]
                )
            )
    totals, per_call = [], []

    def run(t) -> None:
        spent.clear()
        start = time.perf_counter()
        unet(sample, t, **inputs)
        totals.append(time.perf_counter() - start)
        per_call.append(dict(spent))

    with torch.no_grad():
        for _ in range(setup["calls"] + 1):
            call()
    totals, per_call = totals[1:], per_call[1:]  # the first call warms up
    modules = {k: statistics.median(c.get(k, 0.0) for c in per_call) for k in per_call[0]}
    result = {"side": side, "diffusers": diffusers.__version__, "totals_s": totals, "modules_s": modules}
    with open(os.path.join(out, f"{side}.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(f"{side}: median call {statistics.median(totals):.2f} s of {totals}")
    return result


def compare(out: str, rows: int) -> None:
    a, b = (json.load(open(os.path.join(out, f"{s}.json"))) for s in ("hidiff", "published"))
    ta, tb = statistics.median(a["totals_s"]), statistics.median(b["totals_s"])
    print(
        f"one call: hidiff {ta:.2f} s (diffusers {a['diffusers']}), published {tb:.2f} s (diffusers {b['diffusers']})"
    )
    for title, parts in (("blocks", False), ("transformer parts (summed over a layer's blocks)", True)):
        names = [k for k in set(a["modules_s"]) | set(b["modules_s"]) if bool(PARTS.search(k)) == parts]
        ma, mb = (sum(d["modules_s"].get(k, 0.0) for k in names) for d in (a, b))
        print(f"\n{title}: hidiff {ma:.2f} s, published {mb:.2f} s; largest differences")
        print(f"{'module':<44} {'hidiff s':>9} {'published s':>12} {'difference':>11}")
        names.sort(key=lambda k: -abs(a["modules_s"].get(k, 0.0) - b["modules_s"].get(k, 0.0)))
        for k in names[:rows]:
            x, y = a["modules_s"].get(k, 0.0), b["modules_s"].get(k, 0.0)
            print(f"{k:<44} {x:9.2f} {y:12.2f} {x - y:+11.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("side", choices=("hidiff", "published", "compare"))
    parser.add_argument("--out", required=True, help="folder shared by the three commands")
    parser.add_argument("--family", default="sdxl", help="a family of hidiff bench: sd15, sdxl, ...")
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--step", type=int, default=0, help="the step of the schedule whose call is timed")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calls", type=int, default=2, help="timed calls after the warm-up call")
    parser.add_argument("--rows", type=int, default=12)
    args = parser.parse_args()
    if args.side == "compare":
        compare(args.out, args.rows)
        return
    if args.side == "hidiff":
        setup = hidiff_setup(args, parser)
    else:
        with open(os.path.join(args.out, "setup.json")) as f:
            setup = json.load(f)
    time_side(args.side, setup, args.out)


if __name__ == "__main__":
    main()
