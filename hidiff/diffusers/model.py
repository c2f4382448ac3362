"""Read a diffusers ``UNet2DConditionModel`` into the neutral description, from structure only.

Nothing here looks at names: the family comes from :func:`hidiff.core.architecture.recognise`
applied to what the blocks contain (widths, layers, attention, conv shapes), so
fine-tunes, merges, single-file checkpoints and distillations are handled like their base.
"""

from __future__ import annotations

from typing import Any

import torch

from ..core.architecture import Architecture, NetworkDescription, Stage, UnsupportedModelError, recognise


def find_unet(obj: Any) -> tuple[Any, Any]:
    """(U-Net, pipeline or None) from a pipeline or a U-Net; raises for anything else."""
    if isinstance(obj, torch.nn.Module):
        return unwrap(obj), None
    unet = getattr(obj, "unet", None)
    if unet is not None and isinstance(unet, torch.nn.Module):
        return unwrap(unet), obj
    if getattr(obj, "transformer", None) is not None:
        denoiser = type(obj.transformer).__name__
        raise UnsupportedModelError(
            f"{type(obj).__name__} denoises with a transformer ({denoiser}), not a U-Net; "
            "HiDiffusion needs a Stable Diffusion U-Net (SD 1.x, SD 2.x, SDXL and their fine-tunes): "
            "run this pipeline without it."
        )
    raise UnsupportedModelError(
        f"expected a diffusers pipeline with a `unet` or a UNet2DConditionModel, got {type(obj).__name__}; "
        "pass e.g. a StableDiffusionPipeline / StableDiffusionXLPipeline, or its `.unet`."
    )


def unwrap(module: Any) -> Any:
    # torch.compile wraps the module, and so do DataParallel / DistributedDataParallel (accelerate's
    # prepare on several processes): hooks belong on the module itself, which the wrapper calls.
    module = getattr(module, "_orig_mod", module)
    if isinstance(module, (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)):
        module = getattr(module.module, "_orig_mod", module.module)
    return module


def transformer_blocks(block: Any) -> list:
    """The transformer blocks (self- and cross-attention) inside a U-Net block's ``attentions``."""
    return [m for a in getattr(block, "attentions", None) or () for m in a.modules() if is_transformer_block(m)]


def is_transformer_block(module: Any) -> bool:
    return isinstance(getattr(module, "attn1", None), torch.nn.Module) and hasattr(module, "attn2")


def _other_attention(block: Any) -> str:
    """What attention a block without transformer blocks has, in words for a refusal."""
    attentions = list(getattr(block, "attentions", None) or ())
    if not attentions:
        return ""
    if any(getattr(m, "added_kv_proj_dim", None) for a in attentions for m in a.modules()):
        return (
            "added key/value cross-attention (the SimpleCrossAttn blocks of DeepFloyd IF and unCLIP, "
            "pixel-space cascades)"
        )
    return "self-attention only (an unconditional or class-conditioned U-Net, no text cross-attention)"


def _stride2_conv(block: Any) -> bool:
    downsamplers = getattr(block, "downsamplers", None)
    conv = getattr(downsamplers[0], "conv", None) if downsamplers else None
    conv = getattr(conv, "base_layer", conv)  # a PEFT LoRA wraps the conv it adapts
    return isinstance(conv, torch.nn.Conv2d) and tuple(conv.stride) == (2, 2) and tuple(conv.kernel_size) == (3, 3)


def model_name(unet: Any) -> str:
    """The U-Net's class, and where it was loaded from when diffusers recorded it."""
    source = getattr(getattr(unet, "config", None), "_name_or_path", None)
    return f"{type(unet).__name__} ({source})" if source else type(unet).__name__


def describe_unet(unet: Any) -> NetworkDescription:
    """The neutral description of a diffusers U-Net; raises for what is not one."""
    name = model_name(unet)
    down, up, config = (getattr(unet, k, None) for k in ("down_blocks", "up_blocks", "config"))
    if down is None or up is None or config is None:
        raise UnsupportedModelError(
            f"{name} has no down_blocks/up_blocks: it is not a Stable Diffusion U-Net (UNet2DConditionModel); "
            "HiDiffusion cannot be applied to it: pass a Stable Diffusion pipeline or its `.unet`."
        )
    stages = tuple(
        Stage(
            channels=int(getattr(block.resnets[-1], "out_channels", 0) or 0) if getattr(block, "resnets", None) else 0,
            layers=len(getattr(block, "resnets", None) or ()),
            cross_attention=bool(transformer_blocks(block)),
            downsample=_stride2_conv(block),
            other_attention="" if transformer_blocks(block) else _other_attention(block),
            cross_only=any(getattr(m, "only_cross_attention", False) for m in transformer_blocks(block)),
        )
        for block in down
    )
    sample_size = getattr(config, "sample_size", None)
    native = None
    if sample_size:
        native = (
            (sample_size, sample_size) if isinstance(sample_size, int) else (int(sample_size[0]), int(sample_size[1]))
        )
    cross = getattr(config, "cross_attention_dim", None)
    return NetworkDescription(
        stages=stages,
        up_layers=tuple(len(getattr(block, "resnets", None) or ()) for block in up),
        up_cross_attention=tuple(bool(transformer_blocks(block)) for block in up),
        in_channels=int(getattr(config, "in_channels", 4) or 4),
        cross_attention_dim=cross if isinstance(cross, int) else None,
        native=native,
        name=name,
        embedding=_embedding(config),
    )


def _embedding(config: Any) -> str:
    """What the time embedding takes besides the timestep, in the core's words (see NetworkDescription)."""
    addition, class_type = getattr(config, "addition_embed_type", None), getattr(config, "class_embed_type", None)
    if addition == "text_time" or class_type in ("projection", "simple_projection"):
        return "vector"
    if addition or class_type:
        return str(addition or class_type)
    return "class" if getattr(config, "num_class_embeds", None) else ""


def detect_architecture(unet: Any) -> Architecture:
    """The architecture of a diffusers U-Net; raises :class:`UnsupportedModelError` naming what was found."""
    return recognise(describe_unet(unet))


#: The earlier name of :func:`detect_architecture`, kept for code written against it (it returned a
#: ``Layout``, the name :class:`~hidiff.core.architecture.Architecture` had before the core/host split).
detect_layout = detect_architecture
