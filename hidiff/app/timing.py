"""One timed denoising loop and its FLOP count, shared by ``hidiff bench`` and the runner
of the published package (``reference_bench.py``), which runs in another Python with an
older diffusers. Both sides time exactly this code, so it imports torch only: no hidiff,
no particular diffusers release.
"""

from __future__ import annotations

import math
import os
import threading
import time
from typing import Any, Callable, Optional

import torch

#: Marks the runner's replies on its stdout, which libraries may print to as well.
REPLY_PREFIX = "@hidiff-bench "


def rss() -> int:
    """Resident memory of this process, in bytes."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: the process's peak so far
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakMemory:
    """Peak memory while a block runs: max allocated on CUDA, sampled RSS on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak = 0
        self._stop = threading.Event()

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.peak = rss()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, rss())

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, rss())


def stock_deep_size(unet: Any, latent: tuple) -> tuple:
    """The side lengths the stock U-Net's middle block sees for a latent: each stride-2
    downsampler halves a side, rounding up."""
    h, w = latent
    for block in unet.down_blocks:
        if getattr(block, "downsamplers", None):
            h, w = math.ceil(h / 2), math.ceil(w / 2)
    return h, w


class DeepSizeProbe:
    """Records the map size at the U-Net's middle block on every call. RAU-Net (any
    implementation) is active in a call exactly when that map is smaller than stock."""

    def __init__(self, unet: Any) -> None:
        self.sizes: list = []
        self._handle = unet.mid_block.register_forward_pre_hook(self._record)

    def _record(self, module: Any, args: tuple) -> None:
        self.sizes.append(tuple(args[0].shape[-2:]))

    def close(self) -> None:
        self._handle.remove()


def timed_loop(unet: Any, scheduler: Any, inputs: dict, steps: int) -> dict:
    """One DDIM-style denoising loop (U-Net + scheduler step), timed per step.

    Returns seconds per step, whether RAU-Net acted in each step, the number of U-Net
    calls, and the peak memory over the loop.
    """
    return timed_phases(unet, scheduler, inputs, steps, list(range(steps)))


def timed_phases(
    unet: Any,
    scheduler: Any,
    inputs: dict,
    steps: int,
    keys: list,
    before_call: Optional[Callable[[int], None]] = None,
) -> dict:
    """Like :func:`timed_loop`, but ``keys`` names each step's phase and only the first step of
    each distinct phase runs (U-Net + scheduler step, timed); every step gets its phase's time
    (all keys distinct: the whole loop). ``before_call(i)`` runs before step ``i``'s call, to put
    an implementation that counts its own calls at that step. The sample is carried from one
    timed call to the next; the time does not depend on its values."""
    if len(keys) != steps:
        raise ValueError(f"{len(keys)} phase keys for {steps} steps")
    x = inputs["sample"]
    extra = {k: v for k, v in inputs.items() if k != "sample"}
    stock = stock_deep_size(unet, tuple(x.shape[-2:]))
    scheduler.set_timesteps(steps)
    measured: dict = {}
    reduced: dict = {}
    probe = DeepSizeProbe(unet)
    try:
        with PeakMemory(x.device) as memory, torch.no_grad():
            for i, (key, t) in enumerate(zip(keys, scheduler.timesteps)):
                if key in measured:
                    continue
                if before_call is not None:
                    before_call(i)
                _sync(x.device)
                start = time.perf_counter()
                eps = unet(x, t, **extra).sample
                x = scheduler.step(eps, t, x).prev_sample
                _sync(x.device)
                measured[key] = time.perf_counter() - start
                reduced[key] = probe.sizes[-1] != stock
    finally:
        probe.close()
    return {
        "times": [measured[k] for k in keys],
        "phases": [reduced[k] for k in keys],
        "unet_calls": len(probe.sizes),
        "peak": memory.peak,
    }


def move(inputs: Any, device: Any, dtype: Optional[torch.dtype] = None) -> Any:
    """Loop inputs (tensors, nested in dicts) on ``device``; floating ones in ``dtype``."""
    if isinstance(inputs, dict):
        return {k: move(v, device, dtype) for k, v in inputs.items()}
    return inputs.to(device, dtype) if inputs.is_floating_point() else inputs.to(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def loop_flops(
    unet: Any, scheduler: Any, inputs: dict, steps: int, phase_key: Optional[Callable[[Any], Any]] = None
) -> list:
    """FLOPs of each step of the same loop, counted with torch's FlopCounterMode (call it
    on a weightless meta-device model), by module: ``{"down_blocks.0.downsamplers.0": n,
    ..., "": whole call}``. ``phase_key(t)``, where given, names what decides the cost of
    the step at timestep ``t``: steps with a key already counted reuse that count."""
    from torch.utils.flop_counter import FlopCounterMode

    x = inputs["sample"]
    extra = {k: v for k, v in inputs.items() if k != "sample"}
    scheduler.set_timesteps(steps)
    per_step, counted = [], {}
    for t in scheduler.timesteps:
        key = phase_key(t) if phase_key is not None else object()  # no key: count every step
        if key not in counted:
            counter = FlopCounterMode(display=False)
            with counter, torch.no_grad():
                unet(x, t, **extra)
            counted[key] = _by_module(counter.get_flop_counts())
        per_step.append(counted[key])
    return per_step


def _by_module(counts: dict) -> dict:
    """FlopCounterMode's {"UNet2DConditionModel.down_blocks.0": {op: n}} as {"down_blocks.0": n};
    the root model becomes ""."""
    flops = {}
    for name, ops in counts.items():
        if name != "Global":
            flops[name.partition(".")[2]] = sum(ops.values())
    return flops
