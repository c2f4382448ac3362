"""``hidiff bench``: what HiDiffusion costs and saves, side by side in one run.

Random-weight U-Nets built from the published configs (speed does not depend on the
weight values) run the denoising loop (U-Net + DDIM step) in each mode, interleaved
(baseline, hidiff, raunet, msw, baseline, ...) so that machine drift hits every mode
alike. Per mode: median seconds per step in each phase (RAU-Net active or not), total
time, speed-up over baseline, peak memory, and the FLOP count of the same schedule
(counted per phase with torch's FlopCounterMode on a weightless copy of the model), so
that the measured speed-up stands next to the FLOP bound.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from typing import Any, Optional

import torch

from . import adapter
from .testing import FULL_UNET_CONFIGS, make_unet, tiny_unet_config

#: Mode name -> apply_hidiffusion options (None: stock U-Net).
MODES: dict[str, Optional[dict]] = {
    "baseline": None,
    "hidiff": {},
    "raunet": {"window_attn": False},
    "msw": {"raunet": False},
}


def _inputs(config: dict, batch: int, latent: tuple[int, int], device: Any, dtype: Any) -> dict:
    g = torch.Generator().manual_seed(0)
    kwargs = {
        "encoder_hidden_states": torch.randn(batch, 77, config["cross_attention_dim"], generator=g).to(device, dtype)
    }
    if config.get("addition_embed_type") == "text_time":
        pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
        h, w = 8 * latent[0], 8 * latent[1]
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, pooled, generator=g).to(device, dtype),
            "time_ids": torch.tensor([[h, w, 0, 0, h, w]] * batch, dtype=dtype, device=device),
        }
    sample = torch.randn(batch, config.get("in_channels", 4), *latent, generator=g).to(device, dtype)
    return {"sample": sample, **kwargs}


class _PeakMemory:
    """Peak memory while a block runs: max allocated on CUDA, sampled RSS on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak = 0
        self._stop = threading.Event()

    def __enter__(self) -> "_PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.peak = _rss()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, _rss())


def _rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: the process's peak so far
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _run_loop(unet: Any, scheduler: Any, inputs: dict, steps: int) -> tuple[list, list]:
    """One denoising loop; (seconds per step, RAU-Net active per step)."""
    scheduler.set_timesteps(steps)
    x = inputs["sample"]
    extra = {k: v for k, v in inputs.items() if k != "sample"}
    times, phases = [], []
    with torch.no_grad():
        for t in scheduler.timesteps:
            if x.device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            eps = unet(x, t, **extra).sample
            x = scheduler.step(eps, t, x).prev_sample
            if x.device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
            rec = adapter.last_call(unet) if adapter.is_patched(unet) else None
            phases.append(bool(rec and (rec.conv or rec.pool)))
    return times, phases


def count_flops(config: dict, options: Optional[dict], batch: int, latent: tuple[int, int], steps: int) -> dict:
    """FLOPs of one loop under a mode: one weightless (meta) U-Net call per distinct phase."""
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    inputs = _inputs(config, batch, latent, "meta", torch.float32)
    scheduler = DDIMScheduler()
    scheduler.set_timesteps(steps)
    if options is not None:
        # window shifts do not change the count; a fixed seed avoids reading meta values
        adapter.apply_hidiffusion(unet, scheduler=scheduler, window_seed=0, **options)
    per_step, cache = [], {}
    extra = {k: v for k, v in inputs.items() if k != "sample"}
    for t in scheduler.timesteps:
        patch = adapter.get_patch(unet)
        progress = patch.tracker.locate(t, scheduler) if patch else None
        key = patch.plan(latent, progress.index, progress.total)[1:3] if patch else None
        if key not in cache:
            counter = FlopCounterMode(display=False)
            with counter, torch.no_grad():
                unet(inputs["sample"], t, **extra)
            cache[key] = counter.get_total_flops()
        per_step.append(cache[key])
    return {"total": sum(per_step), "per_step": per_step}


def run_bench(
    family: str = "sd15",
    height: int = 1024,
    width: int = 1024,
    steps: int = 4,
    batch: int = 2,
    repeats: int = 1,
    warmup: int = 1,
    modes: tuple = tuple(MODES),
    device: str = "cpu",
    dtype: str = "float32",
    tiny: bool = False,
) -> dict:
    """Time each mode side by side; the result is what ``hidiff bench --json`` prints."""
    from diffusers import DDIMScheduler

    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise ValueError(f"unknown mode(s) {unknown}; choose from {', '.join(MODES)}")
    if "baseline" not in modes:
        modes = ("baseline",) + tuple(modes)
    if height % 8 or width % 8:
        raise ValueError(f"height and width must be multiples of 8, got {height}x{width}")
    if family not in FULL_UNET_CONFIGS:
        raise ValueError(f"unknown family {family!r}; choose from {', '.join(FULL_UNET_CONFIGS)}")
    config = tiny_unet_config(family) if tiny else dict(FULL_UNET_CONFIGS[family])
    dev, dt = torch.device(device), getattr(torch, dtype)
    unet = make_unet(config, dtype=dt).to(dev)
    latent = (height // 8, width // 8)
    inputs = _inputs(config, batch, latent, dev, dt)
    scheduler = DDIMScheduler()
    samples: dict[str, list] = {m: [] for m in modes}
    for m in modes:  # warm-up: first calls pay for allocation and kernel selection
        for _ in range(warmup):
            _timed(unet, scheduler, inputs, 1, MODES[m], dev)
    for _ in range(repeats):
        for m in modes:
            samples[m].append(_timed(unet, scheduler, inputs, steps, MODES[m], dev))
    results = {}
    for m in modes:
        totals = [sum(s["times"]) for s in samples[m]]
        phases = samples[m][0]["phases"]
        per_phase = {}
        for name, active in (("rau", True), ("plain", False)):
            values = [t for s in samples[m] for t, p in zip(s["times"], s["phases"]) if p == active]
            per_phase[name] = statistics.median(values) if values else None
        flops = count_flops(config, MODES[m], batch, latent, steps)
        results[m] = {
            "total_s": statistics.median(totals),
            "step_s": per_phase,
            "rau_steps": sum(phases),
            "peak_memory_bytes": max(s["peak"] for s in samples[m]),
            "flops": flops["total"],
        }
    base = results["baseline"]
    for r in results.values():
        r["speedup"] = base["total_s"] / r["total_s"]
        r["flop_speedup"] = base["flops"] / r["flops"]
    return {
        "family": family, "tiny": tiny, "height": height, "width": width, "steps": steps, "batch": batch,
        "repeats": repeats, "device": str(dev), "dtype": dtype, "threads": torch.get_num_threads(),
        "torch": torch.__version__, "modes": results,
    }


def _timed(unet: Any, scheduler: Any, inputs: dict, steps: int, options: Optional[dict], dev: Any) -> dict:
    if options is not None:
        adapter.apply_hidiffusion(unet, scheduler=scheduler, window_seed=0, **options)
    try:
        with _PeakMemory(dev) as memory:
            times, phases = _run_loop(unet, scheduler, inputs, steps)
    finally:
        adapter.remove_hidiffusion(unet)
    return {"times": times, "phases": phases, "peak": memory.peak}


def format_table(result: dict) -> str:
    lines = [
        f"{result['family']}{' (tiny)' if result['tiny'] else ''} {result['width']}x{result['height']}, "
        f"batch {result['batch']}, {result['steps']} steps, {result['device']} {result['dtype']}, "
        f"{result['threads']} threads, median of {result['repeats']}",
        f"{'mode':<9} {'total s':>9} {'s/step RAU':>11} {'s/step rest':>12} {'speed-up':>9} "
        f"{'FLOP bound':>11} {'GFLOP':>9} {'peak MB':>9}",
    ]
    for name, r in result["modes"].items():
        rau, rest = r["step_s"]["rau"], r["step_s"]["plain"]
        lines.append(
            f"{name:<9} {r['total_s']:9.2f} {_f(rau):>11} {_f(rest):>12} {r['speedup']:8.2f}x "
            f"{r['flop_speedup']:10.2f}x {r['flops'] / 1e9:9.0f} {r['peak_memory_bytes'] / 2**20:9.0f}"
        )
    return "\n".join(lines)


def _f(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.3f}"
