"""When HiDiffusion acts: the presets, as data, and the published rule that picks one.

A preset names two step ranges, one per RAU-Net path (the strided conv and the
avg-pool). Range ends are symbols resolved against the preset's ratios:
``"0"`` is step 0, ``"T1"``/``"T2"`` are ``int(N * ratio)``, ``"A"`` is the
aggressive start ``int(aggressive_step_ratio * N)`` (8 of 50 steps, as published).
Thresholds round down, exactly as the published code does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

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
