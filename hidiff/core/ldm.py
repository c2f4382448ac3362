"""Read a U-Net in the original Stable Diffusion code's layout ("ldm") into the core's network
description, by class names and structure only.

ComfyUI and the three WebUIs all run U-Nets in this layout: ``input_blocks`` /
``middle_block`` / ``output_blocks``, each block a list of layers (``ResBlock``,
``SpatialTransformer``, ``Downsample``, ``Upsample``); ComfyUI's and reForge's
``openaimodel``, AUTOMATIC1111's ldm and sgm ``UNetModel``, Forge's ``backend.nn.unet``. Their
hosts read the blocks with this module and add what only they know (the model's config, its
prediction type). Nothing here imports a host: layers are recognised by class name and duck
typing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from .architecture import Architecture, NetworkDescription, Stage, UnsupportedModelError

#: The attention layers' class names (SDXL-video blocks included: they share the layout).
TRANSFORMERS = ("SpatialTransformer", "SpatialVideoTransformer")

Attention = tuple[str, int, int]  # ("input" | "output", block id, transformer block index)


def layer_names(block: Any) -> list[str]:
    return [type(layer).__name__ for layer in block]


def _transformers(block: Any) -> list[Any]:
    return [layer for layer in block if type(layer).__name__ in TRANSFORMERS]


def transformer_depth(block: Any) -> int:
    """The number of transformer blocks (one self-attention each) in a block."""
    return sum(len(getattr(t, "transformer_blocks", ())) for t in _transformers(block))


def has_cross_attention(block: Any) -> bool:
    """Whether a block's transformers attend to the text (a block whose attn2 is self-attention does not)."""
    for t in _transformers(block):
        for tb in getattr(t, "transformer_blocks", ()):
            if getattr(tb, "attn2", None) is not None and not getattr(tb, "disable_self_attn", False):
                return True
    return False


def is_downsample(block: Any) -> bool:
    """A stage's 3x3 stride-2 Downsample (the conv RAU-Net strides)."""
    if layer_names(block) != ["Downsample"]:
        return False
    op = getattr(block[0], "op", None)
    stride = getattr(op, "stride", None)
    kernel = getattr(op, "kernel_size", None)
    return stride is not None and tuple(stride) == (2, 2) and kernel is not None and tuple(kernel) == (3, 3)


def context_width(unet: Any) -> Optional[int]:
    """The text width the cross-attention takes (its key projection's input), where the U-Net has one."""
    for block in unet.input_blocks:
        for t in _transformers(block):
            for tb in getattr(t, "transformer_blocks", ()):
                to_k = getattr(getattr(tb, "attn2", None), "to_k", None)
                if to_k is not None and hasattr(to_k, "in_features"):
                    return int(to_k.in_features)
    return None


@dataclass(frozen=True)
class LdmBlocks:
    """Where each stage's layers sit in an ldm U-Net's block lists.

    ``input`` ids count ``input_blocks`` (0 is conv_in), ``output`` ids ``output_blocks``.
    """

    stage_blocks: tuple[tuple[int, ...], ...]  # input blocks of each down stage's layers
    downsample_blocks: tuple[Optional[int], ...]  # input block of each down stage's Downsample (None: none)
    up_blocks: tuple[tuple[int, ...], ...]  # output blocks of each up stage, deepest first

    def self_attentions(self, unet: Any, arch: Architecture, stage: int) -> tuple[Attention, ...]:
        """Every self-attention of down stage ``stage`` and its mirror, in forward order, down path first."""
        found: list[Attention] = []
        for i in self.stage_blocks[stage]:
            found += [("input", i, j) for j in range(transformer_depth(unet.input_blocks[i]))]
        for i in self.up_blocks[arch.up_index(stage)]:
            found += [("output", i, j) for j in range(transformer_depth(unet.output_blocks[i]))]
        return tuple(found)


def read_ldm(
    unet: Any,
    name: str,
    in_channels: Optional[int],
    cross_attention_dim: Optional[int],
    embedding: Optional[str],
    advice: str = "",
) -> tuple[NetworkDescription, LdmBlocks]:
    """The network description of an ldm-layout ``unet`` (not yet recognised) and its blocks.

    The host gives what the module alone does not say reliably (its config's input channels,
    text width and time-embedding input; None: read ``in_channels`` off the module). A block
    that is not a layer of a Stable Diffusion U-Net raises :class:`UnsupportedModelError`
    naming it, followed by the host's ``advice``.
    """
    inputs, outputs = unet.input_blocks, unet.output_blocks
    stage_blocks: list[tuple[int, ...]] = []
    downsample_blocks: list[Optional[int]] = []
    current: list[int] = []
    for i in range(1, len(inputs)):
        block = inputs[i]
        if is_downsample(block):
            stage_blocks.append(tuple(current))
            downsample_blocks.append(i)
            current = []
        elif "ResBlock" in layer_names(block):
            current.append(i)
        else:
            raise UnsupportedModelError(
                f"HiDiffusion: {name}: input block {i} holds {layer_names(block)}, which is not a layer of a "
                f"Stable Diffusion U-Net (ResBlock, SpatialTransformer, 3x3 stride-2 Downsample).{advice}"
            )
    if current:
        stage_blocks.append(tuple(current))
        downsample_blocks.append(None)
    stages = []
    for k, ids in enumerate(stage_blocks):
        first = inputs[ids[0]][0] if ids else None
        plain = any(transformer_depth(inputs[i]) and not has_cross_attention(inputs[i]) for i in ids)
        stages.append(
            Stage(
                channels=int(getattr(first, "out_channels", 0) or 0),
                layers=len(ids),
                cross_attention=any(has_cross_attention(inputs[i]) for i in ids),
                downsample=downsample_blocks[k] is not None,
                other_attention="self-attention without cross-attention" if plain else "",
            )
        )
    # Up path, deepest stage first: a stage ends with the block holding its Upsample.
    up_blocks: list[list[int]] = [[]]
    for i, block in enumerate(outputs):
        up_blocks[-1].append(i)
        if "Upsample" in layer_names(block) and i != len(outputs) - 1:
            up_blocks.append([])
    channels: Any = in_channels or getattr(unet, "in_channels", None) or getattr(inputs[0][0], "in_channels", 4)
    network = NetworkDescription(
        stages=tuple(stages),
        up_layers=tuple(len(ids) for ids in up_blocks),
        up_cross_attention=tuple(any(has_cross_attention(outputs[i]) for i in ids) for ids in up_blocks),
        in_channels=int(channels),
        cross_attention_dim=cross_attention_dim,
        native=None,
        name=name,
        embedding=embedding,
    )
    return network, LdmBlocks(tuple(stage_blocks), tuple(downsample_blocks), tuple(tuple(ids) for ids in up_blocks))
