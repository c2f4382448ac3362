"""Every model patch ComfyUI ships that touches the U-Net, with the HiDiffusion node before or after
it: either both act and the composition is what each test says is right, or the node refuses,
naming both patches and what to do, before the sampler makes a U-Net call."""

from __future__ import annotations

import pytest
import torch
from comfytest import NATIVE, Recorder, build, sample

pytestmark = pytest.mark.patch_api


def hidiffusion(model, rec=None, **options):
    from hidiff.comfy.patch import apply_hidiffusion

    return apply_hidiffusion(model, recorder=rec, native=(NATIVE, NATIVE), **options)


def run_node(cls, *args):
    """A ComfyUI node's first output, V1 (FUNCTION) or V3 (execute) alike."""
    if hasattr(cls, "execute") and not hasattr(cls, "FUNCTION"):
        return cls.execute(*args).result[0]
    return getattr(cls(), cls.FUNCTION)(*args)[0]


def in_order(other, patcher, order, rec=None, **options):
    """``other`` then HiDiffusion ("other-first"), or HiDiffusion then ``other`` ("hidiff-first")."""
    if order == "other-first":
        return hidiffusion(other(patcher), rec, **options)
    return other(hidiffusion(patcher, rec, **options))


def freeu(model):
    from comfy_extras.nodes_freelunch import FreeU

    return run_node(FreeU, model, 1.1, 1.2, 0.9, 0.2)


def freeu_v2(model):
    from comfy_extras.nodes_freelunch import FreeU_V2

    return run_node(FreeU_V2, model, 1.3, 1.4, 0.9, 0.2)


def sag(model):
    from comfy_extras.nodes_sag import SelfAttentionGuidance

    return run_node(SelfAttentionGuidance, model, 0.5, 2.0)


def pag(model):
    from comfy_extras.nodes_pag import PerturbedAttentionGuidance

    return run_node(PerturbedAttentionGuidance, model, 3.0)


def deep_shrink(model):
    from comfy_extras.nodes_model_downscale import PatchModelAddDownscale

    return run_node(PatchModelAddDownscale, model, 3, 2.0, 0.0, 0.35, True, "bicubic", "bicubic")


def hypertile(model):
    from comfy_extras.nodes_hypertile import HyperTile

    return run_node(HyperTile, model, 256, 2, 0, False)


def tome(model):
    from comfy_extras.nodes_tomesd import TomePatchModel

    return run_node(TomePatchModel, model, 0.3)


def v_prediction_zsnr(model):
    from comfy_extras.nodes_model_advanced import ModelSamplingDiscrete

    return run_node(ModelSamplingDiscrete, model, "v_prediction", True)


COMPOSING = {"freeu": freeu, "freeu_v2": freeu_v2, "sag": sag, "pag": pag}


@pytest.mark.parametrize("order", ["other-first", "hidiff-first"])
@pytest.mark.parametrize("other", list(COMPOSING))
def test_guidance_and_feature_patches_compose(other, order):
    """FreeU, FreeU_V2, SAG and PAG act on features or guidance HiDiffusion leaves alone (output
    block channels and skips at their own size, the middle block's attention): right means both
    act (HiDiffusion's record as alone, the result differs from HiDiffusion alone), in either order,
    with the same HiDiffusion record."""
    patcher, _ = build("sd15")
    cfg = 2.0  # SAG and PAG act through guidance
    alone_rec, rec = Recorder(), Recorder()
    alone = sample(hidiffusion(patcher, alone_rec), "sd15", (64, 64), steps=3, cfg=cfg)
    patch = COMPOSING[other]
    model = in_order(patch, patcher, order, rec)
    out = sample(model, "sd15", (64, 64), steps=3, cfg=cfg)
    assert torch.isfinite(out).all() and out.shape == alone.shape
    assert rec[0].plan.conv and rec[0].window_calls == 5  # HiDiffusion acted ...
    # ... as it does alone, step by step (SAG and PAG add model calls of their own in a step)
    alone_steps = {r.plan.step: (r.conv_out, r.pooled, r.unpooled) for r in alone_rec}
    assert {r.plan.step: (r.conv_out, r.pooled, r.unpooled) for r in rec} == alone_steps
    assert float((out - alone).abs().max()) > 1e-4  # ... and so did the other patch


@pytest.mark.parametrize("order", ["other-first", "hidiff-first"])
def test_output_block_patches_see_the_map_at_its_skip_size_in_either_order(order):
    """While RAU-Net pools, HiDiffusion's unpool runs before every other output-block patch of the
    call, so they see h and the skip at equal sizes, as on a U-Net without RAU-Net; and a patch
    returning hsp=None (it joined the skip itself, as SUPIR's in newer ComfyUI) is fine after it."""
    patcher, _ = build("sd15")
    seen = []

    def other(h, hsp, transformer_options):
        seen.append((tuple(h.shape[-2:]), tuple(hsp.shape[-2:])))
        return h, hsp

    def add_other(model):
        m = model.clone()
        m.set_model_output_block_patch(other)
        return m

    rec = Recorder()
    model = in_order(add_other, patcher, order, rec, preset="sd-2048")  # conv and pool together early
    sample(model, "sd15", (64, 64), steps=4)
    assert any(r.unpooled for r in rec)  # RAU-Net pooled and grew back in this run
    assert seen and all(h == s for h, s in seen)


def test_unpool_takes_its_size_from_the_plan_when_an_earlier_patch_returned_no_skip():
    """An output-block patch that returned hsp=None before HiDiffusion's (newer ComfyUI allows it):
    the unpool grows h to the skip size the plan says."""
    from hidiff.comfy.patch import _CALL_KEY, CallState

    patcher, _ = build("sd15")
    model = hidiffusion(patcher, preset="sd-2048")
    patch = model.hidiffusion
    schedule = torch.linspace(14.6, 0.0, 11)
    x = torch.zeros(1, 4, 64, 64)
    plans = [patch.plan(x, {"sigmas": sigma[None], "sample_sigmas": schedule}, None) for sigma in schedule[:-1]]
    plan = next(p for p in plans if p.pool)
    options = {_CALL_KEY: {patch.key: CallState(plan=plan, seeds=[0], record=None)}}
    block = patch.network.blocks.unpool_block
    h = torch.randn(1, 64, 4, 4)
    grown, hsp = patch.output_block(h, None, {**options, "block": ("output", block)})
    skips = plan.skip_sizes
    assert hsp is None and tuple(grown.shape[-2:]) == tuple(skips[len(skips) - 1 - block]) != (4, 4)


@pytest.mark.parametrize("order", ["other-first", "hidiff-first"])
def test_deep_shrink_with_raunet_is_refused_before_sampling_and_composes_without_it(order):
    """Deep Shrink and RAU-Net shrink the same early features to the same end: refused naming both
    and the fix, before any U-Net call; with raunet off (windows only) both act."""
    from hidiff.comfy.patch import CompositionError

    patcher, _ = build("sd15")
    calls = []
    with pytest.raises(CompositionError, match=r"RAU-Net and Deep Shrink \(PatchModelAddDownscale\).*turn raunet off"):
        sample(in_order(deep_shrink, patcher, order, calls.append), "sd15", (64, 64), steps=3)
    assert calls == []  # no U-Net call was made
    rec = Recorder()
    plain = sample(hidiffusion(patcher, raunet=False), "sd15", (64, 64), steps=3)
    out = sample(in_order(deep_shrink, patcher, order, rec, raunet=False), "sd15", (64, 64), steps=3)
    assert rec[0].windows and float((out - plain).abs().max()) > 1e-4


def deep_shrink_before_skip(model):
    from comfy_extras.nodes_model_downscale import PatchModelAddDownscale

    return run_node(PatchModelAddDownscale, model, 3, 2.0, 0.0, 0.35, False, "bicubic", "bicubic")


@pytest.mark.parametrize("order", ["other-first", "hidiff-first"])
def test_a_resizer_the_options_do_not_show_is_refused_at_its_first_call_naming_it(order):
    """Deep Shrink with "downscale after skip" off resizes through ``input_block_patch`` (which other
    patches use too, so it is not refused up front): the first call where a downsampler meets a map
    of another size than the plan's is refused, naming the patch, before that downsampler runs."""
    from hidiff.core.compose import CompositionError

    patcher, _ = build("sd15")
    calls = []
    with pytest.raises(
        CompositionError,
        match=r"RAU-Net and Deep Shrink \(PatchModelAddDownscale\) both resize.*stage 1's downsampler met a 8x8 map "
        r"where the U-Net makes 16x16.*turn raunet off on the HiDiffusion node",
    ):
        sample(in_order(deep_shrink_before_skip, patcher, order, calls.append), "sd15", (64, 64), steps=3)
    assert calls == []  # the first call's record never completed: refused inside it
    rec = Recorder()
    plain = sample(hidiffusion(patcher, raunet=False), "sd15", (64, 64), steps=3)
    out = sample(in_order(deep_shrink_before_skip, patcher, order, rec, raunet=False), "sd15", (64, 64), steps=3)
    assert rec[0].windows and float((out - plain).abs().max()) > 1e-4


@pytest.mark.parametrize("order", ["other-first", "hidiff-first"])
@pytest.mark.parametrize("other,name", [(hypertile, "HyperTile"), (tome, r"ToMe \(TomePatchModel\)")])
def test_token_layout_patches_are_refused_with_windows_and_compose_with_raunet_alone(other, name, order):
    """HyperTile (tiles tokens) and ToMe (merges tokens) change the self-attention's token layout,
    which the windows and kv downsampling also rearrange: refused naming both and the fix before
    any U-Net call; with window_attn off and kv_downsample 1 both act."""
    from hidiff.comfy.patch import CompositionError

    patcher, _ = build("sd15")
    calls = []
    for options in ({}, {"window_attn": False, "kv_downsample": 2}):
        with pytest.raises(CompositionError, match=rf"HiDiffusion's .* and {name} both rearrange.*window_attn off"):
            sample(in_order(other, patcher, order, calls.append, **options), "sd15", (64, 64), steps=3)
    assert calls == []
    rec = Recorder()
    alone = sample(hidiffusion(patcher, window_attn=False), "sd15", (64, 64), steps=3)
    out = sample(in_order(other, patcher, order, rec, window_attn=False), "sd15", (64, 64), steps=3)
    assert rec[0].conv_out == (16, 16) and float((out - alone).abs().max()) > 1e-5


def test_an_unknown_token_layout_patch_is_refused_at_its_first_windowed_call():
    """The class, not the examples: any attn1_patch that changes the tokens of a windowed layer
    (here: appends reference tokens to keys and values) is refused naming it, not windowed wrongly."""
    from hidiff.comfy.patch import CompositionError

    def reference_tokens(q, k, v, extra_options):
        return q, torch.cat([k, k[:, :8]], dim=1), torch.cat([v, v[:, :8]], dim=1)

    patcher, _ = build("sd15")
    model = hidiffusion(patcher).clone()
    model.set_model_attn1_patch(reference_tokens)
    with pytest.raises(CompositionError, match=r"reference_tokens changed the tokens.*window_attn off"):
        sample(model, "sd15", (64, 64), steps=1)


@pytest.mark.parametrize("merge_node", ["ModelMergeSimple", "ModelAdd"])
def test_model_merging_keeps_hidiffusion_of_the_first_model(merge_node):
    """ComfyUI's merge nodes clone the first model and add the second's weights as patches: right
    means HiDiffusion applied to the first model equals HiDiffusion applied to the merge (bitwise).
    (HiDiffusion on the second model only is dropped by ComfyUI's merge: apply it after merging.)"""
    import comfy_extras.nodes_model_merging as merging

    a, _ = build("sd15", seed=0)
    b, _ = build("sd15", seed=1)
    cls = getattr(merging, merge_node)
    args = (0.5,) if merge_node == "ModelMergeSimple" else ()
    rec = Recorder()
    merged_first = sample(run_node(cls, hidiffusion(a, rec), b, *args), "sd15", (64, 64), steps=3)
    assert rec[0].conv_out == (16, 16)
    after = sample(hidiffusion(run_node(cls, a, b, *args)), "sd15", (64, 64), steps=3)
    assert torch.equal(merged_first, after)
    assert float((merged_first - sample(hidiffusion(a), "sd15", (64, 64), steps=3)).abs().max()) > 1e-4


def test_v_prediction_zsnr_model_sampling_in_either_order():
    """ModelSamplingDiscrete (v-prediction, zero terminal SNR): HiDiffusion reads its steps from the
    sigmas sampled (zsnr's first sigma is ~4500), so right means the same plan per step as with the
    default sampling, and the same result in either order (bitwise)."""
    patcher, _ = build("sd15")
    rec_a, rec_b, rec_eps = Recorder(), Recorder(), Recorder()
    first = sample(hidiffusion(v_prediction_zsnr(patcher), rec_a), "sd15", (64, 64), steps=4)
    second = sample(v_prediction_zsnr(hidiffusion(patcher, rec_b)), "sd15", (64, 64), steps=4)
    sample(hidiffusion(patcher, rec_eps), "sd15", (64, 64), steps=4)
    assert torch.equal(first, second) and torch.isfinite(first).all()
    plans = [(r.plan.step, r.plan.conv, r.plan.pool, r.plan.windows) for r in rec_eps]
    assert [(r.plan.step, r.plan.conv, r.plan.pool, r.plan.windows) for r in rec_a] == plans
    assert [(r.plan.step, r.plan.conv, r.plan.pool, r.plan.windows) for r in rec_b] == plans
