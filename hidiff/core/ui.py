"""How a host's form shows the library's options: one widget per option and the two-way
mapping between a widget's values and the library's.

Every host with a form (the ComfyUI node, the WebUI accordion) renders these descriptions in
its own toolkit, so the encodings are written once and saved workflows, infotexts and API
calls mean the same in every host:

* a switch (``raunet``): a checkbox; text such as ``"true"``/``"off"`` (an infotext) is read too;
* a switch that may be None (``aggressive``): a dropdown ``auto`` / ``on`` / ``off``;
* an option with choices: a dropdown of the choices as text, the option's none label
  (``auto``) first where None is allowed;
* a number: its range and step; where None is allowed, :data:`UNSET` (-1) stands for None.

Torch-free, like :mod:`hidiff.core.config`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Optional

from .config import OptionSpec, option_specs

#: What a dropdown for a switch that may be None shows for None / True / False.
SWITCH: dict[str, Optional[bool]] = {"auto": None, "on": True, "off": False}
#: A number widget's value for None (the library decides).
UNSET = -1

WidgetKind = Literal["checkbox", "dropdown", "number"]


@dataclass(frozen=True)
class UIOption:
    """One option as a form shows it; ``to_library`` / ``to_widget`` convert its values."""

    spec: OptionSpec
    kind: WidgetKind
    default: Any  # the library's default as a widget value
    special: str  # what the widget's special values mean, for its tooltip ("" where none)
    choices: Optional[tuple[str, ...]] = None  # dropdowns
    minimum: Optional[float] = None  # numbers (UNSET where None is allowed)
    maximum: Optional[float] = None
    step: Optional[float] = None

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def whole(self) -> bool:
        """A number widget that takes whole numbers."""
        return self.spec.kind == "int"

    def to_library(self, value: Any) -> Any:
        """The HiDiffusionConfig value of the widget value ``value``; ValueError naming the option."""
        try:
            return self._decode(value)
        except (TypeError, ValueError) as e:
            raise ValueError(
                f"HiDiffusion option {self.name}: {value!r} is not valid: it must be {self.accepted()}"
            ) from e

    def to_widget(self, value: Any) -> Any:
        """The widget value of the library value ``value`` (the inverse of :meth:`to_library`)."""
        spec = self.spec
        if self.kind == "checkbox":
            return bool(value)
        if self.kind == "dropdown":
            if spec.kind == "bool":
                return next(label for label, v in SWITCH.items() if v == value)
            return spec.none_label if value is None else str(value)
        if value is None:
            return UNSET
        return int(value) if self.whole else float(value)

    def accepted(self) -> str:
        """The widget values this option takes, in words."""
        if self.kind == "dropdown":
            return f"one of {', '.join(self.choices or ())}"
        if self.kind == "checkbox":
            return "true or false"
        text = "a whole number" if self.whole else "a number"
        return text + (f" ({UNSET} for {self.spec.none_label})" if self.spec.optional else "")

    def _decode(self, value: Any) -> Any:
        spec = self.spec
        if self.kind == "checkbox":
            return parse_bool(value) if isinstance(value, str) else bool(value)
        if self.kind == "dropdown":
            text = str(value)
            if spec.kind == "bool":
                if text not in SWITCH:
                    raise ValueError(text)
                return SWITCH[text]
            if spec.optional and text == spec.none_label:
                return None
            allowed = [str(c) for c in spec.choices or ()]
            if text not in allowed:
                raise ValueError(text)
            return (spec.choices or ())[allowed.index(text)]
        if value is None or value == "":
            return None if spec.optional else spec.default
        number: float = whole_number(value) if self.whole else float(value)
        return None if spec.optional and number < 0 else number


def ui_option(spec: OptionSpec) -> UIOption:
    """The widget of one option (the module docstring gives the encodings)."""
    if spec.kind == "bool" and spec.optional:
        default = next(label for label, v in SWITCH.items() if v == spec.default)
        return UIOption(spec, "dropdown", default, "auto is None, on is True, off is False", choices=tuple(SWITCH))
    if spec.kind == "bool":
        return UIOption(spec, "checkbox", bool(spec.default), "")
    if spec.choices is not None:
        choices = tuple(str(c) for c in spec.choices)
        special = ""
        if spec.optional:
            special, choices = f"{spec.none_label} is None", (spec.none_label, *choices)
        label = spec.none_label if spec.default is None else str(spec.default)
        return UIOption(spec, "dropdown", label, special, choices=choices)
    cast = int if spec.kind == "int" else float
    minimum, number, special = spec.minimum, spec.default, ""
    if spec.optional:
        minimum, special = UNSET, f"{UNSET} is None"
        number = UNSET if spec.default is None else spec.default
    return UIOption(
        spec,
        "number",
        cast(number),
        special,
        minimum=None if minimum is None else cast(minimum),
        maximum=None if spec.maximum is None else cast(spec.maximum),
        step=spec.step,
    )


def ui_options(first: Sequence[str], leave_out: Sequence[str] = ()) -> tuple[UIOption, ...]:
    """Every option a form offers: those named in ``first`` in that order, then the rest in field
    order (so an option added to the library is appended), without those in ``leave_out``."""
    specs = {s.name: s for s in option_specs() if s.name not in leave_out}
    order = [n for n in first if n in specs] + [n for n in specs if n not in first]
    return tuple(ui_option(specs[n]) for n in order)


def whole_number(value: Any) -> int:
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


def parse_bool(text: str) -> bool:
    """A switch's value from text, as an infotext or a form writes it."""
    lowered = text.strip().lower()
    if lowered in ("true", "on", "yes", "1"):
        return True
    if lowered in ("false", "off", "no", "0"):
        return False
    raise ValueError("true or false")
