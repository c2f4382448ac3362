"""Random-weight ComfyUI models for tests and benchmarks, built with ComfyUI's own classes.

One home for the U-Net configs of the layouts hidiff supports (at any width), the seeded
weight fill and the ModelPatcher builder, used by the ComfyUI tests, the test node pack
the real-server tests load, and ``hidiff.app.comfy_bench``. ComfyUI is imported inside the
functions only, so importing this module needs nothing but torch.
"""

from __future__ import annotations

import copy
import inspect
import math
from typing import Any, Optional

import torch

#: Width and text-context size of the tiny test models (SD 1.5 itself: 320 and 768).
TINY = {"model_channels": 32, "context_dim": 64}

_COMMON = {
    "use_checkpoint": False,
    "image_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "transformer_depth_middle": 1,
    "use_spatial_transformer": True,
    "legacy": False,
    "use_temporal_resblock": False,
    "use_temporal_attention": False,
}

#: Each layout's block structure as ComfyUI's UNetModel spells it; width and context come from TINY or the caller.
LAYOUTS: dict[str, dict[str, Any]] = {
    # 4 levels, attention on the first three, conv proj_in, 8 heads
    "sd15": {
        "num_res_blocks": [2, 2, 2, 2],
        "channel_mult": [1, 2, 2, 2],
        "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
        "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
        "use_linear_in_transformer": False,
        "adm_in_channels": None,
        "num_heads": 8,
        "num_head_channels": -1,
    },
    # 3 levels, attention on the last two, linear proj_in, 64 channels per head, the 2816-wide adm input
    "sdxl": {
        "num_res_blocks": [2, 2, 2],
        "channel_mult": [1, 2, 2],
        "transformer_depth": [0, 0, 1, 1, 1, 1],
        "transformer_depth_output": [0, 0, 0, 1, 1, 1, 1, 1, 1],
        "use_linear_in_transformer": True,
        "adm_in_channels": 2816,
        "num_classes": "sequential",
        "num_heads": -1,
        "num_head_channels": 64,
    },
}
# 4 levels with cross-attention in the middle two, linear proj_in, the 2560-wide adm input (pooled text + sizes + score)
LAYOUTS["sdxl-refiner"] = {
    **LAYOUTS["sd15"],
    "transformer_depth": [0, 0, 1, 1, 1, 1, 0, 0],
    "transformer_depth_output": [0, 0, 0, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    "use_linear_in_transformer": True,
    "adm_in_channels": 2560,
    "num_classes": "sequential",
    "num_heads": -1,
    "num_head_channels": 64,
}


def unet_config(layout: str, **overrides: Any) -> dict[str, Any]:
    """A ComfyUI UNetModel config of ``layout`` ("sd15" or "sdxl"), tiny unless ``overrides`` say otherwise."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose from {', '.join(LAYOUTS)}")
    return {**_COMMON, **TINY, **copy.deepcopy(LAYOUTS[layout]), **overrides}


def seed_weights(module: torch.nn.Module, seed: int) -> None:
    """ComfyUI builds models uninitialised: fill every parameter from a seeded generator.

    Matrices get fan-in-scaled normals (activations keep their size through the net), norm
    weights stay near one and biases near zero, so random models give finite, varied outputs.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.numel() == 0:
                continue
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel()))
            elif name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))


def accepted(config: dict[str, Any]) -> dict[str, Any]:
    """The keys of ``config`` this ComfyUI's UNetModel takes (older trees take fewer)."""
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    params = inspect.signature(UNetModel.__init__).parameters
    return {k: v for k, v in config.items() if k in params}


def model_class(family: str) -> Any:
    """ComfyUI's supported-model class of ``family`` ("sd15", "sd2", "sdxl" or "sdxl-refiner")."""
    import comfy.supported_models as sm

    return {"sd15": sm.SD15, "sd2": sm.SD20, "sdxl": sm.SDXL, "sdxl-refiner": sm.SDXLRefiner}[family]


def build_patcher(family: str, config: dict[str, Any], seed: int = 0, model_type: Optional[str] = None) -> Any:
    """(ModelPatcher, unet_config) of a random model of ``family`` with ``config``, weights from ``seed``, on the CPU.

    ``model_type`` (a ``comfy.model_base.ModelType`` name such as "V_PREDICTION") overrides the
    family's default prediction type.
    """
    import comfy.model_base
    import comfy.model_patcher

    supported = model_class(family)(accepted(copy.deepcopy(config)))
    supported.set_inference_dtype(torch.float32, None)
    cpu = torch.device("cpu")
    if model_type is None:
        model = supported.get_model({}, "", device=cpu)
    else:
        cls = {"sdxl": comfy.model_base.SDXL, "sdxl-refiner": comfy.model_base.SDXLRefiner}.get(
            family, comfy.model_base.BaseModel
        )
        model = cls(supported, model_type=getattr(comfy.model_base.ModelType, model_type), device=cpu)
    seed_weights(model.diffusion_model, seed)
    model.eval()
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu), supported.unet_config
