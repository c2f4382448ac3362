"""Read a WebUI's U-Net (the original "ldm" layout) into hidiff's host-neutral description.

All three WebUIs run U-Nets in the layout of the original Stable Diffusion code:
``input_blocks`` / ``middle_block`` / ``output_blocks`` of ``ResBlock``,
``SpatialTransformer``, ``Downsample`` and ``Upsample`` layers (AUTOMATIC1111: ldm's
``UNetModel``; Forge: ``backend.nn.unet``; reForge: ComfyUI's ``openaimodel`` under
``ldm_patched``). Layers are recognised by class name and structure only, so this module
imports no WebUI and the family comes from the network, never from a file name.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ..core.architecture import Architecture, UnsupportedModelError, recognise
from ..core.ldm import context_width, read_ldm

NOT_A_UNET = (
    "HiDiffusion is for Stable Diffusion U-Nets (SD 1.x, SD 2.x, SDXL and their fine-tunes); the loaded model "
    "({what}) is not one (SD3, Flux and other transformer models are not supported). The image is generated "
    "without HiDiffusion: load an SD 1.x/2.x/SDXL checkpoint or turn HiDiffusion off."
)


@dataclass(frozen=True)
class LdmNetwork:
    """A recognised U-Net and where HiDiffusion's parts sit in its block lists."""

    architecture: Architecture
    conv_block: int  # input block holding the conv stage's Downsample
    pool_block: int  # input block whose output RAU-Net pools
    unpool_block: int  # output block whose output is grown back to the pooled map's size
    #: (kind, block, transformer index, down stage) of every self-attention HiDiffusion may act
    #: on, in forward order, down path first: the window stage and its mirror first, then (for
    #: kv_levels 2) the next stage and its mirror. The position in this list is the layer ordinal.
    attentions: tuple[tuple[str, int, int, int], ...]
    upsample_blocks: tuple[tuple[int, int], ...]  # (output block holding an Upsample, down stage it mirrors)
    downsample_blocks: tuple[tuple[int, int], ...] = ()  # (input block holding a Downsample, its down stage)
    v_prediction: bool = False


def describe(unet: Any, v_prediction: bool = False, name: str = "") -> LdmNetwork:
    """The recognised network of an ldm-layout U-Net module; raises :class:`UnsupportedModelError`."""
    if getattr(unet, "input_blocks", None) is None or getattr(unet, "output_blocks", None) is None:
        raise UnsupportedModelError(NOT_A_UNET.format(what=name or type(unet).__name__))
    label_emb = getattr(unet, "label_emb", None)
    embedding = "" if label_emb is None else ("vector" if type(label_emb).__name__ == "Sequential" else "class")
    network, layout = read_ldm(
        unet,
        name or type(unet).__name__,
        in_channels=None,
        cross_attention_dim=context_width(unet),
        embedding=embedding,
        advice=" " + NOT_A_UNET.format(what=name or type(unet).__name__),
    )
    arch = recognise(network)
    if arch.family == "sd2" and v_prediction:
        arch = dataclasses.replace(arch, native=(96, 96))

    attentions: list[tuple[str, int, int, int]] = []
    for stage in (arch.window_stage, arch.window_stage + 1):
        if stage < len(network.stages) and network.stages[stage].cross_attention:
            attentions += [(*layer, stage) for layer in layout.self_attentions(unet, arch, stage)]
    # The output block ending each up stage holds its Upsample; up stage k + 1 mirrors down stage k + 1
    # and lands on down stage k's skip.
    upsamples = tuple((layout.up_blocks[arch.up_index(k + 1)][-1], k) for k in range(arch.num_stages - 1))
    conv_block = layout.downsample_blocks[arch.conv_stage]
    if conv_block is None:  # recognise() checked the conv stage downsamples
        raise UnsupportedModelError(f"HiDiffusion: stage {arch.conv_stage} of {network.name} has no downsampler")
    return LdmNetwork(
        architecture=arch,
        conv_block=conv_block,
        pool_block=layout.stage_blocks[arch.pool_stage][0],
        unpool_block=layout.up_blocks[arch.up_index(arch.pool_stage)][arch.unpool_layer],
        attentions=tuple(attentions),
        upsample_blocks=upsamples,
        downsample_blocks=tuple((block, k) for k, block in enumerate(layout.downsample_blocks) if block is not None),
        v_prediction=v_prediction,
    )
