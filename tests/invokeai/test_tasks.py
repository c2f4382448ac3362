"""The node's denoise path in InvokeAI's own pipeline for the tasks InvokeAI runs: ControlNet
(both treatments), inpainting, SDXL, and the models HiDiffusion is not for."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest
import torch
from invoketest import NATIVE_LATENT, ROOT

from hidiff.core.config import HiDiffusionConfig

sys.path.insert(0, str(ROOT / "tools"))
import invokeai_builtin as harness  # noqa: E402

TWO_X = (2 * NATIVE_LATENT, 2 * NATIVE_LATENT)


def hooks(module: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


def run(unet, scheduler, steps=5, **kwargs):
    reports: list = []
    out = harness.denoise(
        "hidiff",
        unet,
        scheduler,
        1,
        kwargs.pop("hw", TWO_X),
        steps,
        config=kwargs.pop("config"),
        reports=reports,
        **kwargs,
    )
    return out, reports[0]


@pytest.mark.parametrize("mode", ["resize", "native"])
def test_controlnet_as_invokeai_runs_it(mode):
    from invokeai.backend.stable_diffusion.diffusers_pipeline import ControlNetData
    from invokeai.backend.util.hotfixes import ControlNetModel  # the class InvokeAI loads ControlNets as

    unet, scheduler = harness.tiny_unet_and_scheduler(NATIVE_LATENT)
    torch.manual_seed(1)
    keys = ("down_block_types", "block_out_channels", "cross_attention_dim", "attention_head_dim", "norm_num_groups")
    controlnet = ControlNetModel(
        **{k: unet.config[k] for k in keys}, conditioning_embedding_out_channels=(8, 16, 16, 16)
    ).eval()
    with torch.no_grad():  # the residual convs start at zero: give them weights
        for parameter in controlnet.parameters():
            parameter.add_(0.02 * torch.randn_like(parameter))
    image = torch.rand(1, 3, 8 * TWO_X[0], 8 * TWO_X[1], generator=torch.Generator().manual_seed(2))
    control = [
        ControlNetData(  # every field given: its defaults are pydantic FieldInfo objects
            model=controlnet,
            image_tensor=torch.cat([image] * 2),  # CFG: as InvokeAI prepares it
            weight=1.0,
            begin_step_percent=0.0,
            end_step_percent=1.0,
            control_mode="balanced",
            resize_mode="just_resize",
        )
    ]
    before = harness.model_state(controlnet)
    seen: list = []
    # the sample the ControlNet really runs on (after hidiff's own pre-hook on the ControlNet)
    probe = controlnet.conv_in.register_forward_pre_hook(lambda m, a: seen.append(tuple(a[0].shape[-2:])))
    try:
        config = HiDiffusionConfig(controlnet=mode)
        out, report = run(unet, scheduler, config=config, control_data=control)
        plain_control, _ = run(unet, scheduler, config=config)
    finally:
        probe.remove()
    assert torch.isfinite(out).all() and (out - plain_control).abs().max() > 1e-3, "the ControlNet was ignored"
    assert report.summary()["conv_steps"] == [0, 1]  # t1 0.4 of 5 steps
    if mode == "resize":
        assert seen == [TWO_X] * 5  # full size; its residuals resized to the U-Net's features
    else:
        # the published treatment: native size for the first 0.6 of the steps, then a minimal call ignored
        assert seen == [(NATIVE_LATENT, NATIVE_LATENT)] * 3 + [(8, 8)] * 2
    assert harness.leftovers(before, harness.model_state(controlnet)) == {} and hooks(controlnet) == 0


def test_inpainting_is_the_inpaint_task():
    unet, scheduler = harness.tiny_unet_and_scheduler(NATIVE_LATENT)
    mask = torch.zeros(1, 1, *TWO_X)
    mask[..., : TWO_X[0] // 2, :] = 1.0
    image = harness.noise_of(7, *TWO_X)
    before = harness.model_state(unet)
    out, report = run(unet, scheduler, config=HiDiffusionConfig(), mask=mask, start_latents=image)
    summary = report.summary()
    assert summary["task"] == "inpaint" and summary["preset"] == "sd-1024" and torch.isfinite(out).all()
    assert harness.leftovers(before, harness.model_state(unet)) == {}


def sdxl_parts():
    unet, scheduler = harness.tiny_sdxl_and_scheduler(NATIVE_LATENT)
    return unet, scheduler, harness.sdxl_conditioning(unet, TWO_X)


@pytest.mark.parametrize(
    "task, preset, conv, pool",
    [("text2img", "sdxl-2048", [0], [1, 2, 3]), ("inpaint", "sdxl-2048-gentle", [], [0, 1, 2, 3])],
)
def test_sdxl_text_to_image_and_inpainting_follow_their_presets(task, preset, conv, pool):
    unet, scheduler, conditioning_data = sdxl_parts()
    extra = {}
    if task == "inpaint":
        extra = {"mask": torch.ones(1, 1, *TWO_X), "start_latents": harness.noise_of(7, *TWO_X)}
    before = harness.model_state(unet)
    out, report = run(
        unet, scheduler, steps=10, config=HiDiffusionConfig(), conditioning_data=conditioning_data, **extra
    )
    summary = report.summary()
    # 10 steps: A = int(10 x 8/50) = 1, T1 = int(10 x 0.4) = 4
    assert (summary["family"], summary["task"], summary["preset"]) == ("sdxl", task, preset)
    assert summary["conv_steps"] == conv and summary["pool_steps"] == pool and torch.isfinite(out).all()
    assert harness.leftovers(before, harness.model_state(unet)) == {}


def test_a_unet_hidiffusion_is_not_for_is_refused_untouched():
    from hidiff import UnsupportedModelError
    from hidiff.diffusers.testing import make_unet, tiny_unet_config

    two_levels = tiny_unet_config(
        "sd15",
        sample_size=NATIVE_LATENT,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64),
    )
    unet = make_unet(two_levels)
    _, scheduler = harness.tiny_unet_and_scheduler(NATIVE_LATENT)
    before = harness.model_state(unet)
    with pytest.raises(UnsupportedModelError):
        run(unet, scheduler, config=HiDiffusionConfig())
    assert harness.leftovers(before, harness.model_state(unet)) == {} and hooks(unet) == 0


def test_the_node_refuses_a_model_base_hidiffusion_is_not_for():
    from invokeai.backend.model_manager.taxonomy import BaseModelType

    from hidiff.invokeai.nodes import HiDiffusionDenoiseLatentsInvocation

    node = HiDiffusionDenoiseLatentsInvocation.model_construct(
        unet=SimpleNamespace(unet=SimpleNamespace(base=BaseModelType.Flux))
    )
    with pytest.raises(
        ValueError, match="HiDiffusion is for SD 1.x, SD 2.x and SDXL U-Nets; this model's base is 'flux'"
    ):
        node.invoke(context=None)


def test_a_lora_on_the_strided_conv_acts_under_rau_net():
    """InvokeAI patches LoRA weights onto the cached U-Net around the denoise; RAU-Net's strided
    conv (the stage's own downsampler, run with another stride) uses the patched weight."""
    from invokeai.backend.patches.layer_patcher import LayerPatcher
    from invokeai.backend.patches.layers.full_layer import FullLayer
    from invokeai.backend.patches.model_patch_raw import ModelPatchRaw

    unet, scheduler = harness.tiny_unet_and_scheduler(NATIVE_LATENT)
    conv = unet.down_blocks[0].downsamplers[0].conv
    diff = 0.05 * torch.randn(conv.weight.shape, generator=torch.Generator().manual_seed(8))
    lora = ModelPatchRaw({"lora_unet_down_blocks.0.downsamplers.0.conv": FullLayer(diff.clone(), None)})
    before = harness.model_state(unet)
    config = HiDiffusionConfig()
    # direct patching: InvokeAI's choice for a model wholly on its device (sidecar wrappers need the
    # custom layers its model loader installs, for partly loaded or quantized models)
    with LayerPatcher.apply_smart_model_patches(
        model=unet, patches=[(lora, 1.0)], prefix="lora_unet_", dtype=torch.float32, force_direct_patching=True
    ):
        patched, report = run(unet, scheduler, config=config)
    assert report.summary()["conv_steps"] == [0, 1]
    assert harness.leftovers(before, harness.model_state(unet)) == {}
    without, _ = run(unet, scheduler, config=config)
    with torch.no_grad():
        conv.weight.add_(diff)  # the same LoRA, merged by hand
    try:
        merged, _ = run(unet, scheduler, config=config)
    finally:
        with torch.no_grad():
            conv.weight.sub_(diff)
    assert (patched - without).abs().max() > 1e-3, "the LoRA was ignored"
    assert torch.allclose(patched, merged, atol=1e-5, rtol=0), (patched - merged).abs().max()


def test_sd2_v_prediction_runs_rau_net_and_windows_on_the_steps_of_its_preset():
    """SD 2.x's layout (linear projections, per-stage head dims) with a v-prediction Euler, as
    InvokeAI loads an SD 2.x-v model: the same schedule as the SD 1.x preset at 2x native, and the
    cached U-Net as it was after the run."""
    from diffusers import EulerDiscreteScheduler

    from hidiff.diffusers.testing import tiny_components

    parts = tiny_components("sd21-768", sample_size=NATIVE_LATENT)
    unet = parts["unet"]
    scheduler = EulerDiscreteScheduler.from_config(parts["scheduler"].config, use_karras_sigmas=False)
    assert scheduler.config.prediction_type == "v_prediction" and unet.config.use_linear_projection
    before = harness.model_state(unet)
    out, report = run(unet, scheduler, steps=10, config=HiDiffusionConfig())
    summary = report.summary()
    # 10 steps at 2x native: the sd-1024 preset, T1 = int(10 x 0.4) = 4: conv on steps 0-3, windows on all
    assert summary["preset"] == "sd-1024" and summary["conv_steps"] == [0, 1, 2, 3]
    assert summary["window_steps"] == list(range(10)) and torch.isfinite(out).all()
    assert harness.leftovers(before, harness.model_state(unet)) == {}
