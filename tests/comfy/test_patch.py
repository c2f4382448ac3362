"""The HiDiffusion patch on ComfyUI's own model classes and samplers (tiny random models, CPU)."""

from __future__ import annotations

import logging

import pytest
import torch
from comfytest import NATIVE, Recorder, build, conds, sample, seed_weights

from hidiff.core.architecture import UnsupportedModelError

pytestmark = pytest.mark.patch_api


def hidiffusion(patcher, recorder=None, **options):
    from hidiff.comfy.patch import apply_hidiffusion

    return apply_hidiffusion(patcher, recorder=recorder, native=(NATIVE, NATIVE), **options)


def test_unknown_layout_is_refused_with_a_clear_message():
    from hidiff.comfy.patch import apply_hidiffusion

    # Two levels only: no known family has that layout.
    patcher, _ = build(
        "sd15",
        channel_mult=[1, 2],
        num_res_blocks=[2, 2],
        transformer_depth=[1, 1, 0, 0],
        transformer_depth_output=[1, 1, 1, 0, 0, 0],
    )
    with pytest.raises(UnsupportedModelError, match=r"2 down stages with cross-attention at stages \[0\]"):
        apply_hidiffusion(patcher)


def test_sdxl_refiner_layout_runs():
    """4 levels with cross-attention in the middle two (the SDXL refiner's layout, at tiny width)."""
    patcher, _ = build("sdxl-refiner")
    rec = Recorder()
    out = sample(hidiffusion(patcher, rec, preset="sdxl-4096"), "sdxl-refiner", (64, 64), steps=4)
    assert torch.isfinite(out).all()
    r0 = rec[0]
    assert r0.plan.conv and r0.plan.pool and r0.pooled == ((32, 32), (16, 16)) and r0.conv_out == (4, 4)
    assert r0.window_maps == [(32, 32), (16, 16), (16, 16), (16, 16), (32, 32)]


def test_non_unet_model_is_refused_with_a_clear_message():
    from hidiff.comfy.patch import apply_hidiffusion

    patcher, _ = build("sd15")
    clone = patcher.clone()

    class FakeDiT(torch.nn.Module):
        pass

    class Holder:
        model = type("M", (), {"diffusion_model": FakeDiT(), "model_config": None})()

        def __getattr__(self, name):
            return getattr(clone, name)

    with pytest.raises(UnsupportedModelError, match="not a Stable Diffusion U-Net.*SD3, Flux"):
        apply_hidiffusion(Holder())


def test_bad_options_are_refused_before_the_model_is_touched():
    from hidiff.comfy.patch import apply_hidiffusion

    patcher, _ = build("sd15")
    before = dict(patcher.model_options["transformer_options"])
    with pytest.raises(ValueError, match="T2 must not be larger than T1"):
        apply_hidiffusion(patcher, t1_ratio=0.2, t2_ratio=0.5)
    with pytest.raises(ValueError, match="already applied"):
        apply_hidiffusion(apply_hidiffusion(patcher))
    assert patcher.model_options["transformer_options"] == before


# ------------------------------------------------------------------ what it does
@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_2x_shrinks_features_runs_windows_and_leaves_the_original_untouched(family):
    patcher, _ = build(family)
    first = sample(patcher, family, (64, 64), steps=5)
    rec = Recorder()
    patched = hidiffusion(patcher, rec)
    out = sample(patched, family, (64, 64), steps=5)
    assert out.shape == first.shape and torch.isfinite(out).all()
    assert [r.plan.step for r in rec] == [0, 1, 2, 3, 4] and all(r.plan.total == 5 for r in rec)
    r0 = rec[0]
    if family == "sd15":
        # sd-1024: stage 0's downsampler strides 4 (64 -> 16) for the first int(5 * 0.4) = 2 steps
        assert r0.plan.preset == "sd-1024" and r0.conv_out == (16, 16) and r0.skip_sizes[1] == (16, 16)
        assert [r.plan.conv for r in rec] == [True, True, False, False, False]
    else:
        # sdxl-2048: the pooled stage 1 (32 -> 16) until T1 = 2, grown back before output block 5
        assert (
            r0.plan.preset == "sdxl-2048" and r0.pooled == ((32, 32), (16, 16)) and r0.unpooled == ((16, 16), (32, 32))
        )
        assert [r.plan.pool for r in rec] == [True, True, False, False, False]
    assert all(r.window_calls == 5 for r in rec)
    for r in rec:
        maps = r.window_maps
        if family == "sd15":
            assert maps == [(64, 64)] * 5  # the windowed stage is never shrunk in SD
        elif r.plan.pool:  # SDXL pools inside the windowed stage: its second layer and the mirror run pooled
            assert maps == [(32, 32), (16, 16), (16, 16), (16, 16), (32, 32)]
        else:
            assert maps == [(32, 32)] * 5
    assert float((out - first).abs().max()) > 1e-3
    # The original MODEL after the patched one: bitwise its first result.
    again = sample(patcher, family, (64, 64), steps=5)
    assert torch.equal(again, first)
    assert "hidiff_call" not in str(patcher.model_options)


def test_at_or_below_native_does_nothing_bitwise():
    patcher, _ = build("sd15")
    first = sample(patcher, "sd15", (NATIVE, NATIVE - 8), steps=3, cfg=2.0)
    rec = Recorder()
    out = sample(hidiffusion(patcher, rec), "sd15", (NATIVE, NATIVE - 8), steps=3, cfg=2.0)
    assert rec == [] and torch.equal(out, first)


@pytest.mark.parametrize("family,preset", [("sd15", "sd-2048"), ("sdxl", "sdxl-4096")])
@pytest.mark.parametrize("hw", [(37, 53), (36, 52), (65, 33)])
def test_any_size_with_conv_and_pool_at_once(family, preset, hw):
    """Odd latents (ComfyUI accepts any multiple of 8 px): conv and pool active in the same step."""
    patcher, _ = build(family)
    rec = Recorder()
    out = sample(hidiffusion(patcher, rec, preset=preset, at_native="apply"), family, hw, steps=4)
    assert out.shape[-2:] == hw and torch.isfinite(out).all()
    r0 = rec[0]
    assert r0.plan.conv and r0.plan.pool
    ceil = lambda n, k: -(-n // k)  # noqa: E731
    if family == "sd15":
        assert r0.conv_out == (ceil(hw[0], 4), ceil(hw[1], 4))
        assert r0.pooled == ((ceil(hw[0], 4), ceil(hw[1], 4)), (ceil(hw[0], 8), ceil(hw[1], 8)))
        top = hw
    else:
        half = (ceil(hw[0], 2), ceil(hw[1], 2))
        assert r0.pooled == (half, (ceil(hw[0], 4), ceil(hw[1], 4)))
        assert r0.conv_out == (ceil(hw[0], 16), ceil(hw[1], 16))
        top = half
    assert r0.unpooled[1] == r0.pooled[0]
    # Windows ran on the top map: whole at first, pooled for the pooled block's mirror in SDXL.
    assert r0.window_calls == 5 and r0.window_maps[0] == top


def test_cfg_batches_and_split_calls_share_shifts_per_image():
    """cond and uncond rows of one image get the same shifts; images of a batch their own."""
    patcher, _ = build("sd15")
    rec = Recorder()
    sample(hidiffusion(patcher, rec), "sd15", (64, 64), steps=2, cfg=3.0, batch=2)
    # A call's shift is one (dy, dx) when every row has it, else one per row.
    per_rows = [s for r in rec for s in r.shifts if isinstance(s[0], tuple)]
    for per_row in per_rows:
        n = len(per_row)
        assert n in (2, 4)
        if n == 4:  # cond and uncond in one call: rows (img0, img1, img0, img1)
            assert per_row[0] == per_row[2] and per_row[1] == per_row[3]
    assert per_rows  # the two images are shifted differently somewhere


def test_window_seed_fixes_the_shifts_and_the_noise_decides_them_otherwise():
    patcher, _ = build("sd15")

    def shifts(seed, **options):
        rec = Recorder()
        sample(hidiffusion(patcher, rec, raunet=False, **options), "sd15", (64, 64), steps=3, seed=seed)
        return [s for r in rec for s in r.shifts]

    assert shifts(1, window_seed=5) == shifts(2, window_seed=5)
    assert shifts(1) == shifts(1) and shifts(1) != shifts(2)
    assert all(s == (0, 0) for s in shifts(1, window_shift="none"))


def test_ksampler_advanced_and_denoise_follow_the_sampled_sigmas():
    patcher, _ = build("sd15")
    rec = Recorder()
    model = hidiffusion(patcher, rec)
    sample(model, "sd15", (64, 64), steps=8, start_step=2, last_step=6)
    assert [(r.plan.step, r.plan.total) for r in rec] == [(i, 4) for i in range(4)]
    rec.clear()
    latent = torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(3))
    sample(model, "sd15", (64, 64), steps=5, denoise=0.5, latent_image=latent)
    assert [(r.plan.step, r.plan.total) for r in rec] == [(i, 5) for i in range(5)]
    assert rec[0].plan.conv  # img2img still starts with RAU-Net at its first sampled step


@pytest.mark.parametrize("sampler", ["heun", "dpmpp_2m", "euler_ancestral", "dpmpp_sde"])
def test_sampler_custom_with_any_sampler(sampler):
    import comfy.sample
    import comfy.samplers

    patcher, _ = build("sd15")
    rec = Recorder()
    model = hidiffusion(patcher, rec)
    sigmas = comfy.samplers.calculate_sigmas(patcher.get_model_object("model_sampling"), "karras", 4)
    noise = torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(0))
    pos, neg = conds("sd15", 512, 512)
    out = comfy.sample.sample_custom(
        model,
        noise,
        1.0,
        comfy.samplers.ksampler(sampler),
        sigmas,
        pos,
        neg,
        torch.zeros(1, 4, 64, 64),
        disable_pbar=True,
        seed=0,
    )
    assert torch.isfinite(out).all()
    steps = [r.plan.step for r in rec]
    assert steps == sorted(steps) and steps[0] == 0 and set(steps) <= {0, 1, 2, 3}
    if sampler == "heun":
        # Two calls per step but the last; the correction of step i is evaluated at sigma i+1,
        # which a call cannot tell from step i+1's first call: it runs with step i+1's plan.
        assert steps == [0, 1, 1, 2, 2, 3, 3]


def tiny_controlnet(unet_config):
    import inspect

    import comfy.cldm.cldm
    import comfy.controlnet
    import comfy.ops

    params = inspect.signature(comfy.cldm.cldm.ControlNet.__init__).parameters
    kwargs = {k: v for k, v in unet_config.items() if k in params and k not in ("dtype", "device", "operations")}
    model = comfy.cldm.cldm.ControlNet(
        hint_channels=3, operations=comfy.ops.disable_weight_init, device="cpu", **kwargs
    )
    seed_weights(model, 5)
    return comfy.controlnet.ControlNet(model, load_device=torch.device("cpu"), manual_cast_dtype=None)


# SD 1.5 at 4x is left out: its full-size ControlNet attends over 16k tokens unwindowed,
# about 3 minutes on this CPU; the SDXL layout's top attention stage is one level deeper.
@pytest.mark.parametrize("family, scale", [("sd15", 2), ("sdxl", 2), ("sdxl", 4)])
def test_controlnet_through_comfy_nodes_at_2x_and_4x(family, scale, caplog):
    import nodes

    patcher, unet_config = build(family)
    cnet = tiny_controlnet(unet_config)
    side = scale * NATIVE  # latent; 8 pixels per latent cell
    pos, neg = conds(family, 8 * side, 8 * side)
    image = torch.rand(1, 8 * side, 8 * side, 3, generator=torch.Generator().manual_seed(2))
    pos, neg = nodes.ControlNetApplyAdvanced().apply_controlnet(pos, neg, cnet, image, 1.0, 0.0, 1.0)
    rec = Recorder()
    with caplog.at_level(logging.WARNING):
        out = sample(hidiffusion(patcher, rec), family, (side, side), steps=4, cfg=2.0, positive=pos, negative=neg)
    assert "control could not be applied" not in caplog.text
    assert torch.isfinite(out).all()
    shrunk = [r for r in rec if r.plan.conv or r.plan.pool]
    assert shrunk
    for r in shrunk:
        assert r.residual_sizes["down"] == list(r.plan.skip_sizes)
        assert r.residual_sizes["mid"] == [r.plan.mid_size]
    # 4 steps: SDXL takes its few-step preset at any size; SD its 2x or 4x one
    expected = "sdxl-turbo" if family == "sdxl" else {2: "sd-1024", 4: "sd-2048"}[scale]
    assert {r.plan.preset for r in rec} == {expected}
    plain = sample(hidiffusion(patcher), family, (side, side), steps=4, cfg=2.0)
    assert float((plain - out).abs().max()) > 1e-3  # the ControlNet had an effect


def test_weight_patches_after_the_node_reach_the_strided_conv():
    """A LoRA loaded after HiDiffusion (LoraLoader: clone + add_patches) keeps HiDiffusion on, and
    its weight patch applies inside the strided conv."""
    patcher, _ = build("sd15")
    rec = Recorder()
    model = hidiffusion(patcher, rec, raunet=True, window_attn=False)
    base = sample(model, "sd15", (64, 64), steps=3)
    lora = model.clone()
    key = "diffusion_model.input_blocks.3.0.op.weight"
    weight = patcher.model.state_dict()[key]
    lora.add_patches({key: (torch.ones_like(weight) * 0.05,)}, 1.0)
    rec.clear()
    changed = sample(lora, "sd15", (64, 64), steps=3)
    assert rec and rec[0].conv_out == (16, 16)  # still HiDiffusion on the LoRA'd clone
    assert float((changed - base).abs().max()) > 1e-3
    assert torch.equal(sample(model, "sd15", (64, 64), steps=3), base)
    # The LoRA's delta really goes through the strided conv: with only that weight patched,
    # a run where the conv stage is never strided differs from one where it is.
    off = sample(
        hidiffusion(_lora_only(patcher, key, weight), None, raunet=False, window_attn=False), "sd15", (64, 64), steps=3
    )
    assert float((off - changed).abs().max()) > 1e-3


def _lora_only(patcher, key, weight):
    m = patcher.clone()
    m.add_patches({key: (torch.ones_like(weight) * 0.05,)}, 1.0)
    return m


def test_t2i_adapter_residuals_are_resized_at_2x(caplog):
    """A T2I-Adapter through ComfyUI's Apply ControlNet node: its per-block residuals
    (``control["input"]``) land on the RAU-Net-shrunk features."""
    import comfy.controlnet
    import nodes
    from comfy.t2i_adapter.adapter import Adapter

    patcher, _ = build("sd15")
    adapter = Adapter(channels=[32, 64, 64, 64], nums_rb=2, cin=3 * 64, ksize=1, sk=True, use_conv=False, xl=False)
    seed_weights(adapter, 6)
    t2i = comfy.controlnet.T2IAdapter(adapter, 3, 8, "nearest-exact", device=torch.device("cpu"))
    pos, neg = conds("sd15", 512, 512)
    image = torch.rand(1, 512, 512, 3, generator=torch.Generator().manual_seed(2))
    pos, neg = nodes.ControlNetApplyAdvanced().apply_controlnet(pos, neg, t2i, image, 1.0, 0.0, 1.0)
    rec = Recorder()
    with caplog.at_level(logging.WARNING):
        out = sample(hidiffusion(patcher, rec), "sd15", (64, 64), steps=3, cfg=2.0, positive=pos, negative=neg)
    assert "control could not be applied" not in caplog.text
    assert torch.isfinite(out).all()
    r0 = rec[0]
    assert r0.plan.conv
    sizes = r0.residual_sizes["adapter"]
    n = len(sizes)
    for j, size in enumerate(sizes):
        if size is not None:
            assert size == r0.plan.skip_sizes[n - 1 - j]
    assert (16, 16) in sizes  # the stage after the strided conv got a shrunk residual
    plain = sample(hidiffusion(patcher), "sd15", (64, 64), steps=3, cfg=2.0)
    assert float((plain - out).abs().max()) > 1e-3


def test_lora_before_or_after_the_node_gives_the_same_result():
    patcher, _ = build("sd15")
    key = "diffusion_model.input_blocks.3.0.op.weight"
    delta = torch.ones_like(patcher.model.state_dict()[key]) * 0.05
    before = patcher.clone()
    before.add_patches({key: (delta,)}, 1.0)
    rec = Recorder()
    first = sample(hidiffusion(before, rec), "sd15", (64, 64), steps=3)
    after = hidiffusion(patcher, rec).clone()
    after.add_patches({key: (delta,)}, 1.0)
    second = sample(after, "sd15", (64, 64), steps=3)
    assert torch.equal(first, second)
    assert [r.conv_out for r in rec] == [(16, 16), None, None] * 2


@pytest.mark.parametrize("family,preset", [("sd15", "sd-1024"), ("sdxl", "sdxl-2048-gentle")])
def test_inpainting_model_with_a_mask(family, preset):
    """A 9-channel (inpainting) U-Net samples with a mask; SDXL inpainting gets the gentle preset."""
    patcher, _ = build(family, in_channels=9)
    rec = Recorder()
    latent = torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., 16:48, 16:48] = 1.0
    import comfy.sample

    noise = comfy.sample.prepare_noise(latent, 3)
    pos, neg = conds(family, 512, 512)
    out = comfy.sample.sample(
        hidiffusion(patcher, rec),
        noise,
        5,
        1.0,
        "euler",
        "normal",
        pos,
        neg,
        latent,
        noise_mask=mask,
        disable_pbar=True,
        seed=3,
    )
    assert torch.isfinite(out).all()
    assert rec[0].plan.preset == preset and (rec[0].plan.conv or rec[0].plan.pool)
    if family == "sdxl":
        assert rec[0].plan.pool  # gentle: pooling from the first step


def test_sd2_v_prediction_model_samples_with_the_node():
    """An SD 2.x v-prediction model (native 768 px): ComfyUI's v-prediction sampling with the node on."""
    patcher, _ = build("sd2", model_type="V_PREDICTION")
    rec = Recorder()
    out = sample(hidiffusion(patcher, rec), "sd2", (64, 64), steps=3)
    assert torch.isfinite(out).all()
    assert rec[0].plan.preset == "sd-1024" and rec[0].conv_out == (16, 16) and rec[0].window_calls == 5


def test_every_sampler_and_scheduler_comfyui_ships():
    """Every KSampler sampler and scheduler of this ComfyUI runs with the node; the first call
    is step 0 with the strided conv on, and the steps follow the schedule."""
    import comfy.samplers

    patcher, _ = build("sd15")
    model = None
    failures = []
    for sampler in comfy.samplers.KSampler.SAMPLERS:
        rec = Recorder()
        model = hidiffusion(patcher, rec)
        try:
            out = sample(model, "sd15", (40, 40), steps=4, cfg=2.0, sampler=sampler, scheduler="karras")
        except Exception as e:  # collect them all, then fail with the list
            failures.append(f"{sampler}: {type(e).__name__}: {e}")
            continue
        steps = [r.plan.step for r in rec]
        if not torch.isfinite(out).all() or not rec or steps[0] != 0 or not rec[0].plan.conv:
            failures.append(f"{sampler}: steps {steps}")
        # dpm_fast and dpm_adaptive choose their own noise levels between the first and the last
        # sigma: their calls land on the steps whose intervals hold them (never past the last).
        elif not set(steps) <= {0, 1, 2, 3} or (sampler not in ("dpm_fast", "dpm_adaptive") and steps[-1] != 3):
            failures.append(f"{sampler}: steps {steps}")
    for scheduler in comfy.samplers.KSampler.SCHEDULERS:
        rec = Recorder()
        out = sample(hidiffusion(patcher, rec), "sd15", (40, 40), steps=4, scheduler=scheduler)
        if [r.plan.step for r in rec] != [0, 1, 2, 3] or not torch.isfinite(out).all():
            failures.append(f"scheduler {scheduler}: steps {[r.plan.step for r in rec]}")
    assert not failures, failures
