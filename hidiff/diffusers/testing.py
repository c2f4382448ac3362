"""Random-weight Stable Diffusion models built from configs, for tests, demos and benchmarks.

Nothing here downloads anything. The tiny models keep the exact block layout and
module names of their full-size families (so family detection and the published
HiDiffusion see them as the real thing) at a fraction of the width. The full-size
configs reproduce the published U-Nets for timing: speed does not depend on the
weight values.
"""

from __future__ import annotations

from typing import Any

import torch

from .unet_configs import (  # noqa: F401  (re-exported: the full-size configs were defined here before)
    FULL_UNET_CONFIGS,
    SD15_UNET,
    SD21_768_UNET,
    SD21_UNET,
    SDXL_REFINER_UNET,
    SDXL_UNET,
)

# Tiny widths: the same layouts, hence the same module names.
TINY_TEXT_DIM = 32
TINY_POOLED_DIM = 32
TINY_TIME_DIM = 8


def tiny_unet_config(family: str = "sd15", **overrides: Any) -> dict[str, Any]:
    """A tiny config with the layout (and module names) of ``family``."""
    if family in ("sd15", "sd21", "sd21-768"):
        cfg = dict(
            FULL_UNET_CONFIGS[family],
            block_out_channels=(32, 64, 64, 64),
            cross_attention_dim=TINY_TEXT_DIM,
            # One head per layer (SD configs name the head count attention_head_dim):
            # attention over 16k tokens is the cost of a 1024px test, and heads multiply it.
            attention_head_dim=1,
            norm_num_groups=16,
        )
    elif family == "sdxl":
        cfg = dict(
            SDXL_UNET,
            block_out_channels=(32, 64, 64),
            cross_attention_dim=2 * TINY_TEXT_DIM,  # both text encoders, concatenated
            attention_head_dim=(1, 1, 1),
            norm_num_groups=16,
            addition_time_embed_dim=TINY_TIME_DIM,
            projection_class_embeddings_input_dim=TINY_POOLED_DIM + 6 * TINY_TIME_DIM,
        )
    elif family == "sdxl-refiner":
        cfg = dict(
            SDXL_REFINER_UNET,
            block_out_channels=(32, 64, 64, 64),
            transformer_layers_per_block=1,
            cross_attention_dim=TINY_TEXT_DIM,  # the second text encoder only
            attention_head_dim=(1, 1, 1, 1),
            norm_num_groups=16,
            addition_time_embed_dim=TINY_TIME_DIM,
            projection_class_embeddings_input_dim=TINY_POOLED_DIM + 5 * TINY_TIME_DIM,
        )
    else:
        raise ValueError(f"unknown family {family!r}; choose one of {', '.join(FULL_UNET_CONFIGS)}")
    cfg.update(overrides)
    return cfg


def make_unet(config: dict[str, Any], seed: int = 0, dtype: torch.dtype = torch.float32):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**config).eval()
    return unet if dtype == torch.float32 else unet.to(dtype)


def tiny_vae(seed: int = 0):
    """A 4-level VAE (scale factor 8, like SD's) of tiny width."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
    ).eval()


def _byte_symbols() -> list[str]:
    """The 256 printable stand-ins that byte-level BPE uses for raw bytes."""
    printable = [b for b in range(256) if (33 <= b <= 126) or (161 <= b <= 172) or (174 <= b <= 255)]
    symbols, extra = {}, 0
    for b in range(256):
        if b in printable:
            symbols[b] = chr(b)
        else:
            symbols[b] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in range(256)]


def tiny_tokenizer():
    """A byte-level CLIP tokenizer that needs no files (no vocabulary on disk offline)."""
    import json
    import os
    import tempfile

    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {}
    for suffix in ("", "</w>"):
        for s in _byte_symbols():
            vocab[s + suffix] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    try:  # transformers >= 5 takes the vocabulary itself
        return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    except TypeError:
        pass
    with tempfile.TemporaryDirectory() as tmp:
        vocab_file = os.path.join(tmp, "vocab.json")
        merges_file = os.path.join(tmp, "merges.txt")
        with open(vocab_file, "w") as f:
            json.dump(vocab, f)
        with open(merges_file, "w") as f:
            f.write("#version: 0.2\n")
        return CLIPTokenizer(vocab_file, merges_file, model_max_length=77)


def tiny_text_encoder(seed: int = 0, with_projection: bool = False, hidden_size: int = TINY_TEXT_DIM):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=514,
        hidden_size=hidden_size,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=TINY_POOLED_DIM,
        bos_token_id=512,
        eos_token_id=513,
        pad_token_id=513,
    )
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return cls(config).eval()


def tiny_components(family: str = "sd15", seed: int = 0, **unet_overrides: Any) -> dict[str, Any]:
    """Components for a pipeline of ``family`` (sd15, sd21, sd21-768, sdxl or sdxl-refiner)."""
    from diffusers import DDIMScheduler

    unet = make_unet(tiny_unet_config(family, **unet_overrides), seed=seed)
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="v_prediction" if family == "sd21-768" else "epsilon",
    )
    components: dict[str, Any] = dict(unet=unet, vae=tiny_vae(seed), scheduler=scheduler)
    if family == "sdxl-refiner":
        components.update(
            text_encoder=None,
            text_encoder_2=tiny_text_encoder(seed + 1, with_projection=True),
            tokenizer=None,
            tokenizer_2=tiny_tokenizer(),
            requires_aesthetics_score=True,
        )
    elif family == "sdxl":
        components.update(
            text_encoder=tiny_text_encoder(seed),
            text_encoder_2=tiny_text_encoder(seed + 1, with_projection=True),
            tokenizer=tiny_tokenizer(),
            tokenizer_2=tiny_tokenizer(),
        )
    else:
        components.update(
            text_encoder=tiny_text_encoder(seed),
            tokenizer=tiny_tokenizer(),
            safety_checker=None,
            feature_extractor=None,
        )
    return components


_PIPELINES = {
    ("sd", "text2img"): "StableDiffusionPipeline",
    ("sd", "img2img"): "StableDiffusionImg2ImgPipeline",
    ("sd", "inpaint"): "StableDiffusionInpaintPipeline",
    ("sdxl", "text2img"): "StableDiffusionXLPipeline",
    ("sdxl", "img2img"): "StableDiffusionXLImg2ImgPipeline",
    ("sdxl", "inpaint"): "StableDiffusionXLInpaintPipeline",
}


def tiny_pipeline(family: str = "sd15", task: str = "text2img", seed: int = 0, **unet_overrides: Any):
    """A tiny random-weight pipeline: ``task`` is text2img, img2img or inpaint."""
    import diffusers

    kind = "sdxl" if family.startswith("sdxl") else "sd"
    if family == "sdxl-refiner" and task == "text2img":
        raise ValueError("the SDXL refiner is an img2img model: pass task='img2img' or 'inpaint'")
    try:
        cls = getattr(diffusers, _PIPELINES[(kind, task)])
    except KeyError:
        raise ValueError(f"unknown task {task!r}; choose text2img, img2img or inpaint") from None
    components = tiny_components(family, seed=seed, **unet_overrides)
    if kind == "sdxl" and task != "text2img":
        components.setdefault("requires_aesthetics_score", False)
    pipe = cls(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe
