"""When HiDiffusion acts: presets as data, and the step of the current pipeline call.

A preset names two step ranges, one per RAU-Net path (the strided conv and the
avg-pool). Range ends are symbols resolved against the preset's ratios:
``"0"`` is step 0, ``"T1"``/``"T2"`` are ``int(N * ratio)``, ``"A"`` is the
aggressive start ``int(aggressive_step_ratio * N)`` (8 of 50 steps, as published).
Thresholds round down, exactly as the published code does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch

Range = tuple[str, str]


@dataclass(frozen=True)
class Preset:
    name: str
    layout: str  # "sd" or "sdxl": the U-Net layout the automatic choice gives it to
    t1_ratio: float
    t2_ratio: float
    conv: Range  # steps in which the conv downsampler runs with stride 4
    pool: Range  # steps in which the stage after it is avg-pooled
    note: str = ""


#: The published schedule table (see README "Presets").
PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("sd-1024", "sd", 0.4, 0.0, ("0", "T1"), ("0", "T2"), "SD 1.x/2.x, either side below 4x native"),
        Preset("sd-2048", "sd", 0.7, 0.3, ("0", "T1"), ("0", "T2"), "SD 1.x/2.x, both sides at 4x native or more"),
        Preset("sdxl-2048", "sdxl", 0.4, 0.0, ("0", "A"), ("A", "T1"), "SDXL below 4x native: conv first, then pool"),
        Preset("sdxl-2048-gentle", "sdxl", 0.4, 0.0, ("0", "T2"), ("0", "T1"), "SDXL inpainting / EDM (Playground)"),
        Preset("sdxl-2048-controlnet", "sdxl", 0.5, 0.0, ("0", "A"), ("A", "T1"), "SDXL text-to-image ControlNet"),
        Preset("sdxl-4096", "sdxl", 0.7, 0.3, ("0", "T2"), ("0", "T1"), "SDXL, both sides at 4x native or more"),
        Preset("sdxl-turbo", "sdxl", 0.5, 0.0, ("0", "0"), ("0", "T1"), "SDXL few-step (Turbo) use"),
    )
}

#: Runs of at most this many steps use the few-step (Turbo) preset on SDXL.
FEW_STEPS = 4


def choose_preset(
    layout_kind: str,
    latent_hw: tuple[int, int],
    native_hw: tuple[int, int],
    num_steps: int,
    *,
    inpainting: bool = False,
    edm: bool = False,
    text2img_controlnet: bool = False,
    aggressive: Optional[bool] = None,
) -> Preset:
    """The published preset choice, with sizes taken relative to the native size."""
    big = latent_hw[0] >= 4 * native_hw[0] and latent_hw[1] >= 4 * native_hw[1]
    if layout_kind == "sd":
        return PRESETS["sd-2048" if big else "sd-1024"]
    if num_steps <= FEW_STEPS:
        return PRESETS["sdxl-turbo"]
    if big:
        return PRESETS["sdxl-4096"]
    if aggressive is None:
        aggressive = not (inpainting or edm)
    if not aggressive:
        return PRESETS["sdxl-2048-gentle"]
    return PRESETS["sdxl-2048-controlnet" if text2img_controlnet else "sdxl-2048"]


def in_range(rng: Range, step: int, num_steps: int, t1: float, t2: float, aggressive_ratio: float) -> bool:
    """Whether ``step`` (0-based, of ``num_steps``) lies in the preset range ``rng``."""
    ratios = {"0": 0.0, "T1": t1, "T2": t2, "A": aggressive_ratio}
    start, end = (int(num_steps * ratios[end]) for end in rng)
    return start <= step < end


@dataclass(frozen=True)
class Progress:
    """Where a U-Net call stands in its pipeline call: step ``index`` of ``total``."""

    index: int
    total: int
    new_run: bool


class StepTracker:
    """Finds the denoising step of each U-Net call from the scheduler, not from call counts.

    The position of the call's timestep in ``scheduler.timesteps`` (or the scheduler's
    own ``step_index`` where it keeps one, which disambiguates the repeated timesteps
    of Heun-type schedulers) gives the step. A new ``timesteps`` tensor, which
    ``set_timesteps`` makes at the start of every pipeline call, starts a new run, so
    an interrupted or failed run leaves nothing behind. The first position seen in a
    run is its step 0 (img2img strength); second-order schedulers (Heun, KDPM2) make
    ``order`` entries per step.
    """

    def __init__(self) -> None:
        self._run: Any = None  # the timesteps tensor of the current run (held, so its id cannot be reused)
        self._start = 0
        self._last = -1

    def reset(self) -> None:
        self._run = None

    def locate(self, timestep: Any, scheduler: Any, fallback_total: int = 1000) -> Progress:
        timesteps = getattr(scheduler, "timesteps", None) if scheduler is not None else None
        t = _as_float(timestep)
        if isinstance(timesteps, torch.Tensor) and timesteps.ndim == 1 and len(timesteps) > 0:
            same_run = timesteps is self._run
            last = self._last if same_run else -1
            pos = _position(t, timesteps, scheduler, last)
            if pos is not None:
                new_run = not same_run or pos < last
                if new_run:
                    self._run, self._start = timesteps, pos
                self._last = pos
                # PNDM's PLMS mode spends two calls on its first step (its timesteps
                # repeat one entry to make room for the second).
                extra = 1 if _plms_warmup(scheduler) else 0
                span = max(1, len(timesteps) - self._start - extra)
                order = max(1, int(getattr(scheduler, "order", 1) or 1))
                total = max(1, math.ceil(span / order))
                index = min(total - 1, max(0, pos - self._start - extra) * total // span)
                return Progress(index, total, new_run)
        # No schedule to place the call in (a bare U-Net, or a timestep from elsewhere):
        # read progress off the timestep value on the training range.
        train = float(getattr(getattr(scheduler, "config", None), "num_train_timesteps", 1000) or 1000)
        frac = min(max(1.0 - t / train, 0.0), 1.0)
        index = min(fallback_total - 1, int(frac * fallback_total))
        new_run = not isinstance(self._run, str) or index < self._last
        self._run, self._last = "value", index
        return Progress(index, fallback_total, new_run)


def _position(t: float, timesteps: torch.Tensor, scheduler: Any, last: int) -> Optional[int]:
    """Index of timestep ``t`` in ``timesteps``: the scheduler's own step index where it
    agrees, else the first match at or after the last position of this run."""
    step_index = getattr(scheduler, "_step_index", None)
    if step_index is None and _plms_warmup(scheduler):
        step_index = scheduler.counter  # PNDM counts its calls; it tells the repeated entries apart
    if isinstance(step_index, int) and 0 <= step_index < len(timesteps):
        if _close(float(timesteps[step_index]), t):
            return step_index
    values = timesteps.detach().to("cpu", torch.float64)
    hits = torch.isclose(values, torch.tensor(t, dtype=torch.float64), rtol=1e-6, atol=1e-6)
    candidates = torch.nonzero(hits).flatten().tolist()
    if not candidates:
        return None
    later = [c for c in candidates if c >= last]
    return later[0] if later else candidates[0]


def _plms_warmup(scheduler: Any) -> bool:
    return isinstance(getattr(scheduler, "counter", None), int) and bool(
        getattr(getattr(scheduler, "config", None), "skip_prk_steps", False)
    )


def _as_float(timestep: Any) -> float:
    if isinstance(timestep, torch.Tensor):
        return float(timestep.detach().reshape(-1)[0])
    return float(timestep)


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-6 * max(1.0, abs(a), abs(b))
