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
from typing import Any

from ..core.architecture import Architecture, UnsupportedModelError, recognise
from ..core.ldm import read_ldm


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
    if model is None or getattr(unet, "input_blocks", None) is None or getattr(unet, "output_blocks", None) is None:
        kind = type(unet).__name__ if unet is not None else type(model_patcher).__name__
        raise UnsupportedModelError(
            f"HiDiffusion: the model ({name}, denoiser {kind}) is not a Stable Diffusion U-Net. HiDiffusion works "
            "on SD 1.x, SD 2.x and SDXL U-Nets and their fine-tunes; DiT/MMDiT models (SD3, Flux, ...) are not "
            "supported. Connect an SD 1.x/2.x/SDXL checkpoint, or bypass the HiDiffusion node."
        )
    unet_config = dict(getattr(getattr(model, "model_config", None), "unet_config", None) or {})
    network, layout = read_ldm(
        unet,
        name,
        in_channels=unet_config.get("in_channels"),
        cross_attention_dim=unet_config.get("context_dim"),
        embedding=_embedding(unet_config) if unet_config else None,
    )
    arch = recognise(network)
    v_prediction = _is_v_prediction(model)
    arch = dataclasses.replace(arch, native=_native(arch, v_prediction))

    below = arch.window_stage + 1
    deep = below < len(network.stages) and network.stages[below].cross_attention
    conv_block = layout.downsample_blocks[arch.conv_stage]
    assert conv_block is not None  # recognise() checked the conv stage downsamples
    blocks = Blocks(
        conv_block=conv_block,
        pool_block=layout.stage_blocks[arch.pool_stage][0],
        unpool_block=layout.up_blocks[arch.up_index(arch.pool_stage)][arch.unpool_layer + 1],
        windowed=layout.self_attentions(unet, arch, arch.window_stage),
        num_input_blocks=len(unet.input_blocks),
        kv_deep=layout.self_attentions(unet, arch, below) if deep else (),
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
