"""The tiny weights every host runs under the contract: one random U-Net per layout, built as
a diffusers ``UNet2DConditionModel`` (the format the other hosts' converters read), and the
text conditioning of a run. Native size 32 (256 px), so 2x native is a 64x64 latent."""

from __future__ import annotations

from typing import Any

import torch

from hidiff.comfy.testing import TINY, seed_weights

NATIVE = 32
CONTEXT = TINY["context_dim"]
TOKENS = 8

#: The layouts under the contract: SD 1.x (4 stages, attention from stage 0) and SDXL (3 stages,
#: attention from stage 1, the text_time added conditioning), both at width 32.
CONFIGS: dict[str, dict[str, Any]] = {
    "sd15": dict(
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=(32, 64, 64, 64),
        attention_head_dim=8,
    ),
    "sdxl": dict(
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64, 64),
        transformer_layers_per_block=(1, 1, 1),
        attention_head_dim=(1, 1, 1),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
    ),
}


def diffusers_unet(layout: str, seed: int = 0) -> Any:
    """The layout's tiny U-Net with the contract's weights (every parameter from ``seed``)."""
    from diffusers import UNet2DConditionModel

    config = dict(
        sample_size=NATIVE,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        cross_attention_dim=CONTEXT,
        norm_num_groups=32,
        **CONFIGS[layout],
    )
    unet = UNet2DConditionModel(**config).eval()
    seed_weights(unet, seed)  # diffusers zero-inits some layers: fill them all
    return unet


def text(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(token embeddings (1, TOKENS, CONTEXT), pooled embedding (1, 1280)) of the run's prompt."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, TOKENS, CONTEXT, generator=g), torch.randn(1, 1280, generator=g)


def noise(batch: int, hw: tuple[int, int], seed: int = 11) -> torch.Tensor:
    return torch.randn(batch, 4, *hw, generator=torch.Generator().manual_seed(seed))
