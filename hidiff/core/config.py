"""The one options object of hidiff, and the metadata every host builds its inputs from.

Each field of :class:`HiDiffusionConfig` carries an :class:`OptionSpec` (its help text, kind,
choices, range and widget hints): the CLI flags, batch's keys, the ComfyUI node's inputs and
tooltips and the docs' options table are all made from :func:`option_specs`, and the
config's own validation runs the same specs. A new option is one field here.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from typing import Any, Literal, Optional

from .presets import PRESETS

WindowShift = Literal["seeded", "reference", "none"]
AtNative = Literal["skip", "apply"]
ControlNetMode = Literal["native", "resize"]
OptionKind = Literal["bool", "choice", "float", "int"]
#: Values of HiDiffusionConfig.kv_downsample: the factor the key/value map shrinks by per side.
KV_FACTORS = (1, 2, 4)
#: Values of HiDiffusionConfig.kv_levels: how many transformer stages, from the top one down,
#: take key/value downsampling.
KV_LEVELS = (1, 2)
#: The largest window seed (a 64-bit unsigned number, as every host's seeds are).
SEED_MAX = 2**64 - 1
_OPTION = "option"  # the key of a field's metadata that holds its OptionSpec


@dataclass(frozen=True)
class OptionSpec:
    """What a host needs to offer one option: the field's name, its kind and default, a help
    text (CLI help, UI tooltip, docs table), the values it takes and how a UI shows it."""

    name: str  # the HiDiffusionConfig field; also the CLI flag (--name-with-dashes), UI input and batch key
    kind: OptionKind
    default: Any
    help: str
    choices: Optional[tuple[Any, ...]] = None  # "choice" kinds, and ints with a fixed set
    minimum: Optional[float] = None
    maximum: Optional[float] = None
    step: Optional[float] = None
    optional: bool = False  # None allowed: "automatic" / "the library decides"
    none_label: str = "auto"  # what a UI shows for None
    advanced: bool = False  # widget hint: UIs group it under "advanced"

    def check(self, value: Any) -> None:
        """Raise TypeError (wrong type) or ValueError (out of range, unknown choice) naming the option."""
        if value is None:
            if not self.optional:
                raise TypeError(f"{self.name} must be {self.expected()}, got None")
            return
        if self.kind == "bool":
            if not isinstance(value, bool):
                raise TypeError(f"{self.name} must be {self.expected()}, got {value!r}")
        elif self.kind == "choice":
            if not isinstance(value, str) or value not in (self.choices or ()):
                raise ValueError(f"unknown {self.name} {value!r}; choose one of {self.expected()}")
        elif self.kind == "int":
            if type(value) is not int:
                raise TypeError(f"{self.name} must be {self.expected()}, got {value!r}")
            self._check_range(value)
        else:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{self.name} must be {self.expected()}, got {value!r}")
            self._check_range(value)

    def expected(self) -> str:
        """The values this option takes, in words (for error messages and help)."""
        if self.choices is not None:
            words = [repr(c) if isinstance(c, str) else str(c) for c in self.choices]
        elif self.kind == "bool":
            words = ["True", "False"]
        else:
            noun = "an int" if self.kind == "int" else "a number"
            words = [f"{noun} in {self.range_text()}" if self.minimum is not None else noun]
        if self.optional:
            words.append(f"None ({self.none_label})")
        return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} or {words[-1]}"

    def range_text(self) -> str:
        """``[minimum, maximum]`` as written in messages (an unbounded side as inf)."""
        low = "-inf" if self.minimum is None else _number(self.minimum)
        high = "inf" if self.maximum is None else _number(self.maximum)
        return f"[{low}, {high}]"

    def _check_range(self, value: float) -> None:
        if self.choices is not None and value not in self.choices:
            raise ValueError(f"{self.name} must be one of {self.expected()}, got {value!r}")
        low = -math.inf if self.minimum is None else self.minimum
        high = math.inf if self.maximum is None else self.maximum
        if not low <= value <= high:  # also refuses nan
            raise ValueError(f"{self.name} must lie in {self.range_text()}, got {value}")


def _number(value: float) -> str:
    if isinstance(value, int):  # the largest n-bit number as 2**n - 1, as seeds are described
        return f"2**{value.bit_length()} - 1" if value >= 2**16 and (value + 1) & value == 0 else str(value)
    return str(int(value)) if value.is_integer() else f"{value:g}"


def _option(default: Any, kind: OptionKind, help: str, **hints: Any) -> Any:
    """A HiDiffusionConfig field with its OptionSpec (the name is filled in by option_specs)."""
    spec = OptionSpec(name="", kind=kind, default=default, help=help, **hints)
    return field(default=default, metadata={_OPTION: spec})


_RATIO = {"minimum": 0.0, "maximum": 1.0, "step": 0.01}


def _ratio_override(threshold: str, meaning: str) -> Any:
    """t1_ratio / t2_ratio: None keeps the preset's own ratio."""
    return _option(
        None,
        "float",
        f"Override the preset's {threshold} ratio: {meaning}. None: the preset's own value.",
        **_RATIO,
        optional=True,
        none_label="preset",
        advanced=True,
    )


_PRESET_NOTES = "; ".join(f"{p.name}: {p.note}" for p in PRESETS.values())


@dataclass(frozen=True)
class HiDiffusionConfig:
    """Options of :func:`hidiff.apply_hidiffusion`; every field can be passed as a keyword.

    Each field's help text, kind and range are in its :class:`OptionSpec` (see
    :func:`option_specs`, and docs/options.md, which is generated from them).
    """

    raunet: bool = _option(
        True,
        "bool",
        "RAU-Net: in the early steps, shrink one U-Net stage's features (strided conv, then average "
        "pooling) so the layout forms at the model's native scale; prevents duplicated objects.",
    )
    window_attn: bool = _option(
        True,
        "bool",
        "MSW-MSA: run the top-resolution self-attention in shifted 2x2 windows; faster at high resolution, same look.",
    )
    preset: Optional[str] = _option(
        None,
        "choice",
        "The schedule of RAU-Net over the steps. None (auto) chooses one per run from the model family, the "
        "size relative to native, the step count (few-step models) and the task, as the published code does. "
        + _PRESET_NOTES
        + ".",
        choices=tuple(PRESETS),
        optional=True,
    )
    t1_ratio: Optional[float] = _ratio_override(
        "T1", "the share of the steps until which RAU-Net acts, T1 = int(steps x ratio)"
    )
    t2_ratio: Optional[float] = _ratio_override("T2", "the earlier switch point, T2 <= T1")
    aggressive: Optional[bool] = _option(
        None,
        "bool",
        "SDXL below 4x native: True runs the strided conv for the first aggressive_step_ratio of the steps and "
        "then pools (the published text-to-image schedule); False pools from the first step (published for "
        "inpainting and Playground). None: chosen from the model.",
        optional=True,
        advanced=True,
    )
    aggressive_step_ratio: float = _option(
        8 / 50,
        "float",
        "Where the aggressive SDXL schedule switches from strided conv to pooling, as a share of the steps "
        "(8/50 = 0.16, as published).",
        **_RATIO,
        advanced=True,
    )
    window_shift: WindowShift = _option(
        "seeded",
        "choice",
        "How the windows shift each step. seeded: a fixed function of each image's seed (taken from its initial "
        "latents, or window_seed), the step and the layer, reproducible and never touching the global RNG; "
        "reference: one torch.rand(1) from the global RNG per windowed call, exactly as the published code; "
        "none: never shift.",
        choices=("seeded", "reference", "none"),
        advanced=True,
    )
    window_seed: Optional[int] = _option(
        None,
        "int",
        "With window_shift seeded: a fixed seed for the window shifts. None seeds each image's shifts from its "
        "own initial latents, so the run's generator decides them.",
        minimum=0,
        maximum=SEED_MAX,
        optional=True,
        advanced=True,
    )
    at_native: AtNative = _option(
        "skip",
        "choice",
        "What happens at or below the model's native size (512 px SD 1.x, 768 px SD 2.x-v, 1024 px SDXL): skip "
        "leaves such calls untouched; apply acts at every size, as the published code does.",
        choices=("skip", "apply"),
    )
    controlnet: Optional[ControlNetMode] = _option(
        None,
        "choice",
        "How ControlNets of a ControlNet pipeline run while HiDiffusion acts. native (published): at the model's "
        "native size for the first controlnet_steps_ratio of the steps, their residuals resized to the U-Net's "
        "features, ignored after that; resize: at full size at every step, residuals resized to the "
        "(RAU-Net-shrunk) features. None: native for SDXL text-to-image ControlNet pipelines, resize elsewhere.",
        choices=("native", "resize"),
        optional=True,
        advanced=True,
    )
    controlnet_steps_ratio: float = _option(
        0.6,
        "float",
        "The share of the steps in which ControlNets run under controlnet native.",
        **_RATIO,
        advanced=True,
    )
    kv_downsample: int = _option(
        1,
        "int",
        "ToDo-style key/value downsampling of the top stage's self-attention and its mirror (inside the windows "
        "when window_attn is on): 1 off; 2 or 4 shrink keys and values that much per side while queries keep "
        "full resolution. Faster, slightly softer; acts where HiDiffusion acts.",
        choices=KV_FACTORS,
    )
    kv_levels: int = _option(
        1,
        "int",
        "Where kv_downsample acts: 1 the top transformer stage and its mirror; 2 also the next-lower-resolution "
        "one (unwindowed; faster still, softer). Needs kv_downsample 2 or 4.",
        choices=KV_LEVELS,
        advanced=True,
    )

    def __post_init__(self) -> None:
        self._check_kv()
        for spec in option_specs():
            spec.check(getattr(self, spec.name))
        self.check_ratios()

    def _check_kv(self) -> None:
        """The kv options' own messages (what each value means), before the generic checks."""
        if type(self.kv_downsample) is not int or self.kv_downsample not in KV_FACTORS:
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


def option_specs() -> tuple[OptionSpec, ...]:
    """One OptionSpec per HiDiffusionConfig field, in field order."""
    return _SPECS


def option_spec(name: str) -> OptionSpec:
    """The OptionSpec of the field ``name`` (KeyError naming the valid ones otherwise)."""
    for spec in _SPECS:
        if spec.name == name:
            return spec
    raise KeyError(f"no option {name!r}; options: {', '.join(s.name for s in _SPECS)}")


_SPECS: tuple[OptionSpec, ...] = tuple(
    dataclasses.replace(f.metadata[_OPTION], name=f.name) for f in fields(HiDiffusionConfig)
)
