"""hidiff's ComfyUI nodes in ComfyUI's V3 schema (``comfy_api.latest``), registered through
``comfy_entrypoint`` (the repository's root ``__init__.py`` hands ComfyUI :func:`comfy_entrypoint`).

The inputs come from :func:`hidiff.comfy.nodes.widgets` (the library's option specs): typed
inputs with the specs' help as tooltips, ranges and defaults, and the options the specs mark
advanced passed as ``advanced=True`` where this ComfyUI's inputs take it (0.33 groups them
under the node's advanced inputs, as its own nodes do; 0.3.75's inputs have no such flag).
Menu categories are the running ComfyUI's own (:func:`hidiff.comfy.nodes.core_category`).

Node ids and input names are the V1 node's, so saved workflows load unchanged.
"""

from __future__ import annotations

import inspect
from typing import Any

from comfy_api.latest import ComfyExtension, io

from . import nodes as _nodes
from .samplers import DDIM_CFGPP_DESCRIPTION, DDIM_CFGPP_TOOLTIP, ddim_cfgpp_sampler

_IO_TYPES = {"BOOLEAN": io.Boolean, "FLOAT": io.Float, "INT": io.Int, "COMBO": io.Combo}


def takes_advanced(input_class: Any) -> bool:
    """Whether this ComfyUI's V3 input class takes ``advanced`` (the grouping flag)."""
    try:
        return "advanced" in inspect.signature(input_class.__init__).parameters
    except (TypeError, ValueError):
        return False


def v3_input(w: _nodes.Widget) -> Any:
    """The V3 input of one widget."""
    cls = _IO_TYPES[w.io].Input
    kwargs: dict[str, Any] = {"default": w.default, "tooltip": w.tooltip}
    if w.io == "COMBO":
        kwargs["options"] = list(w.options or ())
    else:
        for key, value in (("min", w.minimum), ("max", w.maximum), ("step", w.step)):
            if value is not None:
                kwargs[key] = value
    if w.advanced and takes_advanced(cls):
        kwargs["advanced"] = True
    return cls(w.name, **kwargs)


class HiDiffusion(io.ComfyNode):
    """Higher-resolution images from SD 1.x / 2.x / SDXL without duplicated objects (RAU-Net + MSW-MSA)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="HiDiffusion",
            display_name=_nodes.DISPLAY_NAME,
            category=_nodes.core_category("model_patch"),
            description=_nodes.DESCRIPTION,
            inputs=[io.Model.Input("model", tooltip=_nodes.MODEL_TOOLTIP), *map(v3_input, _nodes.widgets())],
            outputs=[io.Model.Output(tooltip=_nodes.OUTPUT_TOOLTIP)],
        )

    @classmethod
    def execute(cls, model: Any, **values: Any) -> io.NodeOutput:
        return io.NodeOutput(_nodes.apply_node(model, **values))


class SamplerDDIMCFGpp(io.ComfyNode):
    """DDIM with CFG++ as a SAMPLER for SamplerCustom / SamplerCustomAdvanced."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="HiDiffSamplerDDIMCFGpp",
            display_name=_nodes.NODE_DISPLAY_NAME_MAPPINGS["HiDiffSamplerDDIMCFGpp"],
            category=_nodes.core_category("sampler"),
            description=DDIM_CFGPP_DESCRIPTION,
            inputs=[],
            outputs=[io.Sampler.Output(tooltip=DDIM_CFGPP_TOOLTIP)],
        )

    @classmethod
    def execute(cls) -> io.NodeOutput:
        return io.NodeOutput(ddim_cfgpp_sampler())


class HiDiffExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [HiDiffusion, SamplerDDIMCFGpp]


async def comfy_entrypoint() -> HiDiffExtension:
    return HiDiffExtension()
