"""Time the HiDiffusion node against plain ComfyUI on a full-width random SD 1.5 U-Net.

    .comfy/bin/python -m hidiff.app.comfy_bench [--size 1024] [--steps 3] [--threads 2] [--json out.json]
    .comfy/bin/python -m hidiff.app.comfy_bench --jank DIR [--size 768] [--threads 1] [--reps 2]

Builds SD 1.5's U-Net (model_channels 320, ComfyUI's own ``supported_models.SD15``) with random
weights, then runs ComfyUI's KSampler (euler, normal, cfg 1: one U-Net call per step) for
``--steps`` steps at ``--size`` x ``--size`` pixels, plain and with the node, and prints both
times and their ratio. A benchmark, not a test: the weights are random, only the speed counts.
Run it on a quiet machine; ``--comfyui`` is the ComfyUI root (default: ``<venv>/ComfyUI``).

With ``--jank DIR`` (a checkout of comfyui_jankhidiffusion, the other ComfyUI HiDiffusion; hidiff
neither ships nor installs it) it times one U-Net step of each implementation in the same state
of the schedule instead (:func:`per_step`).
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
    ap.add_argument(
        "--jank",
        default=None,
        help="a comfyui_jankhidiffusion checkout (not shipped or installed by hidiff): time one U-Net step of "
        "each implementation at the same schedule instead (per-step comparison, interleaved repetitions)",
    )
    ap.add_argument("--reps", type=int, default=2, help="with --jank: interleaved repetitions")
    ap.add_argument(
        "--defaults",
        action="store_true",
        help="with --jank: whole --steps runs at each implementation's defaults (and hidiff with kv_downsample 2)",
    )
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

    from ..comfy.patch import apply_hidiffusion

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

    if opts.jank and opts.defaults:
        return at_defaults(opts, patcher, run, apply_hidiffusion)
    if opts.jank:
        return per_step(opts, patcher, run_one_step(comfy.sample, noise, positive, negative, latent), apply_hidiffusion)

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
    return _written(opts, result)


def _written(opts, result: dict) -> dict:
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


def interleaved(models: dict, run, reps: int) -> tuple[dict, dict]:
    """({name: seconds of each repetition}, {name: median}): every repetition runs every model
    once, in the reverse order every other time (drift over a repetition favours no model)."""
    import statistics

    times: dict = {name: [] for name in models}
    for rep in range(reps):
        for name in list(models)[:: 1 if rep % 2 == 0 else -1]:
            times[name].append(run(models[name]))
    return times, {name: statistics.median(t) for name, t in times.items()}


def run_one_step(sample, noise, positive, negative, latent):
    """A timer of one euler step (cfg 1: one U-Net call) of a model, in seconds."""

    def run(model) -> float:
        t = time.perf_counter()
        sample.sample(model, noise, 1, 1.0, "euler", "normal", positive, negative, latent, disable_pbar=True, seed=0)
        return time.perf_counter() - t

    return run


def load_jank(path: str):
    """(raunet, msw_msa_attention) modules of a comfyui_jankhidiffusion checkout, loaded as ComfyUI loads a pack."""
    import importlib
    import importlib.util

    name = "hidiff_bench_jankhidiffusion"
    spec = importlib.util.spec_from_file_location(
        name, os.path.join(path, "__init__.py"), submodule_search_locations=[os.path.abspath(path)]
    )
    if spec is None or spec.loader is None:
        raise SystemExit(f"--jank {path}: no __init__.py of a node pack there")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return importlib.import_module(f"{name}.py.raunet"), importlib.import_module(f"{name}.py.msw_msa_attention")


def per_step(opts, patcher, run, apply_hidiffusion) -> dict:
    """One U-Net step of each implementation in the same state of the schedule, interleaved.

    States: windowed attention alone (MSW-MSA at the top stage and its mirror), and windows with
    RAU-Net's strided conv (stride 4 / dilation 2 at input block 3, grown back at output block 8).
    hidiff: ``raunet=False``, and ``t1_ratio=1`` (conv in the one step, no pooling); the other
    implementation: its MSW-MSA node on the same blocks from percent 0, and its RAU-Net node with
    the conv from percent 0 to 1 and its cross-attention pooling off. Each repetition runs every
    model once, in the reverse order every other time; the ratios are of medians.
    """
    raunet, msw = load_jank(opts.jank)
    sd15 = next(k for k in msw.SIMPLE_PRESETS if str(k).endswith("SD15"))
    windows = msw.SIMPLE_PRESETS[sd15]._replace(start_time=0.0, end_time=1.0).as_dict
    conv = (
        raunet.SIMPLE_PRESETS["SD15_high"]
        ._replace(
            start_time=0.0, end_time=1.0, ca_start_time=1.0, ca_end_time=1.0, ca_input_blocks="", ca_output_blocks=""
        )
        .as_dict
    )
    models = {
        "comfyui": patcher,
        "hidiff windows": apply_hidiffusion(patcher, raunet=False),
        "jank windows": msw.ApplyMSWMSAAttention.patch(model=patcher, **windows)[0],
        "hidiff conv+windows": apply_hidiffusion(patcher, t1_ratio=1.0, t2_ratio=0.0),
        "jank conv+windows": msw.ApplyMSWMSAAttention.patch(
            model=raunet.ApplyRAUNet.patch(model=patcher, **conv)[0], **windows
        )[0],
    }
    for model in models.values():  # warm-up
        run(model)
    times, median = interleaved(models, run, opts.reps)
    result = {
        "size": opts.size,
        "threads": opts.threads,
        "reps": opts.reps,
        "seconds": times,
        "ratio_hidiff_to_jank": {
            "windows": median["hidiff windows"] / median["jank windows"],
            "conv+windows": median["hidiff conv+windows"] / median["jank conv+windows"],
        },
        "ratio_to_comfyui": {name: median[name] / median["comfyui"] for name in models},
    }
    for name in models:
        print(f"{name:22s} median {median[name]:7.2f} s  ({median[name] / median['comfyui']:.2f}x plain ComfyUI)")
    for state, ratio in result["ratio_hidiff_to_jank"].items():
        print(f"hidiff / jank per step, {state}: {ratio:.2f}")
    return _written(opts, result)


def at_defaults(opts, patcher, run, apply_hidiffusion) -> dict:
    """Whole ``--steps`` runs, interleaved: plain ComfyUI, this node at its defaults and with
    ``kv_downsample`` 2, and comfyui_jankhidiffusion's simple nodes at their defaults (RAU-Net
    "high" preset, MSW-MSA SD 1.5 preset, as its nodes apply them)."""
    raunet, msw = load_jank(opts.jank)
    sd15 = next(k for k in msw.SIMPLE_PRESETS if str(k).endswith("SD15"))
    jank = raunet.ApplyRAUNet.patch(model=patcher, **raunet.SIMPLE_PRESETS["SD15_high"].as_dict)[0]
    jank = msw.ApplyMSWMSAAttention.patch(model=jank, **msw.SIMPLE_PRESETS[sd15].as_dict)[0]
    models = {
        "comfyui": patcher,
        "hidiff": apply_hidiffusion(patcher),
        "hidiff kv2": apply_hidiffusion(patcher, kv_downsample=2),
        "jank": jank,
    }
    times, median = interleaved(models, run, opts.reps)
    result = {"size": opts.size, "steps": opts.steps, "threads": opts.threads, "reps": opts.reps, "seconds": times}
    result["ratio_to_comfyui"] = {name: median[name] / median["comfyui"] for name in models}
    result["ratio_to_jank"] = {name: median[name] / median["jank"] for name in models}
    for name in models:
        print(
            f"{name:12s} median {median[name]:8.1f} s  {result['ratio_to_comfyui'][name]:.2f}x plain ComfyUI, "
            f"{result['ratio_to_jank'][name]:.2f}x jank"
        )
    return _written(opts, result)


if __name__ == "__main__":  # pragma: no cover
    main()
