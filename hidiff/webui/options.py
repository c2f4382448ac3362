"""The WebUI script's controls, API arguments and infotext, made from the library's options.

Torch-free and gradio-free: the script (``scripts/hidiffusion.py``) renders these
:class:`Control` objects with gradio, and the API, the infotext and the X/Y/Z plot read
and write values through the functions here, so the tests can check the round trip
without a WebUI.

Encodings (the same as the ComfyUI node's): an optional switch (``aggressive``) is a
dropdown ``auto`` / ``on`` / ``off``; an option with choices is a dropdown, ``auto`` (the
option's none label) standing for None where None is allowed; an optional number is -1 for
None. The API's ``alwayson_scripts`` arguments are positional: ``enable`` first, then the
controls in :data:`CONTROL_ORDER` order (:func:`api_args` writes them).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional

from ..core.config import HiDiffusionConfig, OptionSpec, option_specs

TITLE = "HiDiffusion"
#: The infotext key of the switch; every option's key is ``"HiDiffusion <option>"``.
ENABLE_KEY = TITLE
UNSET = -1
SWITCH = {"auto": None, "on": True, "off": False}
#: Options a WebUI user does not set: the WebUIs run ControlNets in their own extensions, and
#: their residuals are always resized to the U-Net's features here (see docs/webui.md).
NOT_OFFERED = ("controlnet", "controlnet_steps_ratio")
#: The main options first (the accordion's first row and the API's first arguments).
CONTROL_ORDER = (
    "raunet",
    "window_attn",
    "preset",
    "at_native",
    "kv_downsample",
    "t1_ratio",
    "t2_ratio",
    "aggressive",
    "aggressive_step_ratio",
    "window_shift",
    "window_seed",
    "kv_levels",
)


@dataclass(frozen=True)
class Control:
    """One control of the accordion: enough to render it and to read its value back."""

    name: str
    widget: str  # "checkbox", "dropdown", "slider" or "number"
    default: Any
    tooltip: str
    spec: OptionSpec
    choices: Optional[tuple[str, ...]] = None
    minimum: Optional[float] = None
    maximum: Optional[float] = None
    step: Optional[float] = None

    @property
    def label(self) -> str:
        return self.name

    @property
    def infotext_key(self) -> str:
        return f"{TITLE} {self.name}"

    def to_library(self, value: Any) -> Any:
        """The HiDiffusionConfig value of the control's ``value`` (ValueError naming the option)."""
        spec = self.spec
        try:
            if self.widget == "checkbox":
                if isinstance(value, str):
                    return _parse_bool(value)
                return bool(value)
            if self.widget == "dropdown":
                text = str(value)
                if spec.kind == "bool":
                    if text not in SWITCH:
                        raise ValueError(f"one of {', '.join(SWITCH)}")
                    return SWITCH[text]
                if spec.optional and text == spec.none_label:
                    return None
                allowed = [str(c) for c in spec.choices or ()]
                if text not in allowed:
                    raise ValueError(f"one of {', '.join(self.choices or ())}")
                return spec.choices[allowed.index(text)] if spec.choices else text
            if value is None or value == "":
                return None if spec.optional else spec.default
            if spec.kind == "int":
                whole = _whole(value)
                return None if spec.optional and whole < 0 else whole
            number = float(value)
            return None if spec.optional and number < 0 else number
        except (TypeError, ValueError) as e:
            raise ValueError(
                f"HiDiffusion option {self.name}: {value!r} is not valid: it must be {_what(self, e)}"
            ) from e

    def to_control(self, value: Any) -> Any:
        """The control's value for the library value ``value`` (the inverse of :meth:`to_library`)."""
        spec = self.spec
        if self.widget == "checkbox":
            return bool(value)
        if self.widget == "dropdown":
            if spec.kind == "bool":
                return next(label for label, v in SWITCH.items() if v == value)
            return spec.none_label if value is None else str(value)
        if value is None:
            return UNSET
        return int(value) if spec.kind == "int" else float(value)


def _what(control: Control, error: Exception) -> str:
    if control.widget == "dropdown":
        return f"one of {', '.join(control.choices or ())}"
    if control.widget == "checkbox":
        return "true or false"
    text = "a whole number" if control.spec.kind == "int" else "a number"
    if control.spec.optional:
        text += f" ({UNSET} for {control.spec.none_label})"
    return text


def _whole(value: Any) -> int:
    """An int from an int, a whole float or their text (exact for seeds above 2**53 given as ints)."""
    if isinstance(value, bool):
        raise ValueError("a whole number")
    if isinstance(value, int):
        return value
    text = str(value).strip()
    try:
        return int(text)
    except ValueError:
        number = float(text)
        if number != int(number):
            raise ValueError("a whole number") from None
        return int(number)


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("true", "on", "yes", "1"):
        return True
    if lowered in ("false", "off", "no", "0"):
        return False
    raise ValueError("true or false")


def _control(spec: OptionSpec) -> Control:
    tooltip = spec.help
    if spec.kind == "bool" and spec.optional:
        default = next(label for label, v in SWITCH.items() if v == spec.default)
        return Control(spec.name, "dropdown", default, tooltip + " auto: None.", spec, choices=tuple(SWITCH))
    if spec.kind == "bool":
        return Control(spec.name, "checkbox", bool(spec.default), tooltip, spec)
    if spec.choices is not None:
        choices = tuple(str(c) for c in spec.choices)
        if spec.optional:
            tooltip += f" {spec.none_label}: None."
            choices = (spec.none_label, *choices)
        default = spec.none_label if spec.default is None else str(spec.default)
        return Control(spec.name, "dropdown", default, tooltip, spec, choices=choices)
    cast = int if spec.kind == "int" else float
    if spec.optional:
        default = UNSET if spec.default is None else cast(spec.default)
        return Control(spec.name, "number", default, tooltip + f" {UNSET}: None ({spec.none_label}).", spec)
    return Control(
        spec.name,
        "slider",
        cast(spec.default),
        tooltip,
        spec,
        minimum=spec.minimum,
        maximum=spec.maximum,
        step=spec.step,
    )


def controls() -> tuple[Control, ...]:
    """Every library option a WebUI user sets, in :data:`CONTROL_ORDER` (API argument order after ``enable``)."""
    specs = {s.name: s for s in option_specs() if s.name not in NOT_OFFERED}
    order = [n for n in CONTROL_ORDER if n in specs] + [n for n in specs if n not in CONTROL_ORDER]
    return tuple(_control(specs[n]) for n in order)


def api_args(enable: bool = True, **options: Any) -> list[Any]:
    """The ``alwayson_scripts`` ``args`` list for ``options`` (library values; unset ones keep their defaults)."""
    known = {c.name: c for c in controls()}
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise TypeError(f"unknown HiDiffusion option(s) {', '.join(unknown)}; options: {', '.join(known)}")
    return [bool(enable)] + [c.to_control(options[c.name]) if c.name in options else c.default for c in known.values()]


@dataclass(frozen=True)
class Settings:
    """What the script's arguments say: on or off, and the config when on."""

    enable: bool
    config: Optional[HiDiffusionConfig]
    options: dict[str, Any]  # the library values of the options that differ from the defaults


def read_args(args: Sequence[Any]) -> Settings:
    """The settings of the script's positional ``args`` (UI values or the API's), validated.

    Missing trailing arguments keep their defaults; a bad value raises ValueError naming the
    option and what it accepts; so does a config the library refuses (T2 above T1 ...).
    """
    items = list(args)
    enable = Control.to_library(_ENABLE, items[0]) if items else False
    values: dict[str, Any] = {}
    for i, control in enumerate(controls()):
        raw = items[i + 1] if i + 1 < len(items) else control.default
        values[control.name] = control.to_library(raw)
    if not enable:
        return Settings(False, None, {})
    try:
        config = HiDiffusionConfig(**values)
    except (TypeError, ValueError) as e:
        raise ValueError(f"HiDiffusion: {e}") from e
    defaults = HiDiffusionConfig()
    changed = {k: v for k, v in values.items() if getattr(defaults, k) != v}
    return Settings(True, config, changed)


_ENABLE = Control("enable", "checkbox", False, "Run HiDiffusion on this generation.", option_specs()[0])


def infotext(settings: Settings) -> dict[str, Any]:
    """The ``extra_generation_params`` entries of ``settings``: the switch and each non-default option."""
    if not settings.enable:
        return {}
    by_name = {c.name: c for c in controls()}
    params: dict[str, Any] = {ENABLE_KEY: True}
    for name, value in settings.options.items():
        params[by_name[name].infotext_key] = by_name[name].to_control(value)
    return params


def from_infotext(params: Mapping[str, Any]) -> list[Any]:
    """The script's arguments restored from a parsed infotext (PNG Info -> Send to txt2img).

    Options absent from the infotext take their defaults (the infotext holds only those that
    differ); no ``HiDiffusion`` key means HiDiffusion was off.
    """
    enable = _ENABLE.to_library(params.get(ENABLE_KEY, False))
    out: list[Any] = [enable]
    for control in controls():
        raw = params.get(control.infotext_key)
        out.append(control.default if raw is None else control.to_control(control.to_library(raw)))
    return out


def paste_value(control: Optional[Control]) -> Any:
    """A function for ``infotext_fields``: parsed infotext -> the control's value."""

    def read(params: Mapping[str, Any]) -> Any:
        values = from_infotext(params)
        if control is None:
            return values[0]
        return values[1 + [c.name for c in controls()].index(control.name)]

    return read
