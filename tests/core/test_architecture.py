"""The host-neutral core on its own: the registry, the planner and progress, from plain
descriptions (no diffusers, no ComfyUI)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from hidiff.core import ops
from hidiff.core.architecture import (
    REGISTRY,
    ArchitectureRecord,
    NetworkDescription,
    Stage,
    UnsupportedModelError,
    recognise,
)
from hidiff.core.config import HiDiffusionConfig
from hidiff.core.planner import Progress, Task, feature_sizes, plan_call
from hidiff.core.progress import position, progress_from_sigmas


def network(attention, downsample=None, layers=2, width=768, in_channels=4, native=None, up_layers=None):
    """A description with cross-attention where ``attention`` says (top resolution first)."""
    n = len(attention)
    downsample = downsample if downsample is not None else [k < n - 1 for k in range(n)]
    stages = tuple(Stage(64 * (k + 1), layers, a, d) for k, (a, d) in enumerate(zip(attention, downsample)))
    return NetworkDescription(
        stages=stages,
        up_layers=tuple(up_layers or [layers + 1] * n),
        up_cross_attention=tuple(reversed(attention)),
        in_channels=in_channels,
        cross_attention_dim=width,
        native=native,
        name="probe",
    )


SD = network([True, True, True, False])
SDXL = network([False, True, True], width=2048)
REFINER = network([False, True, True, False], width=1280)


@pytest.mark.parametrize(
    "net, family, kind, stages, conv, pool, window, native",
    [
        (SD, "sd1", "sd", 4, 0, 1, 0, (64, 64)),
        (dataclasses.replace(SD, cross_attention_dim=1024), "sd2", "sd", 4, 0, 1, 0, (64, 64)),
        (dataclasses.replace(SD, cross_attention_dim=320), "sd", "sd", 4, 0, 1, 0, (64, 64)),
        (SDXL, "sdxl", "sdxl", 3, 1, 1, 1, (128, 128)),
        (REFINER, "sdxl-refiner", "sdxl", 4, 1, 1, 1, (128, 128)),
        (dataclasses.replace(SD, native=(96, 96)), "sd1", "sd", 4, 0, 1, 0, (96, 96)),
    ],
)
def test_registry_recognises_each_family(net, family, kind, stages, conv, pool, window, native):
    arch = recognise(net)
    assert (arch.family, arch.kind, arch.num_stages) == (family, kind, stages)
    assert (arch.conv_stage, arch.pool_stage, arch.window_stage, arch.native) == (conv, pool, window, native)
    assert arch.up_index(arch.window_stage) == stages - 1 - window
    assert not arch.inpainting
    if family != "sdxl-refiner":  # no 9-channel refiner exists: the refiner takes 4 channels only
        assert recognise(dataclasses.replace(net, in_channels=9)).inpainting


@pytest.mark.parametrize(
    "net, words",
    [
        (network([False, False, False, False]), ["probe", "4 down stages", "none has attention", "Stable Diffusion"]),
        (network([True] * 5), ["probe", "5 down stages", "no record", "SDXL"]),
        (network([True, True, True, False], downsample=[False, True, True, False]), ["no 3x3 stride-2 conv"]),
        (network([True, True, True, False], up_layers=[3, 3, 1, 3]), ["two attention layers"]),
        (network([True, True, True, False], up_layers=[3, 3, 4, 3]), ["layers where its down stage"]),
    ],
)
def test_refusals_name_what_was_found_and_what_to_do(net, words):
    with pytest.raises(UnsupportedModelError) as info:
        recognise(net)
    for word in words:
        assert word in str(info.value), (word, str(info.value))
    assert "Use a Stable Diffusion U-Net" in str(info.value)


# --------------------------------------------------------------------------- whole structure (issue 27)
def _refiner_like_upscaler():
    """The SD x4 upscaler as a host describes it: the refiner's stage count and first attention
    stage, but attention down to stage 3, cross-only blocks, 7 channels and class labels."""
    stages = tuple(Stage(64 * (k + 1), 2, k >= 1, k < 3, cross_only=k in (1, 2)) for k in range(4))
    return NetworkDescription(
        stages=stages,
        up_layers=(3, 3, 3, 3),
        up_cross_attention=(True, True, True, False),
        in_channels=7,
        cross_attention_dim=1024,
        name="upscaler",
        embedding="class",
    )


def test_the_x4_upscaler_layout_is_refused_with_every_difference_from_the_refiner():
    with pytest.raises(UnsupportedModelError) as info:
        recognise(_refiner_like_upscaler())
    assert str(info.value) == (
        "upscaler is not a network HiDiffusion knows: by its layout it is nearest the SDXL refiner (4 stages, "
        "cross-attention in the middle two), but it has cross-attention at down stages [1, 2, 3] where the SDXL "
        "refiner has it at [1, 2]; its transformer blocks at stages [1, 2] attend to the text in place of "
        "self-attention (as in the SD x4 upscaler), where MSW-MSA windows a self-attention; it takes 7 input "
        "channels where the SDXL refiner takes 4; its time embedding takes class labels where the SDXL refiner's "
        "takes a projected vector (as SDXL's pooled text and size ids). HiDiffusion's placement and presets are "
        "made for a family's whole structure, so it is not applied to this one. Use a Stable Diffusion U-Net "
        "(SD 1.x, SD 2.x, SDXL, SDXL Turbo or a fine-tune of one), or run this model without HiDiffusion."
    )


SD_FULL = dataclasses.replace(SD, embedding="")
SDXL_FULL = dataclasses.replace(SDXL, embedding="vector")
REFINER_FULL = dataclasses.replace(REFINER, embedding="vector")


def _cross_only(net, stage):
    stages = list(net.stages)
    stages[stage] = dataclasses.replace(stages[stage], cross_only=True)
    return dataclasses.replace(net, stages=tuple(stages))


@pytest.mark.parametrize(
    "net, words",
    [
        # one difference at a time from a family that otherwise matches
        (
            dataclasses.replace(SD_FULL, in_channels=7),
            "it takes 7 input channels where the SD 1.x/2.x takes 3, 4, 5, 8 or 9",
        ),
        (dataclasses.replace(SDXL_FULL, in_channels=5), "it takes 5 input channels where the SDXL takes 4, 8 or 9"),
        (dataclasses.replace(REFINER_FULL, in_channels=9), "it takes 9 input channels where the SDXL refiner takes 4"),
        (dataclasses.replace(SD_FULL, embedding="class"), "its time embedding takes class labels where"),
        (dataclasses.replace(SD_FULL, embedding="vector"), "its time embedding takes a projected vector"),
        (dataclasses.replace(SDXL_FULL, embedding=""), "takes nothing but the timestep where the SDXL's takes"),
        (dataclasses.replace(SDXL_FULL, embedding="image"), "its time embedding takes a 'image' embedding"),
        (_cross_only(SD_FULL, 1), "its transformer blocks at stages [1] attend to the text in place of self-attention"),
        (_cross_only(SDXL_FULL, 2), "its transformer blocks at stages [2] attend to the text"),
        (network([True, True, True, True]), "it has cross-attention at down stages [0, 1, 2, 3] where the SD 1.x/2.x"),
        (network([True, False, True, False]), "it has cross-attention at down stages [0, 2] where"),
        (network([False, True, True, True]), "it has cross-attention at down stages [1, 2, 3] where the SDXL refiner"),
        (
            dataclasses.replace(SD_FULL, up_cross_attention=(True, True, True, True)),
            "its up path has cross-attention at stages [0, 1, 2, 3] where the SD 1.x/2.x's has it at [1, 2, 3]",
        ),
    ],
)
def test_a_network_must_match_its_family_whole_structure(net, words):
    with pytest.raises(UnsupportedModelError) as info:
        recognise(net)
    assert words in str(info.value), str(info.value)
    assert str(info.value).endswith("or run this model without HiDiffusion.")


@pytest.mark.parametrize("channels", [3, 4, 5, 8, 9])
def test_every_sd_input_variant_is_recognised(channels):
    """Pixel space (the toy model), latents, depth-to-image, InstructPix2Pix, inpainting."""
    assert recognise(dataclasses.replace(SD_FULL, in_channels=channels)).family == "sd1"


def test_full_descriptions_of_the_families_are_recognised_and_unknown_parts_not_checked():
    assert [recognise(n).family for n in (SD_FULL, SDXL_FULL, REFINER_FULL)] == ["sd1", "sdxl", "sdxl-refiner"]
    assert recognise(dataclasses.replace(SDXL_FULL, in_channels=8)).family == "sdxl"
    # a host that does not say what the time embedding takes (None) is not refused for it
    assert recognise(dataclasses.replace(SD_FULL, embedding=None)).family == "sd1"


def test_other_attention_is_named():
    stages = tuple(Stage(64, 2, False, True, other_attention="added key/value cross-attention") for _ in range(4))
    net = dataclasses.replace(SD, stages=stages)
    with pytest.raises(UnsupportedModelError, match="added key/value cross-attention"):
        recognise(net)


def test_a_new_family_is_one_record():
    """The recipe of docs/architecture.md on a test-only family: a 5-stage U-Net with
    attention from stage 1 is refused until one record describes it, then planned."""
    five = network([False, True, True, True, False], width=512)
    with pytest.raises(UnsupportedModelError):
        recognise(five)
    record = ArchitectureRecord(
        "probe-5", "sd", num_stages=5, first_attention_stage=1, conv_offset=0, pool_offset=1, default_native=32
    )
    arch = recognise(five, REGISTRY + (record,))
    assert (arch.family, arch.conv_stage, arch.pool_stage, arch.window_stage, arch.native) == (
        "probe-5",
        1,
        2,
        1,
        (32, 32),
    )
    plan = plan_call(arch, (64, 64), HiDiffusionConfig(), Progress(0, 10))
    assert plan.preset == "sd-1024" and plan.conv and plan.windows
    # stage 1's downsampler strides by 4: 32 -> 8 (stock 16)
    assert plan.downsample_inputs[:3] == ((64, 64), (32, 32), (8, 8))


def test_feature_sizes_follow_the_real_layers():
    """Skip features in ControlNet residual order: conv_in, each layer, each downsampler."""
    for layers in (1, 2, 3):
        arch = recognise(network([True, True, True, False], layers=layers))
        skips, mid, adapter, inputs = feature_sizes(arch, (24, 40), conv=True, pool=True)
        assert len(skips) == 1 + 4 * layers + 3
        assert skips[0] == (24, 40)
        # stage 0 keeps 24x40, its downsampler strides by 4 (ceil): 6x10; stage 1 pools: 3x5
        assert skips[layers] == (24, 40) and skips[layers + 1] == (6, 10)
        assert skips[layers + 2] == (3, 5)
        assert inputs == ((24, 40), (3, 5), (2, 3)) and mid == (1, 2)
        assert adapter[-1] == mid and len(adapter) == 5
        assert arch.unpool_layer == layers - 1
        stock = feature_sizes(arch, (24, 40), conv=False, pool=False)
        assert stock[3] == ((24, 40), (12, 20), (6, 10))


def test_plan_follows_presets_and_native():
    arch = recognise(SD)
    config = HiDiffusionConfig()
    assert not plan_call(arch, (64, 64), config, Progress(0, 10)).active  # native: untouched
    assert plan_call(arch, (64, 64), HiDiffusionConfig(at_native="apply"), Progress(0, 10)).active
    big = [plan_call(arch, (256, 256), config, Progress(i, 10)) for i in range(10)]
    assert {p.preset for p in big} == {"sd-2048"}
    assert [p.conv for p in big] == [i < 7 for i in range(10)]
    assert [p.pool for p in big] == [i < 3 for i in range(10)]
    assert all(p.windows for p in big)
    off = plan_call(arch, (256, 256), HiDiffusionConfig(raunet=False), Progress(0, 10))
    assert not off.conv and not off.pool and off.windows and not off.resizes
    xl = recognise(SDXL)
    assert plan_call(xl, (256, 256), config, Progress(0, 4)).preset == "sdxl-turbo"
    gentle = plan_call(xl, (256, 256), config, Progress(0, 50), Task(inpainting=True))
    assert gentle.preset == "sdxl-2048-gentle" and gentle.pool and not gentle.conv


def test_plans_are_immutable():
    plan = plan_call(recognise(SD), (128, 128), HiDiffusionConfig(), Progress(0, 10))
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.conv = False  # type: ignore[misc]


def test_progress_from_sampled_sigmas():
    sigmas = [14.6, 7.0, 3.0, 1.0, 0.0]
    assert [progress_from_sigmas(s, sigmas).index for s in sigmas[:-1]] == [0, 1, 2, 3]
    assert progress_from_sigmas(7.0, sigmas).total == 4
    assert progress_from_sigmas(5.0, sigmas).index == 1  # a Heun-type second evaluation between levels
    assert progress_from_sigmas(20.0, sigmas) is None
    assert progress_from_sigmas(1.0, [1.0]) is None
    # a run from the middle of a schedule (img2img, KSamplerAdvanced start step) is its own step 0
    assert progress_from_sigmas(3.0, sigmas[2:]).index == 0
    assert position(5.0, [9.0, 5.0, 5.0, 1.0], after=2) == 2 and position(5.0, [9.0, 5.0, 5.0, 1.0]) == 1


def test_window_shifts_are_a_function_of_seed_step_and_layer():
    shifts = {ops.shift_for(seed, step, layer, 64, 64) for seed in range(4) for step in range(8) for layer in range(3)}
    assert len(shifts) == 4  # all four quarter shifts occur
    assert ops.shift_for(7, 3, 1, 64, 64) == ops.shift_for(7, 3, 1, 64, 64)
    draws = [ops.shift_for(7, s, 1, 64, 64) for s in range(16)]
    assert len(set(draws)) > 1  # the step changes the shift


def test_per_sample_windows_equal_each_sample_alone():
    x = torch.randn(3, 7 * 9, 5)
    shifts = [(1, 2), (0, 0), (3, 1)]
    win = ops.window_partition(x, 7, 9, shifts)
    assert win.key_bias is not None and win.tokens.shape == (12, 4 * 5, 5)
    for i, shift in enumerate(shifts):
        alone = ops.window_partition(x[i : i + 1], 7, 9, shift)
        assert torch.equal(alone.tokens, win.tokens[4 * i : 4 * i + 4])
    assert torch.equal(ops.window_merge(win.tokens, win), x)
    same = ops.window_partition(x, 7, 9, [(1, 2)] * 3)
    assert same.shift == (1, 2)  # equal shifts collapse to one
    with pytest.raises(ValueError, match="2 window shifts for a batch of 3"):
        ops.window_partition(x, 7, 9, [(0, 0), (1, 1)])


def test_image_seeds_follow_each_row():
    x = torch.randn(3, 4, 8, 8)
    seeds = ops.image_seeds(x)
    assert len(set(seeds)) == 3
    assert ops.image_seeds(x[1:2]) == [seeds[1]]
    assert ops.image_seeds(torch.cat([x, x])) == seeds + seeds  # [uncond, cond] rows share their image's seed
