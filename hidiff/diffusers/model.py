"""Which U-Net is this, and where does HiDiffusion act on it? Read from structure, never names.

Two layouts are known, as data (:data:`LAYOUTS`): the SD 1.x/2.x U-Net (four stages,
attention in the first three) and the SDXL U-Net (three stages, attention in the last
two; SSD-1B and other distillations only change transformer depths). The stage indices
are relative to the first stage that has attention, so the table states the published
placement once for every model of a layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


class UnsupportedModelError(TypeError):
    """The object is not a U-Net that HiDiffusion can be applied to."""


@dataclass(frozen=True)
class LayoutRule:
    kind: str  # "sd" or "sdxl": selects the presets
    num_stages: int
    first_attention_stage: int
    conv_offset: int  # the stage whose downsampler RAU-Net strides, from the first attention stage
    pool_offset: int  # the stage whose first (resnet, attention) pair output RAU-Net pools
    default_native: int  # latent side when the config does not say


LAYOUTS = (
    LayoutRule("sd", num_stages=4, first_attention_stage=0, conv_offset=0, pool_offset=1, default_native=64),
    LayoutRule("sdxl", num_stages=3, first_attention_stage=1, conv_offset=0, pool_offset=0, default_native=128),
)


@dataclass(frozen=True)
class Layout:
    """Where HiDiffusion acts on one U-Net (indices into ``down_blocks`` / ``up_blocks``)."""

    family: str  # sd1, sd2, sd (other SD-layout widths), sdxl
    kind: str  # sd or sdxl
    native: tuple[int, int]  # native latent size (height, width)
    num_stages: int
    conv_stage: int
    pool_stage: int
    window_stage: int
    inpainting: bool

    def up_index(self, down_index: int) -> int:
        """The up block that mirrors down block ``down_index`` (same resolution)."""
        return self.num_stages - 1 - down_index

    def module_names(self, raunet: bool = True, window_attn: bool = True, unet: Any = None) -> dict[str, str]:
        """Every module this layout changes, with what is done to it."""
        names: dict[str, str] = {}
        if raunet:
            names[f"down_blocks.{self.conv_stage}.downsamplers.0"] = "conv re-run with stride 4, padding 2, dilation 2"
            names[f"down_blocks.{self.pool_stage}.attentions.0"] = "output avg-pooled 2x2 (ceil), size recorded"
            names[f"up_blocks.{self.up_index(self.pool_stage)}.attentions.1"] = "output resized back (bicubic)"
            for k in range(self.num_stages - 1):
                if k != self.conv_stage:
                    names[f"down_blocks.{k}.downsamplers.0"] = "input size recorded (read only)"
                names[f"up_blocks.{k}.upsamplers.0"] = "output size forced to its skip connection"
        if window_attn:
            for block in (f"down_blocks.{self.window_stage}", f"up_blocks.{self.up_index(self.window_stage)}"):
                if unet is None:
                    names[f"{block}.attentions.*"] = "token map size recorded (read only)"
                    names[f"{block}.attentions.*.transformer_blocks.*.attn1"] = "self-attention in shifted 2x2 windows"
                    continue
                for name, _ in unet.get_submodule(block).named_modules():
                    if name.count(".") == 1 and name.startswith("attentions."):
                        names[f"{block}.{name}"] = "token map size recorded (read only)"
                    if name.endswith(".attn1") and ".transformer_blocks." in name:
                        names[f"{block}.{name}"] = "self-attention in shifted 2x2 windows"
        return names


def find_unet(obj: Any) -> tuple[Any, Any]:
    """(U-Net, pipeline or None) from a pipeline or a U-Net; raises for anything else."""
    if isinstance(obj, torch.nn.Module):
        return _unwrap(obj), None
    unet = getattr(obj, "unet", None)
    if unet is not None and isinstance(unet, torch.nn.Module):
        return _unwrap(unet), obj
    if getattr(obj, "transformer", None) is not None:
        denoiser = type(obj.transformer).__name__
        raise UnsupportedModelError(
            f"{type(obj).__name__} denoises with a transformer ({denoiser}), not a U-Net; "
            "HiDiffusion needs a Stable Diffusion U-Net (SD 1.x, SD 2.x, SDXL and their fine-tunes)."
        )
    raise UnsupportedModelError(
        f"expected a diffusers pipeline with a `unet` or a UNet2DConditionModel, got {type(obj).__name__}; "
        "pass e.g. a StableDiffusionPipeline / StableDiffusionXLPipeline, or its `.unet`."
    )


def _unwrap(module: Any) -> Any:
    # torch.compile wraps the module; hooks belong on the module itself.
    return getattr(module, "_orig_mod", module)


def _has_cross_attention(block: Any) -> bool:
    """Whether a U-Net block holds transformer blocks (self- and cross-attention) in ``attentions``."""
    return any(
        hasattr(m, "attn1") and hasattr(m, "attn2")
        for a in getattr(block, "attentions", None) or ()
        for m in a.modules()
    )


def detect_layout(unet: Any) -> Layout:
    """Read the layout from the blocks; raise :class:`UnsupportedModelError` naming what was found."""
    name = type(unet).__name__
    down = getattr(unet, "down_blocks", None)
    up = getattr(unet, "up_blocks", None)
    config = getattr(unet, "config", None)
    if down is None or up is None or config is None:
        raise UnsupportedModelError(
            f"{name} has no down_blocks/up_blocks: it is not a Stable Diffusion U-Net "
            "(UNet2DConditionModel); HiDiffusion cannot be applied to it."
        )
    attention_stages = [k for k, block in enumerate(down) if _has_cross_attention(block)]
    self_attention_only = [k for k, block in enumerate(down) if getattr(block, "attentions", None)]
    if not attention_stages and self_attention_only:
        k = self_attention_only[0]
        raise UnsupportedModelError(
            f"{name}: down_blocks.{k} ({type(down[k]).__name__}) has self-attention only, no cross-attention "
            "transformer: this is not a text-conditioned Stable Diffusion U-Net, which HiDiffusion needs."
        )
    for rule in LAYOUTS:
        if len(down) == rule.num_stages and attention_stages[:1] == [rule.first_attention_stage]:
            break
    else:
        raise UnsupportedModelError(
            f"{name} has {len(down)} down stages with attention at stages {attention_stages}; HiDiffusion knows "
            "the SD 1.x/2.x layout (4 stages, attention from stage 0) and the SDXL layout (3 stages, attention "
            "from stage 1)."
        )
    first = rule.first_attention_stage
    conv_stage, pool_stage = first + rule.conv_offset, first + rule.pool_offset
    downsamplers = getattr(down[conv_stage], "downsamplers", None)
    conv = getattr(downsamplers[0], "conv", None) if downsamplers else None
    conv = getattr(conv, "base_layer", conv)  # a PEFT LoRA wraps the conv it adapts
    if not isinstance(conv, torch.nn.Conv2d) or tuple(conv.stride) != (2, 2) or tuple(conv.kernel_size) != (3, 3):
        raise UnsupportedModelError(
            f"{name}: down_blocks.{conv_stage} has no 3x3 stride-2 conv downsampler for RAU-Net "
            f"(found {type(conv).__name__ if conv is not None else 'none'})."
        )
    if not _has_cross_attention(down[pool_stage]):
        raise UnsupportedModelError(f"{name}: down_blocks.{pool_stage} has no attention, RAU-Net pools after it.")
    up_pool = up[rule.num_stages - 1 - pool_stage]
    if len(getattr(up_pool, "attentions", None) or ()) < 2:
        raise UnsupportedModelError(
            f"{name}: up_blocks.{rule.num_stages - 1 - pool_stage} needs two attention layers to undo RAU-Net's pooling."
        )
    if not _has_cross_attention(up[rule.num_stages - 1 - first]):
        raise UnsupportedModelError(f"{name}: up_blocks.{rule.num_stages - 1 - first} has no attention for MSW-MSA.")
    sample_size = getattr(config, "sample_size", None) or rule.default_native
    native = (sample_size, sample_size) if isinstance(sample_size, int) else (int(sample_size[0]), int(sample_size[1]))
    cross = getattr(config, "cross_attention_dim", None)
    family = rule.kind
    if rule.kind == "sd":
        family = {768: "sd1", 1024: "sd2"}.get(cross if isinstance(cross, int) else -1, "sd")
    return Layout(
        family=family,
        kind=rule.kind,
        native=native,
        num_stages=rule.num_stages,
        conv_stage=conv_stage,
        pool_stage=pool_stage,
        window_stage=first,
        inpainting=getattr(config, "in_channels", 4) == 9,
    )
