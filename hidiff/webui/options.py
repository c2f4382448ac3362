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

from ..core.config import HiDiffusionConfig, OptionSpec
from ..core.ui import UIOption, ui_option, ui_options

TITLE = "HiDiffusion"
#: The infotext key of the switch; every option's key is ``"HiDiffusion <option>"``.
ENABLE_KEY = TITLE
#: Where a WebUI user turns an option off, for the messages that name what to do.
WHERE = "in the HiDiffusion accordion"
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
    """One control of the accordion: the core's form description (:mod:`hidiff.core.ui`) in
    gradio's terms, enough to render it and to read its value back."""

    name: str
    widget: str  # "checkbox", "dropdown", "slider" or "number"
    default: Any
    tooltip: str
    ui: UIOption
    choices: Optional[tuple[str, ...]] = None
    minimum: Optional[float] = None
    maximum: Optional[float] = None
    step: Optional[float] = None

    @property
    def spec(self) -> OptionSpec:
        return self.ui.spec

    @property
    def label(self) -> str:
        return self.name

    @property
    def infotext_key(self) -> str:
        return f"{TITLE} {self.name}"

    def to_library(self, value: Any) -> Any:
        """The HiDiffusionConfig value of the control's ``value`` (ValueError naming the option)."""
        return self.ui.to_library(value)

    def to_control(self, value: Any) -> Any:
        """The control's value for the library value ``value`` (the inverse of :meth:`to_library`)."""
        return self.ui.to_widget(value)


def _control(ui: UIOption) -> Control:
    tooltip = ui.spec.help + (f" Here: {ui.special}." if ui.special else "")
    if ui.kind != "number":
        return Control(ui.name, ui.kind, ui.default, tooltip, ui, choices=ui.choices)
    if ui.spec.optional:  # a number box: -1 for None lies outside a slider's range
        return Control(ui.name, "number", ui.default, tooltip, ui)
    return Control(ui.name, "slider", ui.default, tooltip, ui, minimum=ui.minimum, maximum=ui.maximum, step=ui.step)


def controls() -> tuple[Control, ...]:
    """Every library option a WebUI user sets, in :data:`CONTROL_ORDER` (API argument order after ``enable``)."""
    return tuple(_control(ui) for ui in ui_options(CONTROL_ORDER, NOT_OFFERED))


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


#: The accordion's switch: not a library option, read with the same rules as one.
_ENABLE = _control(ui_option(OptionSpec("enable", "bool", False, "Run HiDiffusion on this generation.")))


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
