"""torch.compile (inductor, CPU) of a HiDiffusion-patched U-Net: recompiles and graph breaks per phase.

A tiny SD 1.5 U-Net (random weights) at 640x640 (latent 80, above its native 64) runs a
``--steps`` DDIM schedule under hidiff (sd-1024: the strided conv in the first steps, then
stock RAU-Net geometry; MSW-MSA throughout), through ``torch.compile(unet)``. After every
call it reads torch._dynamo's counters (frames compiled, recompiles, graph breaks, unique
graphs) and the call's time; then ``torch._dynamo.explain`` lists the graph-break reasons of one call.

Run: .venv/bin/python tools/compile_measure.py [--steps 6] [--backend inductor] [--options '{...}']
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter

import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--options", default="{}", help="apply_hidiffusion options as JSON")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--disable-hook-call",
        action="store_true",
        help="also keep dynamo out of hidiff's Hook.__call__ frames (not only _dispatch)",
    )
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from diffusers import DDIMScheduler

    import hidiff
    from hidiff.diffusers.testing import make_unet, tiny_unet_config

    if args.disable_hook_call:
        from hidiff.diffusers.hooks import Hook

        Hook.__call__ = torch.compiler.disable(Hook.__call__)  # type: ignore[method-assign]
    unet = make_unet(tiny_unet_config("sd15"))
    scheduler = DDIMScheduler()
    scheduler.set_timesteps(args.steps)
    hidiff.apply_hidiffusion(unet, scheduler=scheduler, **json.loads(args.options))
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, 80, 80, generator=g)
    text = torch.randn(1, 77, unet.config.cross_attention_dim, generator=g)
    compiled = torch.compile(unet, backend=args.backend)
    counters = torch._dynamo.utils.counters
    counters.clear()
    rows = []
    with torch.no_grad():
        for i, t in enumerate(scheduler.timesteps):
            start = time.perf_counter()
            compiled(sample, t, encoder_hidden_states=text)
            seconds = time.perf_counter() - start
            rec = hidiff.last_call(unet)
            row = {
                "step": i,
                "conv": rec.conv,
                "windows": rec.windows,
                "kv_calls": rec.kv_calls,
                "seconds": round(seconds, 3),
                "frames_ok": sum(counters["frames"].values()) if "frames" in counters else 0,
                "unique_graphs": counters["stats"].get("unique_graphs", 0),
                "recompiles": sum(v for k, v in counters["recompiles"].items()) if "recompiles" in counters else 0,
                "graph_breaks": sum(counters["graph_break"].values()),
            }
            rows.append(row)
            print(row, flush=True)
    breaks = Counter({k: v for k, v in counters["graph_break"].items()})
    print("graph break reasons:")
    for reason, n in breaks.most_common(10):
        print(f"  {n:4d}  {reason[:160]}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "graph_breaks": dict(breaks), "backend": args.backend}, f, indent=2)


if __name__ == "__main__":
    main()
