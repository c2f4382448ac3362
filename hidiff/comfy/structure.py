"""Read a ComfyUI model into hidiff's host-neutral description, from ComfyUI's own objects.

The network is read from the U-Net ComfyUI built (``diffusion_model.input_blocks`` /
``output_blocks``: which block holds a ResBlock, a SpatialTransformer, a Downsample or an
Upsample) and from its ``model_config.unet_config`` (context width, input channels); the
native size from the family and ComfyUI's prediction type. File names are never read.

Nothing here imports ComfyUI at module level: layers are recognised by class name and
duck typing, so this module can be imported (and tested) without ComfyUI.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

from ..core.architecture import Architecture, NetworkDescription, Stage, UnsupportedModelError, recognise


@dataclass(frozen=True)
class Blocks:
    """Where the parts of a recognised network sit in ComfyUI's block lists.

    ``input`` ids count ``diffusion_model.input_blocks`` (0 is conv_in); ``output`` ids count
    ``output_blocks``. Windowed self-attentions are listed in forward order, down path
    first, as (block kind, block id, transformer block index): the position in that list is
    the layer ordinal of :func:`hidiff.core.ops.shift_for`.
    """

    conv_block: int  # input block holding the conv stage's Downsample
    pool_block: int  # input block whose output RAU-Net pools
    unpool_block: int  # output block before which the pooled map is grown back to its skip's size
    windowed: tuple[tuple[str, int, int], ...]
    num_input_blocks: int
    # Self-attentions of the next-lower-resolution transformer stage and its mirror (kv_levels 2),
    # in the same form; empty where that stage has no transformer blocks.
    kv_deep: tuple[tuple[str, int, int], ...] = ()


@dataclass(frozen=True)
class ComfyNetwork:
    architecture: Architecture
    blocks: Blocks
    v_prediction: bool
    edm: bool = False  # EDM-parametrised (Playground v2.5-style): selects the gentle SDXL preset


def _layer_names(block: Any) -> list[str]:
    return [type(layer).__name__ for layer in block]


def _transformer_depth(block: Any) -> int:
    """Number of transformer blocks (each with one self-attention) in a block's SpatialTransformer."""
    for layer in block:
        if type(layer).__name__ in ("SpatialTransformer", "SpatialVideoTransformer"):
            return len(getattr(layer, "transformer_blocks", ()))
    return 0


def _has_cross_attention(block: Any) -> bool:
    for layer in block:
        if type(layer).__name__ == "SpatialTransformer":
            for tb in getattr(layer, "transformer_blocks", ()):
                if getattr(tb, "attn2", None) is not None and not getattr(tb, "disable_self_attn", False):
                    return True
    return False


def _is_downsample(block: Any) -> bool:
    names = _layer_names(block)
    if names != ["Downsample"]:
        return False
    op = getattr(block[0], "op", None)
    stride = getattr(op, "stride", None)
    kernel = getattr(op, "kernel_size", None)
    return stride is not None and tuple(stride) == (2, 2) and kernel is not None and tuple(kernel) == (3, 3)


def _stage(**values: Any) -> Stage:
    """A core Stage from the fields this version of the core has."""
    known = {f.name for f in dataclasses.fields(Stage)}
    return Stage(**{k: v for k, v in values.items() if k in known})


def _embedding(unet_config: dict) -> str:
    """What the time embedding takes besides the timestep (ComfyUI's ``label_emb``): a Linear stack for
    SDXL's (and unCLIP's) vector, an embedding table for class labels (the x4 upscaler's noise level)."""
    classes = unet_config.get("num_classes")
    return "" if classes is None else "vector" if classes == "sequential" else "class"


def _model_name(model_patcher: Any) -> str:
    model = getattr(model_patcher, "model", model_patcher)
    config = getattr(model, "model_config", None)
    return type(config).__name__ if config is not None else type(model).__name__


def describe(model_patcher: Any) -> ComfyNetwork:
    """The recognised network of a ComfyUI ``ModelPatcher``; raises :class:`UnsupportedModelError`."""
    model = getattr(model_patcher, "model", None)
    name = _model_name(model_patcher)
    unet = getattr(model, "diffusion_model", None)
    inputs = getattr(unet, "input_blocks", None)
    outputs = getattr(unet, "output_blocks", None)
    if model is None or unet is None or inputs is None or outputs is None:
        kind = type(unet).__name__ if unet is not None else type(model_patcher).__name__
        raise UnsupportedModelError(
            f"HiDiffusion: the model ({name}, denoiser {kind}) is not a Stable Diffusion U-Net. HiDiffusion works "
            "on SD 1.x, SD 2.x and SDXL U-Nets and their fine-tunes; DiT/MMDiT models (SD3, Flux, ...) are not "
            "supported. Connect an SD 1.x/2.x/SDXL checkpoint, or bypass the HiDiffusion node."
        )
    unet_config = dict(getattr(getattr(model, "model_config", None), "unet_config", None) or {})

    # Down path: input block 0 is conv_in; each further block is one layer (ResBlock, maybe a
    # transformer) or a stage's Downsample.
    stages: list[Stage] = []
    stage_blocks: list[list[int]] = []
    downsample_block: list[Optional[int]] = []
    current: list[int] = []
    for i in range(1, len(inputs)):
        block = inputs[i]
        if _is_downsample(block):
            stage_blocks.append(current)
            downsample_block.append(i)
            current = []
        elif "ResBlock" in _layer_names(block):
            current.append(i)
        else:
            raise UnsupportedModelError(
                f"HiDiffusion: {name}: input block {i} holds {_layer_names(block)}, which is not a layer of a "
                "Stable Diffusion U-Net (ResBlock, SpatialTransformer, 3x3 stride-2 Downsample)."
            )
    if current:
        stage_blocks.append(current)
        downsample_block.append(None)
    for k, ids in enumerate(stage_blocks):
        first = inputs[ids[0]][0] if ids else None
        plain = any(_transformer_depth(inputs[i]) and not _has_cross_attention(inputs[i]) for i in ids)
        stages.append(
            _stage(
                channels=int(getattr(first, "out_channels", 0) or 0),
                layers=len(ids),
                cross_attention=any(_has_cross_attention(inputs[i]) for i in ids),
                downsample=downsample_block[k] is not None,
                self_attention_only=plain,
                other_attention="self-attention without cross-attention" if plain else "",
            )
        )

    # Up path, deepest stage first: a stage ends with the block holding its Upsample.
    up_blocks: list[list[int]] = [[]]
    for i, block in enumerate(outputs):
        up_blocks[-1].append(i)
        if "Upsample" in _layer_names(block) and i != len(outputs) - 1:
            up_blocks.append([])
    network = NetworkDescription(
        stages=tuple(stages),
        up_layers=tuple(len(ids) for ids in up_blocks),
        up_cross_attention=tuple(any(_has_cross_attention(outputs[i]) for i in ids) for ids in up_blocks),
        in_channels=int(unet_config.get("in_channels", getattr(unet, "in_channels", 4))),
        cross_attention_dim=unet_config.get("context_dim"),
        native=None,
        name=name,
        embedding=_embedding(unet_config) if unet_config else None,
    )
    arch = recognise(network)
    v_prediction = _is_v_prediction(model)
    arch = dataclasses.replace(arch, native=_native(arch, v_prediction))

    up_pool = up_blocks[arch.up_index(arch.pool_stage)]
    windowed: list[tuple[str, int, int]] = []
    for i in stage_blocks[arch.window_stage]:
        windowed += [("input", i, j) for j in range(_transformer_depth(inputs[i]))]
    for i in up_blocks[arch.up_index(arch.window_stage)]:
        windowed += [("output", i, j) for j in range(_transformer_depth(outputs[i]))]
    deep: list[tuple[str, int, int]] = []
    below = arch.window_stage + 1
    if below < len(stages) and stages[below].cross_attention:
        for i in stage_blocks[below]:
            deep += [("input", i, j) for j in range(_transformer_depth(inputs[i]))]
        for i in up_blocks[arch.up_index(below)]:
            deep += [("output", i, j) for j in range(_transformer_depth(outputs[i]))]
    conv_block = downsample_block[arch.conv_stage]
    assert conv_block is not None  # recognise() checked the conv stage downsamples
    blocks = Blocks(
        conv_block=conv_block,
        pool_block=stage_blocks[arch.pool_stage][0],
        unpool_block=up_pool[arch.unpool_layer + 1],
        windowed=tuple(windowed),
        num_input_blocks=len(inputs),
        kv_deep=tuple(deep),
    )
    edm = getattr(getattr(model, "model_type", None), "name", "") in ("EDM", "V_PREDICTION_EDM")
    return ComfyNetwork(arch, blocks, v_prediction, edm)


def _is_v_prediction(model: Any) -> bool:
    model_type = getattr(model, "model_type", None)
    return getattr(model_type, "name", "") in ("V_PREDICTION", "V_PREDICTION_EDM")


def _native(arch: Architecture, v_prediction: bool) -> tuple[int, int]:
    """Native latent size: SD 1.x and SD 2.x base 64 (512 px), SD 2.x v-prediction 96 (768 px),
    SDXL 128 (1024 px), as each family was trained."""
    if arch.family == "sd2" and v_prediction:
        return (96, 96)
    return arch.native
