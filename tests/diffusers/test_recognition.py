"""Recognition matches a family's whole structure (issue 27, fault 3): real U-Nets outside the
families, built by diffusers from tiny versions of their configs, are refused untouched with
what they are and why; every family (and its fine-tune variants) is still recognised."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_untouched, snapshot

from hidiff import UnsupportedModelError, apply_hidiffusion
from hidiff.diffusers.model import detect_layout
from hidiff.diffusers.testing import make_unet, tiny_unet_config

TINY = dict(
    sample_size=16,
    block_out_channels=(32, 32, 64, 64),
    norm_num_groups=16,
    attention_head_dim=1,
    cross_attention_dim=32,
    layers_per_block=1,
)
SD_BLOCKS = dict(
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
)
# The SD x4 upscaler's U-Net (stabilityai/stable-diffusion-x4-upscaler's config at a tiny width):
# 7 input channels (latents + the low-resolution image), the noise level as a class label,
# attention from stage 1 to the deepest stage, cross-attention only in stages 1-3's first attention.
X4_UPSCALER = dict(
    TINY,
    in_channels=7,
    out_channels=4,
    down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 3,
    up_block_types=("CrossAttnUpBlock2D",) * 3 + ("UpBlock2D",),
    num_class_embeds=1000,
    only_cross_attention=[True, True, True, False],
    use_linear_projection=True,
)

OUTSIDE = {
    # id: (config, what the refusal must say)
    "sd-x4-upscaler": (
        X4_UPSCALER,
        "UNet2DConditionModel is not a network HiDiffusion knows: by its layout it is nearest the SDXL refiner "
        "(4 stages, cross-attention in the middle two), but it has cross-attention at down stages [1, 2, 3] where "
        "the SDXL refiner has it at [1, 2]; its transformer blocks at stages [1, 2] attend to the text in place of "
        "self-attention (as in the SD x4 upscaler), where MSW-MSA windows a self-attention; it takes 7 input "
        "channels where the SDXL refiner takes 4; its time embedding takes class labels where the SDXL refiner's "
        "takes a projected vector (as SDXL's pooled text and size ids). HiDiffusion's placement and presets are "
        "made for a family's whole structure, so it is not applied to this one. Use a Stable Diffusion U-Net "
        "(SD 1.x, SD 2.x, SDXL, SDXL Turbo or a fine-tune of one), or run this model without HiDiffusion.",
    ),
    # Stable unCLIP (SD 2.1 with an image embedding projected into the time embedding)
    "sd21-unclip": (
        dict(TINY, **SD_BLOCKS, class_embed_type="projection", projection_class_embeddings_input_dim=64),
        "its time embedding takes a projected vector (as SDXL's pooled text and size ids) where the SD 1.x/2.x's "
        "takes nothing but the timestep",
    ),
    # an SD layout conditioned on class labels as well as text
    "sd-class-labels": (dict(TINY, **SD_BLOCKS, num_class_embeds=10), "its time embedding takes class labels"),
    "sd-timestep-class": (dict(TINY, **SD_BLOCKS, class_embed_type="timestep"), "a 'timestep' embedding"),
    # SDXL's layout without SDXL's pooled-text/size conditioning
    "sdxl-layout-text-only": (
        dict(
            TINY,
            block_out_channels=(32, 64, 64),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        ),
        "its time embedding takes nothing but the timestep where the SDXL's takes a projected vector",
    ),
    # Kandinsky 2.2's decoder: an image embedding added to the time embedding, SimpleCrossAttn blocks
    "kandinsky-2.2": (
        dict(
            TINY,
            out_channels=8,
            down_block_types=("ResnetDownsampleBlock2D",) + ("SimpleCrossAttnDownBlock2D",) * 3,
            up_block_types=("SimpleCrossAttnUpBlock2D",) * 3 + ("ResnetUpsampleBlock2D",),
            mid_block_type="UNetMidBlock2DSimpleCrossAttn",
            addition_embed_type="image",
            encoder_hid_dim=32,
            encoder_hid_dim_type="image_proj",
        ),
        "stage 1 has added key/value cross-attention",
    ),
    # attention at every stage, the deepest included
    "sd-attention-everywhere": (
        dict(
            TINY,
            down_block_types=("CrossAttnDownBlock2D",) * 4,
            up_block_types=("CrossAttnUpBlock2D",) * 4,
        ),
        "it has cross-attention at down stages [0, 1, 2, 3] where the SD 1.x/2.x has it at [0, 1, 2]",
    ),
    # an SD layout with an input the families do not take
    "sd-7-channels": (dict(TINY, **SD_BLOCKS, in_channels=7), "it takes 7 input channels"),
}


def build(config):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(**config).eval()


@pytest.mark.parametrize("case", list(OUTSIDE))
def test_unets_outside_the_families_are_refused_untouched_saying_why(case):
    config, words = OUTSIDE[case]
    unet = build(config)
    before = snapshot(unet)
    with pytest.raises(UnsupportedModelError) as info:
        apply_hidiffusion(unet)
    assert words in str(info.value), str(info.value)
    assert str(info.value).endswith("or run this model without HiDiffusion.")
    assert_untouched(unet, before)


def test_the_x4_upscaler_pipeline_is_refused_untouched():
    """The reported case: StableDiffusionUpscalePipeline's U-Net was patched as the SDXL refiner."""
    from diffusers import DDIMScheduler, DDPMScheduler, StableDiffusionUpscalePipeline

    from hidiff.diffusers.testing import tiny_text_encoder, tiny_tokenizer, tiny_vae

    pipe = StableDiffusionUpscalePipeline(
        vae=tiny_vae(),
        text_encoder=tiny_text_encoder(),
        tokenizer=tiny_tokenizer(),
        unet=build(X4_UPSCALER),
        low_res_scheduler=DDPMScheduler(),
        scheduler=DDIMScheduler(),
    )
    before = snapshot(pipe.unet)
    with pytest.raises(UnsupportedModelError, match="nearest the SDXL refiner"):
        apply_hidiffusion(pipe)
    assert_untouched(pipe.unet, before)


@pytest.mark.parametrize(
    "family, overrides, expected",
    [
        ("sd15", {}, "sd"),
        ("sd21", {}, "sd"),
        ("sd21-768", {}, "sd"),
        ("sdxl", {}, "sdxl"),
        ("sdxl-refiner", {}, "sdxl-refiner"),
        ("sd15", dict(in_channels=9), "sd"),  # inpainting
        ("sd15", dict(in_channels=8), "sd"),  # InstructPix2Pix
        ("sd21", dict(in_channels=5), "sd"),  # depth-to-image
        ("sdxl", dict(in_channels=9), "sdxl"),  # SDXL inpainting
        ("sd15", dict(layers_per_block=1, transformer_layers_per_block=2), "sd"),  # a distillation
        ("sdxl", dict(transformer_layers_per_block=(1, 1, 3)), "sdxl"),
    ],
)
def test_every_family_and_its_variants_are_still_recognised(family, overrides, expected):
    arch = detect_layout(make_unet(tiny_unet_config(family, **overrides)))
    assert arch.family == expected
    assert arch.inpainting == (overrides.get("in_channels") == 9)


def test_the_toy_model_is_recognised_as_sd():
    from hidiff.app.toy import TOY_UNET_CONFIG

    assert detect_layout(build(TOY_UNET_CONFIG)).family == "sd1"


@pytest.mark.parametrize(
    "pipeline, channels, extra",
    [("StableDiffusionInstructPix2PixPipeline", 8, {}), ("StableDiffusionDepth2ImgPipeline", 5, {"depth_map": True})],
    ids=["instruct-pix2pix", "depth-to-image"],
)
def test_sd_input_variants_are_supported_on_purpose(pipeline, channels, extra):
    """The extra input channels (the source image's latents, a depth map) do not touch what
    HiDiffusion changes: it acts on these pipelines as on SD (the same steps as a 4-channel
    img2img run of the same schedule), and removal gives the stock result bitwise."""
    import diffusers
    import numpy as np
    from PIL import Image

    import hidiff
    from hidiff.diffusers.testing import tiny_components

    components = tiny_components("sd15", sample_size=8, in_channels=channels)
    keep = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
    components = {k: v for k, v in components.items() if k in keep}
    if channels == 5:
        components.update(depth_estimator=None, feature_extractor=None)
    else:
        components.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe = getattr(diffusers, pipeline)(**components)
    pipe.set_progress_bar_config(disable=True)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (128, 128, 3), dtype=np.uint8))
    kwargs = {"depth_map": torch.rand(1, 128, 128, generator=torch.Generator().manual_seed(2))} if extra else {}

    def run():
        records = []

        def on_step_end(p, i, t, callback_kwargs):
            r = hidiff.last_call(p)
            records.append((r.step, r.total, r.conv, r.pool, r.window_calls > 0) if r is not None else None)
            return callback_kwargs

        out = pipe(
            "one red circle",
            image=image,
            num_inference_steps=3,
            generator=torch.Generator().manual_seed(0),
            output_type="latent",
            callback_on_step_end=on_step_end,
            **kwargs,
        )
        return out.images, records

    stock, _ = run()
    hidiff.apply_hidiffusion(pipe, preset="sd-1024", t1_ratio=0.7, t2_ratio=0.7)
    patched, records = run()
    total = len(records)  # depth-to-image runs strength 0.8 of the steps
    # T1 = T2 = int(total * 0.7): conv and pool in the steps before it, windows in every step
    cut = int(total * 0.7)
    assert records == [(i, total, i < cut, i < cut, True) for i in range(total)]
    assert torch.isfinite(patched).all() and not torch.equal(patched, stock)
    hidiff.remove_hidiffusion(pipe)
    assert torch.equal(run()[0], stock)
