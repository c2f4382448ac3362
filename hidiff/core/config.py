"""The one options object of hidiff."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Any, Literal, Optional

from .presets import PRESETS

WindowShift = Literal["seeded", "reference", "none"]
AtNative = Literal["skip", "apply"]
ControlNetMode = Literal["native", "resize"]
#: Values of HiDiffusionConfig.kv_levels: how many transformer stages, from the top one down,
#: take key/value downsampling.
KV_LEVELS = (1, 2)


@dataclass(frozen=True)
class HiDiffusionConfig:
    """Options of :func:`hidiff.apply_hidiffusion`; every field can be passed as a keyword.

    Attributes:
        raunet: run RAU-Net (the resolution-aware down/up sampling in the early steps).
        window_attn: run MSW-MSA (shifted 2x2 window self-attention at the top stage).
        preset: a name from :data:`hidiff.PRESETS`, or None to choose one per call from
            the family, the requested size relative to the native one, the step count
            and the task, as the published code does.
        t1_ratio, t2_ratio: override the chosen preset's T1/T2 ratios (in [0, 1],
            T2 <= T1). T = int(steps * ratio).
        aggressive: SDXL below 4x native: True runs the strided conv for the first
            ``aggressive_step_ratio`` of the steps and then pools until T1 (published
            default for text-to-image); False pools from step 0 (published for
            inpainting and Playground). None: chosen from the model.
        aggressive_step_ratio: where the aggressive SDXL schedule switches from conv to
            pool (8/50, as published).
        window_shift: "seeded" (default) draws the window shifts from a private generator
            seeded from the run's initial latents (so the pipeline's own generator makes
            a run reproducible, and the global RNG is never touched); "reference" draws
            one ``torch.rand(1)`` from the global RNG per windowed block call, exactly as
            the published code; "none" never shifts.
        window_seed: with "seeded", a fixed seed instead of one taken from the latents.
        at_native: "skip" (default) leaves calls at or below the native resolution
            untouched; "apply" acts at every size, as the published code does.
        controlnet: how ControlNets of a ControlNet pipeline run while HiDiffusion acts.
            "native" (the published treatment): at the model's native size for the first
            ``controlnet_steps_ratio`` of the steps, their residuals resized to the
            U-Net's features, and ignored after that; "resize": at full size at every
            step, residuals resized to the (RAU-Net-shrunk) features. None (default):
            "native" for SDXL text-to-image ControlNet pipelines, where the published
            code uses it, "resize" elsewhere.
        controlnet_steps_ratio: the share of steps in which ControlNets run under "native".
        kv_downsample: ToDo-style key/value downsampling of the self-attention at the top
            stage and its mirror (the blocks MSW-MSA windows): 1 off (default), 2 (a quarter of
            the key/value tokens) or 4 (a sixteenth); queries keep full resolution. Acts where
            HiDiffusion acts (above native size, or everywhere with at_native="apply"), also with
            raunet and window_attn off; inside the windows when MSW-MSA runs.
        kv_levels: where ``kv_downsample`` acts: 1 (default) the top transformer stage and its
            mirror only; 2 also the next-lower-resolution transformer stage and its mirror (SD
            1.x/2.x: the 640-wide stage; SDXL: the 1280-wide one), whose self-attention runs
            unwindowed over its whole map. Needs ``kv_downsample`` 2 or 4.
    """

    raunet: bool = True
    window_attn: bool = True
    preset: Optional[str] = None
    t1_ratio: Optional[float] = None
    t2_ratio: Optional[float] = None
    aggressive: Optional[bool] = None
    aggressive_step_ratio: float = 8 / 50
    window_shift: WindowShift = "seeded"
    window_seed: Optional[int] = None
    at_native: AtNative = "skip"
    controlnet: Optional[ControlNetMode] = None
    controlnet_steps_ratio: float = 0.6
    kv_downsample: int = 1
    kv_levels: int = 1

    def __post_init__(self) -> None:
        for name in ("raunet", "window_attn"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.aggressive is not None and not isinstance(self.aggressive, bool):
            raise TypeError(f"aggressive must be True, False or None, got {self.aggressive!r}")
        if self.preset is not None and self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; choose one of {', '.join(PRESETS)} or None (automatic)")
        for name in ("t1_ratio", "t2_ratio", "aggressive_step_ratio", "controlnet_steps_ratio"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{name} must be a number in [0, 1], got {value!r}")
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {value}")
        _check_choice("window_shift", self.window_shift, ("seeded", "reference", "none"))
        _check_choice("at_native", self.at_native, ("skip", "apply"))
        if self.controlnet is not None:
            _check_choice("controlnet", self.controlnet, ("native", "resize"))
        if self.window_seed is not None and (
            isinstance(self.window_seed, bool) or not isinstance(self.window_seed, int)
        ):
            raise TypeError(f"window_seed must be an int or None, got {self.window_seed!r}")
        if type(self.kv_downsample) is not int or self.kv_downsample not in (1, 2, 4):
            raise ValueError(
                f"kv_downsample must be 1 (off), 2 or 4 (the key/value map shrinks by that factor per side), "
                f"got {self.kv_downsample!r}"
            )
        if type(self.kv_levels) is not int or self.kv_levels not in KV_LEVELS:
            raise ValueError(
                f"kv_levels must be 1 (the top transformer stage) or 2 (also the next-lower-resolution one), "
                f"got {self.kv_levels!r}"
            )
        if self.kv_levels > 1 and self.kv_downsample == 1:
            raise ValueError(
                f"kv_levels={self.kv_levels} says where key/value downsampling acts, but kv_downsample is 1 (off): "
                "pass kv_downsample=2 or 4 with it, or leave kv_levels at 1"
            )
        self.check_ratios()

    def check_ratios(self, layout: Optional[str] = None) -> None:
        """Refuse T2 > T1 for every preset this config can run with (on a ``layout`` when known)."""
        if self.preset:
            candidates = [PRESETS[self.preset]]
        else:
            candidates = [p for p in PRESETS.values() if layout is None or p.layout == layout]
            if layout is None and (self.t1_ratio is None) != (self.t2_ratio is None):
                return  # one override alone: checked against the model's presets by apply_hidiffusion
        for preset in candidates:
            t1, t2 = self.ratios(preset)
            if t2 > t1:
                raise ValueError(
                    f"T2 ratio {t2} exceeds T1 ratio {t1} (preset {preset.name}): T2 must not be larger than T1; "
                    "pass both t1_ratio and t2_ratio, with t2_ratio <= t1_ratio"
                )

    def ratios(self, preset: Any) -> tuple[float, float]:
        """(T1, T2) ratios of ``preset`` after this config's overrides."""
        t1 = preset.t1_ratio if self.t1_ratio is None else float(self.t1_ratio)
        t2 = preset.t2_ratio if self.t2_ratio is None else float(self.t2_ratio)
        return t1, t2

    @classmethod
    def from_options(cls, base: Optional[HiDiffusionConfig] = None, **options: Any) -> HiDiffusionConfig:
        """A config from keywords (unknown ones are refused), on top of ``base``."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise TypeError(f"unknown option(s) {', '.join(unknown)}; valid options: {', '.join(sorted(known))}")
        return dataclasses.replace(base or cls(), **options)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
