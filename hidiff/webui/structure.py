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
from typing import Any, Optional

from ..core.architecture import Architecture, NetworkDescription, Stage, UnsupportedModelError, recognise

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


def _names(block: Any) -> list[str]:
    return [type(layer).__name__ for layer in block]


def _transformers(block: Any) -> list[Any]:
    return [layer for layer in block if type(layer).__name__ in ("SpatialTransformer", "SpatialVideoTransformer")]


def _depth(block: Any) -> int:
    return sum(len(getattr(t, "transformer_blocks", ())) for t in _transformers(block))


def _cross(block: Any) -> bool:
    for t in _transformers(block):
        for tb in getattr(t, "transformer_blocks", ()):
            if getattr(tb, "attn2", None) is not None and not getattr(tb, "disable_self_attn", False):
                return True
    return False


def _is_downsample(block: Any) -> bool:
    if _names(block) != ["Downsample"]:
        return False
    op = getattr(block[0], "op", None)
    return tuple(getattr(op, "stride", ()) or ()) == (2, 2) and tuple(getattr(op, "kernel_size", ()) or ()) == (3, 3)


def _context_width(unet: Any, blocks: list[list[int]], inputs: Any) -> Optional[int]:
    for ids in blocks:
        for i in ids:
            for t in _transformers(inputs[i]):
                for tb in getattr(t, "transformer_blocks", ()):
                    attn2 = getattr(tb, "attn2", None)
                    to_k = getattr(attn2, "to_k", None)
                    if to_k is not None and hasattr(to_k, "in_features"):
                        return int(to_k.in_features)
    return None


def describe(unet: Any, v_prediction: bool = False, name: str = "") -> LdmNetwork:
    """The recognised network of an ldm-layout U-Net module; raises :class:`UnsupportedModelError`."""
    inputs = getattr(unet, "input_blocks", None)
    outputs = getattr(unet, "output_blocks", None)
    if inputs is None or outputs is None:
        raise UnsupportedModelError(NOT_A_UNET.format(what=name or type(unet).__name__))
    stage_blocks: list[list[int]] = []
    downsample_at: list[Optional[int]] = []
    current: list[int] = []
    for i in range(1, len(inputs)):
        block = inputs[i]
        if _is_downsample(block):
            stage_blocks.append(current)
            downsample_at.append(i)
            current = []
        elif "ResBlock" in _names(block):
            current.append(i)
        else:
            raise UnsupportedModelError(
                f"HiDiffusion: input block {i} holds {_names(block)}, not a layer of a Stable Diffusion U-Net. "
                + NOT_A_UNET.format(what=name or type(unet).__name__)
            )
    if current:
        stage_blocks.append(current)
        downsample_at.append(None)
    stages = []
    for k, ids in enumerate(stage_blocks):
        first = inputs[ids[0]][0] if ids else None
        plain = any(_depth(inputs[i]) and not _cross(inputs[i]) for i in ids)
        values = dict(
            channels=int(getattr(first, "out_channels", 0) or 0),
            layers=len(ids),
            cross_attention=any(_cross(inputs[i]) for i in ids),
            downsample=downsample_at[k] is not None,
            self_attention_only=plain,
            other_attention="self-attention without cross-attention" if plain else "",
        )
        known = {f.name for f in dataclasses.fields(Stage)}
        stages.append(Stage(**{key: v for key, v in values.items() if key in known}))
    up_blocks: list[list[int]] = [[]]
    for i, block in enumerate(outputs):
        up_blocks[-1].append(i)
        if "Upsample" in _names(block) and i != len(outputs) - 1:
            up_blocks.append([])
    in_channels = getattr(unet, "in_channels", None)
    if in_channels is None:
        conv_in = inputs[0][0]
        in_channels = getattr(conv_in, "in_channels", 4)
    label_emb = getattr(unet, "label_emb", None)
    embedding = "" if label_emb is None else ("vector" if type(label_emb).__name__ == "Sequential" else "class")
    fields = {f.name for f in dataclasses.fields(NetworkDescription)}
    values = dict(
        stages=tuple(stages),
        up_layers=tuple(len(ids) for ids in up_blocks),
        up_cross_attention=tuple(any(_cross(outputs[i]) for i in ids) for ids in up_blocks),
        in_channels=int(in_channels),
        cross_attention_dim=_context_width(unet, stage_blocks, inputs),
        native=None,
        name=name or type(unet).__name__,
        embedding=embedding,
    )
    arch = recognise(NetworkDescription(**{k: v for k, v in values.items() if k in fields}))
    if arch.family == "sd2" and v_prediction:
        arch = dataclasses.replace(arch, native=(96, 96))

    attentions: list[tuple[str, int, int, int]] = []
    for stage in (arch.window_stage, arch.window_stage + 1):
        if stage >= len(stages) or not stages[stage].cross_attention:
            continue
        for i in stage_blocks[stage]:
            attentions += [("input", i, j, stage) for j in range(_depth(inputs[i]))]
        for i in up_blocks[arch.up_index(stage)]:
            attentions += [("output", i, j, stage) for j in range(_depth(outputs[i]))]
    upsamples = []
    for k in range(arch.num_stages - 1):
        ids = up_blocks[arch.up_index(k + 1)]
        upsamples.append((ids[-1], k))
    conv_block = downsample_at[arch.conv_stage]
    if conv_block is None:  # recognise() checked the conv stage downsamples
        raise UnsupportedModelError(f"HiDiffusion: stage {arch.conv_stage} of {values['name']} has no downsampler")
    up_pool = up_blocks[arch.up_index(arch.pool_stage)]
    return LdmNetwork(
        architecture=arch,
        conv_block=conv_block,
        pool_block=stage_blocks[arch.pool_stage][0],
        unpool_block=up_pool[arch.unpool_layer],
        attentions=tuple(attentions),
        upsample_blocks=tuple(upsamples),
        downsample_blocks=tuple((block, k) for k, block in enumerate(downsample_at) if block is not None),
        v_prediction=v_prediction,
    )
