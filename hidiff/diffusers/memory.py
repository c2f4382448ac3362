"""The memory estimate's inputs read from a diffusers U-Net and VAE (their configs and parameters)."""

from __future__ import annotations

from typing import Any

from ..core.memory import UNetShape, VAEShape


def _per_stage(value: Any, stages: int) -> tuple[int, ...]:
    return tuple(int(v) for v in value) if isinstance(value, (list, tuple)) else (int(value),) * stages


def unet_shape(unet: Any) -> UNetShape:
    """Transformer depths, heads and parameters of a ``UNet2DConditionModel`` (real or on the meta device)."""
    config = unet.config
    stages = len(config.down_block_types)
    heads = _per_stage(config.num_attention_heads or config.attention_head_dim, stages)
    depths = _per_stage(config.transformer_layers_per_block, stages)
    attention = tuple("CrossAttn" in t for t in config.down_block_types)
    reverse = getattr(config, "reverse_transformer_layers_per_block", None)
    up_depths = None
    if reverse is not None:
        up_depths = tuple(int(r[0] if isinstance(r, (list, tuple)) else r) for r in reverse)
    return UNetShape(
        depths=tuple(d if a else 0 for d, a in zip(depths, attention)),
        heads=heads,
        mid_depth=depths[-1] if "CrossAttn" in str(config.mid_block_type or "UNetMidBlock2DCrossAttn") else 0,
        mid_heads=heads[-1],
        params=sum(p.numel() for p in unet.parameters()),
        out_channels=int(config.out_channels),
        up_depths=up_depths,
    )


def vae_shape(vae: Any) -> VAEShape:
    """The decoder of an ``AutoencoderKL`` and its tiling, as diffusers runs it."""
    config = vae.config
    return VAEShape(
        channels=tuple(int(c) for c in config.block_out_channels),
        layers=int(config.layers_per_block),
        params=sum(p.numel() for p in vae.parameters()),
        upcast=bool(getattr(config, "force_upcast", False)),
        tile=int(getattr(vae, "tile_sample_min_size", config.sample_size)),
        tile_overlap=float(getattr(vae, "tile_overlap_factor", 0.25)),
        out_channels=int(config.out_channels),
    )
