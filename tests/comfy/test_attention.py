"""Where HiDiffusion replaces ComfyUI's self-attention, and what its replacement passes on."""

from __future__ import annotations

import pytest
from comfytest import NATIVE, Recorder, build, sample

pytestmark = pytest.mark.patch_api


def hidiffusion(patcher, recorder=None, **options):
    from hidiff.comfy.patch import apply_hidiffusion

    return apply_hidiffusion(patcher, recorder=recorder, native=(NATIVE, NATIVE), **options)


@pytest.fixture
def replaced(monkeypatch):
    """The layer keys HiDiffusion's attn1 replacement ran on, per call (ComfyUI's own path is not seen)."""
    from hidiff.comfy import patch

    calls = []
    attn1 = patch.HiDiffusionPatch.attn1

    def spy(self, q, k, v, extra_options, route=None):
        block = extra_options["block"]
        calls.append((block[0], block[1], extra_options.get("block_index", 0)))
        return attn1(self, q, k, v, extra_options, route)

    monkeypatch.setattr(patch.HiDiffusionPatch, "attn1", spy)
    return calls


@pytest.mark.parametrize(
    "latent,options,expect",
    [
        ((64, 64), {}, "windowed"),  # 2x: windows every step
        ((32, 32), {}, "none"),  # native size: the plan does nothing, ComfyUI's attention everywhere
        ((64, 64), {"window_attn": False}, "none"),  # RAU-Net only: attention untouched
        ((64, 64), {"window_attn": False, "kv_downsample": 2}, "windowed"),  # kv on the top stage
        ((64, 64), {"window_attn": False, "kv_downsample": 2, "kv_levels": 2}, "windowed+deep"),
    ],
)
def test_attention_is_replaced_only_on_the_layers_the_plan_changes(replaced, latent, options, expect):
    patcher, _ = build("sd15")
    model = hidiffusion(patcher, **options)
    blocks = model.hidiffusion.network.blocks
    # nothing is registered on the model itself: the replacement is put on per call
    assert not model.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn1")
    sample(model, "sd15", latent, steps=2)
    layers = {"none": set(), "windowed": set(blocks.windowed), "windowed+deep": {*blocks.windowed, *blocks.kv_deep}}
    assert set(replaced) == layers[expect]
    assert len(replaced) == 2 * len(layers[expect])  # once per layer and step (cfg 1: one call per step)


def test_transformer_options_and_per_layer_keywords_reach_comfys_attention():
    """The windowed attention calls ComfyUI's attention function the way the layer itself does:
    with transformer_options (so an optimized_attention_override set on the model sees them) and
    with the layer's own per-layer keywords (a preferred_attention attribute on its attn1)."""
    patcher, _ = build("sd15")
    from hidiff.comfy.patch import _attn1_module

    windowed = hidiffusion(patcher).hidiffusion.network.blocks.windowed
    marked = windowed[0]
    module = _attn1_module(patcher.model.diffusion_model, marked)
    module.preferred_attention = "pytorch-for-this-layer"
    try:
        model = hidiffusion(patcher)
        seen = []

        def override(func, q, k, v, heads, *args, **kwargs):
            seen.append((int(q.shape[0]), kwargs.pop("preferred_attention", None)))
            return func(q, k, v, heads, *args, **kwargs)

        model.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = override
        rec = Recorder()
        model.hidiffusion.recorder = rec
        sample(model, "sd15", (64, 64), steps=1)
    finally:
        del module.preferred_attention
    assert rec and rec[0].windows  # windows ran
    windowed_calls = [s for s in seen if s[0] == 4]  # one image in 2x2 windows
    assert len(windowed_calls) == len(windowed)
    assert [p for _, p in windowed_calls].count("pytorch-for-this-layer") == 1
    assert any(b == 1 for b, _ in seen)  # other layers: ComfyUI's own attention, same override


def test_a_later_attn1_replacement_on_a_windowed_layer_runs_inside_the_windows():
    """Another patch's attn1 replacement registered after the node on a layer HiDiffusion windows
    is found per call and runs on the windows (it used to replace HiDiffusion's silently)."""
    patcher, _ = build("sd15")
    patched = hidiffusion(patcher)
    key = patched.hidiffusion.network.blocks.windowed[0]
    model = patched.clone()
    shapes = []

    def other(q, k, v, extra_options):
        from comfy.ldm.modules.attention import optimized_attention

        shapes.append(tuple(q.shape))
        return optimized_attention(q, k, v, extra_options["n_heads"])

    model.set_model_attn1_replace(other, *key)
    sample(model, "sd15", (64, 64), steps=1)
    assert shapes and all(s[0] == 4 for s in shapes)  # 2x2 windows of one image
    assert shapes[0][1] == (64 * 64) // 4  # a quarter of the 64x64 top-stage tokens each


def test_another_attn1_replacement_at_an_odd_size_is_refused_before_sampling():
    """An odd top-stage map needs masked windows, which another patch's attn1 replacement cannot
    take: refused when sampling starts, before any U-Net call, naming the patch and the fix."""
    from hidiff.comfy.patch import CompositionError

    def other(q, k, v, extra_options):
        from comfy.ldm.modules.attention import optimized_attention

        return optimized_attention(q, k, v, extra_options["n_heads"])

    patcher, _ = build("sd15")
    calls = []
    patched = hidiffusion(patcher, calls.append)
    model = patched.clone()
    model.set_model_attn1_replace(other, *patched.hidiffusion.network.blocks.windowed[0])
    with pytest.raises(CompositionError, match=r"65x65 top-stage map needs masked windows.*other.*even"):
        sample(model, "sd15", (65, 65), steps=1)
    assert calls == []
    rec = Recorder()
    sample(hidiffusion(patcher, rec), "sd15", (65, 65), steps=1)  # alone, masked windows run
    assert rec[0].windows
