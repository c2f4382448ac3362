"""The HiDiffusion node's inputs, made from the library's option specs, and its V1 node class.

The node's widgets are built from :func:`hidiff.core.config.option_specs` (kind, default,
range, help text, the "advanced" hint), so a new library option becomes a new input with
no edit here. Two renderings use the one description: the V3 node (``hidiff.comfy.v3``,
what ComfyUI 0.3.4x and newer load through ``comfy_entrypoint``) and the V1 class below
(``INPUT_TYPES``; loaded only by a ComfyUI without the V3 API).

Saved workflows keep loading: the node id (``HiDiffusion``), the input names, their order
(UI-format workflows store widget values by position) and the widget encodings (-1 for
"the library decides" on numbers, "auto"/"on"/"off" for an optional switch, strings for
fixed integer choices) are the ones the node has always had; options added later are
appended after them.

Importing this module needs torch (which ComfyUI has) but not ComfyUI itself.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Optional

from ..core.config import HiDiffusionConfig, OptionSpec
from ..core.ui import UIOption, ui_options

#: The node's inputs in the order saved workflows store them; later options follow.
WIDGET_ORDER = (
    "raunet",
    "window_attn",
    "preset",
    "t1_ratio",
    "t2_ratio",
    "aggressive",
    "aggressive_step_ratio",
    "window_shift",
    "window_seed",
    "kv_downsample",
    "kv_levels",
    "at_native",
)
#: Library options the node does not offer: ComfyUI runs ControlNets in its own nodes, and
#: the node always resizes their residuals (see docs/comfyui.md).
NOT_OFFERED = ("controlnet", "controlnet_steps_ratio")
#: Where ComfyUI's own nodes of each kind live in menus that predate the detection below.
FALLBACK_CATEGORIES = {"model_patch": "model_patches/unet", "sampler": "sampling/custom_sampling/samplers"}

DISPLAY_NAME = "HiDiffusion (RAU-Net + MSW-MSA)"
DESCRIPTION = (
    "HiDiffusion (RAU-Net + MSW-MSA): generate above the model's native resolution without duplicated "
    "objects, and faster. Put it between the model loader (and LoRAs) and the sampler."
)
MODEL_TOOLTIP = "An SD 1.x, SD 2.x or SDXL model (fine-tunes, LoRAs and few-step models included)."
OUTPUT_TOOLTIP = "The model with HiDiffusion (a patched copy; the input model is unchanged)."


@dataclass(frozen=True)
class Widget:
    """One input of the node: the core's form description (:mod:`hidiff.core.ui`) in ComfyUI's
    terms, enough to render it as V1 or V3 and to read it back."""

    name: str
    io: str  # "BOOLEAN", "FLOAT", "INT" or "COMBO"
    default: Any
    tooltip: str
    ui: UIOption
    options: Optional[tuple[str, ...]] = None
    minimum: Optional[float] = None
    maximum: Optional[float] = None
    step: Optional[float] = None

    @property
    def spec(self) -> OptionSpec:
        return self.ui.spec

    @property
    def advanced(self) -> bool:
        return self.spec.advanced

    def to_library(self, value: Any) -> Any:
        """The HiDiffusionConfig value of this widget's ``value``."""
        return self.ui.to_library(value)


def _widget(ui: UIOption) -> Widget:
    io = {"checkbox": "BOOLEAN", "dropdown": "COMBO"}.get(ui.kind) or ("INT" if ui.whole else "FLOAT")
    tooltip = ui.spec.help + (f" Here: {ui.special}." if ui.special else "")
    return Widget(ui.name, io, ui.default, tooltip, ui, ui.choices, ui.minimum, ui.maximum, ui.step)


def widgets() -> tuple[Widget, ...]:
    """The node's widgets (every library option a ComfyUI user sets), in saved-workflow order."""
    return tuple(_widget(ui) for ui in ui_options(WIDGET_ORDER, NOT_OFFERED))


def widget_defaults() -> dict[str, Any]:
    """Every widget at its default (the library's defaults), by name, in order."""
    return {w.name: w.default for w in widgets()}


def config_from_widgets(**values: Any) -> HiDiffusionConfig:
    """The library's config from the node's widget values (missing ones at their defaults)."""
    known = {w.name: w for w in widgets()}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise TypeError(f"unknown HiDiffusion input(s) {', '.join(unknown)}; inputs: {', '.join(known)}")
    options = {name: w.to_library(values.get(name, w.default)) for name, w in known.items()}
    return HiDiffusionConfig.from_options(**options)


def core_category(kind: str) -> str:
    """The menu category where the running ComfyUI puts its own nodes of ``kind``.

    ``model_patch``: FreeU_V2's (``model_patches/unet`` in 0.3.75, ``model/patch/unet`` in
    0.33); ``sampler``: KSamplerSelect's (``sampling/custom_sampling/samplers``,
    ``model/sampling/samplers``). Read from the nodes themselves, never from a version number.
    """
    module, name = {
        "model_patch": ("comfy_extras.nodes_freelunch", "FreeU_V2"),
        "sampler": ("comfy_extras.nodes_custom_sampler", "KSamplerSelect"),
    }[kind]
    try:
        node = getattr(importlib.import_module(module), name)
        category = node.GET_SCHEMA().category if hasattr(node, "GET_SCHEMA") else node.CATEGORY
    except Exception:  # ComfyUI missing (docs, generator) or a tree without the node
        return FALLBACK_CATEGORIES[kind]
    return category if isinstance(category, str) and category else FALLBACK_CATEGORIES[kind]


def apply_node(model: Any, **values: Any) -> Any:
    """What the node does: a patched clone of ``model``; errors say they come from HiDiffusion."""
    from .patch import apply_hidiffusion

    try:
        return apply_hidiffusion(model, config=config_from_widgets(**values))
    except (TypeError, ValueError, RuntimeError) as e:
        # ComfyUI shows the exception text as the node's error: say who is talking.
        text = str(e)
        if text.startswith("HiDiffusion"):
            raise
        try:
            error = type(e)(f"HiDiffusion: {text}")
        except Exception:  # an exception type that takes other arguments
            raise e from None
        raise error from e


def _v1_input(w: Widget) -> tuple:
    extra: dict[str, Any] = {"default": w.default, "tooltip": w.tooltip}
    for key, value in (("min", w.minimum), ("max", w.maximum), ("step", w.step)):
        if value is not None:
            extra[key] = value
    if w.advanced:
        extra["advanced"] = True
    return (list(w.options), extra) if w.io == "COMBO" else (w.io, extra)


class HiDiffusion:
    """The node in ComfyUI's V1 form (a ComfyUI without ``comfy_api.latest`` loads this one).

    Higher-resolution images from SD 1.x / 2.x / SDXL without duplicated objects (RAU-Net + MSW-MSA).
    """

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        required: dict[str, Any] = {"model": ("MODEL", {"tooltip": MODEL_TOOLTIP})}
        required.update((w.name, _v1_input(w)) for w in widgets())
        return {"required": required}

    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = (OUTPUT_TOOLTIP,)
    FUNCTION = "apply"
    CATEGORY = FALLBACK_CATEGORIES["model_patch"]
    DESCRIPTION = DESCRIPTION

    def apply(self, model: Any, **values: Any) -> tuple:
        return (apply_node(model, **values),)


from .samplers import SamplerDDIMCFGpp  # noqa: E402

NODE_CLASS_MAPPINGS = {"HiDiffusion": HiDiffusion, "HiDiffSamplerDDIMCFGpp": SamplerDDIMCFGpp}
NODE_DISPLAY_NAME_MAPPINGS = {
    "HiDiffusion": DISPLAY_NAME,
    "HiDiffSamplerDDIMCFGpp": "SamplerDDIM CFG++ (hidiff)",
}
