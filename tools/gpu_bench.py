"""The GPU benchmark of issue 15: one run, every figure side by side (docs/benchmarks.md).

On one large GPU, in fp16, full-width random-weight U-Nets (speed does not depend on the
weight values): SD 1.5 at 1024x1024, SDXL at 2048x2048 and at 4096x4096; per case the
modes baseline, published (the published ``hidiffusion`` package, when a Python with it is
given), hidiff, hidiff with ``kv_downsample`` 2, and with ``kv_downsample`` 2 one level
deeper (``kv_levels`` 2); each the whole denoising loop (U-Net + DDIM step, batch 2 as
classifier-free guidance runs it: one image), modes interleaved by ``hidiff bench``.

Writes ``gpu_bench.json`` (every bench result in full) and ``gpu_bench.md`` (one table:
seconds per image, speed-up over baseline beside its FLOP bound, peak GPU memory) to
``--out``. A case that would start after ``--budget-s`` seconds is listed as skipped, so
the run ends in time; a published row that cannot run says why.

    bash tools/gpu_bench.sh --out results            # on the GPU machine
    python tools/gpu_bench.py --tiny --device cpu --dtype float32 --steps 1 \\
        --cases sd15:640,sdxl:1024,sdxl:1536 --out /tmp/g   # the reduced CPU form (tests)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hidiff.app.args import BASELINE, PUBLISHED  # noqa: E402
from hidiff.app.bench import kv_mode, run_bench  # noqa: E402
from hidiff.app.reference import check_reference_python  # noqa: E402

#: (family, side in pixels) of each case, in the order they run.
CASES = (("sd15", 1024), ("sdxl", 2048), ("sdxl", 4096))
#: The local modes, in table order (published goes after baseline when it runs).
LOCAL_MODES = ("hidiff", kv_mode(2), kv_mode(2, 2))
ROW_ORDER = (BASELINE, PUBLISHED, *LOCAL_MODES)


def parse_cases(text: str) -> tuple:
    cases = []
    for part in text.split(","):
        family, _, side = part.partition(":")
        if not side.isdigit() or int(side) % 8:
            raise SystemExit(f"--cases: {part!r} is not FAMILY:SIDE with SIDE a multiple of 8")
        cases.append((family, int(side)))
    return tuple(cases)


def published_absence(reference_python: Optional[str]) -> Optional[str]:
    """Why the published mode cannot run (None: it can)."""
    if not reference_python:
        return "no --reference-python given (a Python with hidiffusion 0.1.10 and diffusers 0.27.x)"
    try:
        check_reference_python(reference_python, "the published mode")
    except ValueError as error:
        return str(error)
    return None


def run(args: argparse.Namespace) -> dict:
    start = time.perf_counter()
    absent = published_absence(args.reference_python)
    device = torch.device(args.device)
    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"{device.type} ({torch.get_num_threads()} threads)"
    )
    cases: list[dict[str, Any]] = []
    for family, side in args.cases:
        case: dict[str, Any] = {"family": family, "width": side, "height": side}
        elapsed = time.perf_counter() - start
        if elapsed > args.budget_s:
            case["skipped"] = f"the run had taken {elapsed:.0f} s, over --budget-s {args.budget_s:.0f}"
            cases.append(case)
            continue
        t0 = time.perf_counter()
        case["result"] = run_bench(
            family=family,
            height=side,
            width=side,
            steps=args.steps,
            batch=2,
            repeats=args.repeats,
            warmup=args.warmup,
            modes=LOCAL_MODES,
            device=args.device,
            dtype=args.dtype,
            tiny=args.tiny,
            reference_python=None if absent else args.reference_python,
        )
        case["seconds"] = time.perf_counter() - t0
        if absent:
            case["published_absent"] = absent
        cases.append(case)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {
        "device": name,
        "torch": torch.__version__,
        "dtype": args.dtype,
        "steps": args.steps,
        "batch": 2,
        "tiny": args.tiny,
        "seconds": time.perf_counter() - start,
        "cases": cases,
    }


def markdown(report: dict) -> str:
    lines = [
        f"GPU benchmark on {report['device']}, torch {report['torch']}, {report['dtype']}, "
        f"{report['steps']} DDIM steps, U-Net batch 2 (one image with classifier-free guidance)"
        f"{', tiny widths' if report['tiny'] else ', full-width random weights'}; whole run {report['seconds']:.0f} s.",
        "",
        "| case | mode | s/image | speed-up | FLOP bound | of bound | peak memory |",
        "|---|---|---|---|---|---|---|",
    ]
    for case in report["cases"]:
        label = f"{case['family']} {case['width']}x{case['height']}"
        if "skipped" in case:
            lines.append(f"| {label} | all | skipped: {case['skipped']} | | | | |")
            continue
        modes = case["result"]["modes"]
        for mode in ROW_ORDER:
            if mode not in modes:
                lines.append(f"| {label} | {mode} | absent: {case.get('published_absent', 'not run')} | | | | |")
                continue
            r = modes[mode]
            lines.append(
                f"| {label} | {mode} | {r['total_s']:.2f} | {r['speedup']:.2f}x | {r['flop_speedup']:.2f}x | "
                f"{r['speedup'] / r['flop_speedup']:.0%} | {r['peak_memory_bytes'] / 2**30:.2f} GiB |"
            )
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="gpu-bench", help="folder for gpu_bench.json and gpu_bench.md")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--cases", type=parse_cases, default=CASES, help="FAMILY:SIDE,... (default the three cases)")
    parser.add_argument("--tiny", action="store_true", help="tiny widths (the CPU test form)")
    parser.add_argument("--reference-python", help="a Python with the published hidiffusion package")
    parser.add_argument("--budget-s", type=float, default=400.0, help="start no case after this many seconds")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default torch's)")
    return parser


def main(argv: Optional[list] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    report = run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_bench.json").write_text(json.dumps(report, indent=2) + "\n")
    table = markdown(report)
    (out / "gpu_bench.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
