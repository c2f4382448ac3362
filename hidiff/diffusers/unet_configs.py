"""The published full-size U-Net configs of the families hidiff knows (diffusers'
``UNet2DConditionModel`` keywords): what ``hidiff bench`` times, what ``hidiff info`` plans for
a family name, and the layouts the tiny test models keep. Plain data: importing it loads nothing.
"""

from __future__ import annotations

from typing import Any

SD15_UNET: dict[str, Any] = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    cross_attention_dim=768,
    attention_head_dim=8,
)

SD21_UNET: dict[str, Any] = dict(
    SD15_UNET,
    cross_attention_dim=1024,
    attention_head_dim=(5, 10, 20, 20),
    use_linear_projection=True,
)

SD21_768_UNET: dict[str, Any] = dict(SD21_UNET, sample_size=96)

SDXL_UNET: dict[str, Any] = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    transformer_layers_per_block=(1, 2, 10),
    cross_attention_dim=2048,
    attention_head_dim=(5, 10, 20),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)

#: The SDXL refiner: SDXL's two attention stages with a plain stage on either side.
SDXL_REFINER_UNET: dict[str, Any] = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(384, 768, 1536, 1536),
    layers_per_block=2,
    transformer_layers_per_block=4,
    cross_attention_dim=1280,
    attention_head_dim=(6, 12, 24, 24),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2560,  # pooled text (1280) + 5 time ids (with the aesthetic score)
)

#: Full-size U-Net configs of the families (what `hidiff bench` times).
FULL_UNET_CONFIGS: dict[str, dict[str, Any]] = {
    "sd15": SD15_UNET,
    "sd21": SD21_UNET,
    "sd21-768": SD21_768_UNET,
    "sdxl": SDXL_UNET,
    "sdxl-refiner": SDXL_REFINER_UNET,
}
