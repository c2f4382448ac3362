"""RAU-Net's strided conv under ComfyUI's weight handling: LoRA weight patches and low-VRAM
(partially loaded, offloaded) models act inside it, through ComfyUI's own cast path on the
model's own module."""

from __future__ import annotations

import pytest
import torch
from comfytest import NATIVE, Recorder, build, sample

pytestmark = pytest.mark.patch_api

CONV_KEY = "diffusion_model.input_blocks.3.0.op.weight"  # SD 1.5 layout: the conv stage's downsampler


def _model(patcher, rec, lora: bool):
    from hidiff.comfy.patch import apply_hidiffusion

    model = apply_hidiffusion(patcher, recorder=rec, native=(NATIVE, NATIVE), window_attn=False)
    if lora:  # a LoRA-style delta on exactly the strided conv's weight, loaded after the node
        conv = patcher.model.diffusion_model.input_blocks[3][0].op
        model.add_patches({CONV_KEY: (torch.full_like(conv.weight, 0.05),)}, 1.0)
    return model


@pytest.fixture
def low_vram(monkeypatch):
    """Every model ComfyUI loads gets a 1-byte weight budget: its modules stay offloaded and cast
    per call (comfy_cast_weights), LoRA patches ride as weight functions (what --lowvram / a small
    GPU does; on this CPU-only machine ComfyUI would otherwise always load fully)."""
    import comfy.model_management as mm

    load = mm.LoadedModel.model_load

    def budget_of_one_byte(self, lowvram_model_memory=0, force_patch_weights=False):
        return load(self, 1, force_patch_weights=force_patch_weights)

    mm.unload_all_models()
    monkeypatch.setattr(mm.LoadedModel, "model_load", budget_of_one_byte)
    yield
    mm.unload_all_models()


def _spy_casts(monkeypatch, conv):
    """Record ComfyUI's casts of ``conv``: (weight functions on the module, cast weight - stored weight)."""
    import comfy.ops

    cast = comfy.ops.cast_bias_weight
    seen = []

    def spy(s, *args, **kwargs):
        out = cast(s, *args, **kwargs)
        if s is conv:
            seen.append((len(s.weight_function), bool(s.comfy_cast_weights), float((out[0] - s.weight).mean())))
        return out

    monkeypatch.setattr(comfy.ops, "cast_bias_weight", spy)
    return seen


def test_lora_on_the_strided_conv_acts_inside_raunet_on_a_fully_loaded_model():
    patcher, _ = build("sd15")
    rec = Recorder()
    with_lora = sample(_model(patcher, rec, lora=True), "sd15", (64, 64), steps=3)
    assert rec[0].conv_out == (16, 16) and rec[1].conv_out is None  # step 0 strided
    without = sample(_model(patcher, None, lora=False), "sd15", (64, 64), steps=3)
    assert float((with_lora - without).abs().max()) > 1e-3
    # the same delta with RAU-Net off changes the result otherwise: it acted in the strided call
    from hidiff.comfy.patch import apply_hidiffusion

    off = apply_hidiffusion(patcher, native=(NATIVE, NATIVE), raunet=False, window_attn=False)
    off.add_patches({CONV_KEY: (torch.full_like(patcher.model.state_dict()[CONV_KEY], 0.05),)}, 1.0)
    assert float((sample(off, "sd15", (64, 64), steps=3) - with_lora).abs().max()) > 1e-3


def test_offloaded_model_with_lora_runs_the_strided_conv_through_comfys_cast(low_vram, monkeypatch):
    """Low VRAM: the conv module is offloaded (cast per call) and the LoRA is a weight function on
    it. The strided call goes through comfy.ops.cast_bias_weight on the model's own module (one cast
    per step, the strided step included), gets the LoRA'd weight, and gives what the fully loaded
    model gives."""
    patcher, _ = build("sd15")
    conv = patcher.model.diffusion_model.input_blocks[3][0].op
    full = sample(_model(patcher, None, lora=True), "sd15", (64, 64), steps=3)
    import comfy.model_management as mm

    mm.unload_all_models()
    seen = _spy_casts(monkeypatch, conv)
    rec = Recorder()
    low = sample(_model(patcher, rec, lora=True), "sd15", (64, 64), steps=3)
    assert rec[0].conv_out == (16, 16)  # RAU-Net's strided conv ran in step 0
    assert len(seen) == 3  # steps 0 (strided, ours), 1 and 2 (ComfyUI's own forward)
    for functions, offloaded, delta in seen:
        assert functions == 1 and offloaded  # the LoRA as a low-VRAM weight function, module offloaded
        assert delta == pytest.approx(0.05, abs=1e-6)  # the cast weight carries the LoRA delta
    torch.testing.assert_close(low, full, rtol=0, atol=1e-5)
    assert conv.stride == (2, 2) and conv.padding == (1, 1)  # the module itself keeps its geometry
