"""Key/value downsampling (kv_downsample) on diffusers U-Nets: hidiff.diffusers.attention (rules: hidiff.core.rules)."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_untouched, latents_of, run_recorded, snapshot

import hidiff
from hidiff.diffusers.patch import changes

SIDE = 640  # latent 80 > the tiny SD native 64
STEPS = 5  # sd-1024: the strided conv acts in steps 0 and 1


def stage_attn1(unet, paths):
    """The transformer blocks' self-attentions under ``paths``."""
    return [
        m.attn1
        for path in paths
        for m in unet.get_submodule(path).modules()
        if hasattr(m, "attn1") and hasattr(m, "attn2")
    ]


def top_attn1(unet):
    """The self-attentions kv_downsample acts on (tiny SD 1.5: down stage 0, up stage 3)."""
    return stage_attn1(unet, ("down_blocks.0", "up_blocks.3"))


def record_projections(unet, attentions=None):
    """(query tokens, key tokens, value tokens) of every call of ``attentions`` (default: the top stage's attn1)."""
    seen, handles = [], []
    for attn in attentions if attentions is not None else top_attn1(unet):
        calls = {}

        def grab(name, store=calls):
            return lambda m, a: store.__setitem__(name, a[0].shape[1])

        def done(m, a, out, store=calls):
            seen.append((store.pop("q"), store.pop("k"), store.pop("v")))

        for name in ("q", "k", "v"):
            handles.append(getattr(attn, f"to_{name}").register_forward_pre_hook(grab(name)))
        handles.append(attn.register_forward_hook(done))
    return seen, handles


def test_keys_and_values_really_shrink(sd_pipe):
    hidiff.apply_hidiffusion(sd_pipe, kv_downsample=2)
    seen, handles = record_projections(sd_pipe.unet)
    _, records = run_recorded(sd_pipe, SIDE, SIDE, 1)
    for h in handles:
        h.remove()
    # under MSW-MSA: 4 windows of 40x40 tokens, keys/values from each window's 20x20
    assert seen and all(q == 40 * 40 and k == v == 20 * 20 for q, k, v in seen)
    rec = records[0]
    assert rec.kv_calls == rec.window_calls == len(seen) == 5
    assert rec.kv_maps == [((40, 40), (20, 20))] * 5


@pytest.mark.parametrize("factor", [2, 4])
def test_on_its_own_without_hidiffusion(sd_pipe, factor):
    hidiff.apply_hidiffusion(sd_pipe, kv_downsample=factor, raunet=False, window_attn=False)
    seen, handles = record_projections(sd_pipe.unet)
    _, records = run_recorded(sd_pipe, SIDE, SIDE, 1)
    for h in handles:
        h.remove()
    side = 80 // factor
    assert all(q == 80 * 80 and k == v == side * side for q, k, v in seen)
    rec = records[0]
    assert not (rec.conv or rec.pool or rec.windows) and rec.kv_calls == 5
    assert rec.kv_maps == [((80, 80), (side, side))] * 5


def test_close_to_full_attention_on_a_smooth_input(sd_pipe):
    """One U-Net call on a smooth latent: kv_downsample 2 alone changes the output by little."""
    unet = sd_pipe.unet
    ys, xs = torch.meshgrid(torch.linspace(0, 1, 80), torch.linspace(0, 1, 80), indexing="ij")
    sample = torch.stack([torch.sin(3 * ys), torch.cos(2 * xs), ys * xs, ys - xs])[None]
    text = torch.randn(1, 77, unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(0))

    def out(**options):
        with hidiff.hidiffusion(unet, scheduler=sd_pipe.scheduler, at_native="apply", **options):
            with torch.no_grad():
                return unet(sample, 500, encoder_hidden_states=text).sample

    full = out(raunet=False, window_attn=False)
    half = out(raunet=False, window_attn=False, kv_downsample=2)
    quarter = out(raunet=False, window_attn=False, kv_downsample=4)
    err2 = float((half - full).norm() / full.norm())
    err4 = float((quarter - full).norm() / full.norm())
    assert 0 < err2 < 0.02 and err2 < err4 < 0.05, (err2, err4)


@pytest.mark.slow
def test_composes_with_windows_and_rau_net(sd_pipe):
    hidiff.apply_hidiffusion(sd_pipe)
    plain, plain_records = run_recorded(sd_pipe, SIDE, SIDE, STEPS)
    hidiff.apply_hidiffusion(sd_pipe, kv_downsample=2)
    kv, records = run_recorded(sd_pipe, SIDE, SIDE, STEPS)
    for before, after in zip(plain_records, records):
        assert (after.conv, after.pool, after.windows) == (before.conv, before.pool, before.windows)
        assert after.shifts == before.shifts and after.kv_calls == after.window_calls
    assert records[0].conv and not records[-1].conv and records[0].kv_maps[0] == ((40, 40), (20, 20))
    assert kv.shape == plain.shape and torch.isfinite(kv).all()
    assert not torch.equal(kv, plain)
    assert float((kv - plain).norm() / plain.norm()) < 0.2


@pytest.mark.parametrize("windows", [True, False])
def test_odd_sizes(sd_pipe, windows):
    """Latent 81x83: uneven padded windows (their mask shrinks with them), or a whole odd map."""
    hidiff.apply_hidiffusion(sd_pipe, kv_downsample=2, raunet=False, window_attn=windows)
    seen, handles = record_projections(sd_pipe.unet)
    out, records = run_recorded(sd_pipe, 648, 664, 1)
    for h in handles:
        h.remove()
    assert out.shape[-2:] == (81, 83) and torch.isfinite(out).all()
    rec = records[0]
    if windows:
        assert rec.kv_maps == [((41, 42), (21, 21))] * 5 and rec.window_calls == 5
        assert all(q == 41 * 42 and k == v == 21 * 21 for q, k, v in seen)
    else:
        assert rec.kv_maps == [((81, 83), (41, 42))] * 5
        assert all(q == 81 * 83 and k == v == 41 * 42 for q, k, v in seen)


@pytest.mark.slow
@pytest.mark.parametrize("levels", [1, 2])
def test_removal_restores_stock_bitwise(sd_pipe, levels):
    before = snapshot(sd_pipe.unet)
    stock = latents_of(sd_pipe, SIDE, SIDE)
    hidiff.apply_hidiffusion(sd_pipe, kv_downsample=4, kv_levels=levels)
    changed = latents_of(sd_pipe, SIDE, SIDE)
    hidiff.remove_hidiffusion(sd_pipe)
    assert_untouched(sd_pipe.unet, before)
    assert torch.equal(latents_of(sd_pipe, SIDE, SIDE), stock)
    assert not torch.equal(changed, stock)


def test_acts_only_where_hidiffusion_acts(sd_pipe):
    """At native size (at_native='skip', the default) nothing runs; 'apply' runs it there too."""
    hidiff.apply_hidiffusion(sd_pipe, kv_downsample=2, raunet=False, window_attn=False)
    _, records = run_recorded(sd_pipe, 512, 512, 1)
    assert records[0].kv_calls == 0 and records[0].preset is None
    hidiff.apply_hidiffusion(sd_pipe, kv_downsample=2, raunet=False, window_attn=False, at_native="apply")
    _, records = run_recorded(sd_pipe, 512, 512, 1)
    assert records[0].kv_calls == 5 and records[0].kv_maps[0] == ((64, 64), (32, 32))


def test_default_is_off(sd_pipe):
    hidiff.apply_hidiffusion(sd_pipe)
    assert hidiff.get_patch(sd_pipe).config.kv_downsample == 1
    _, records = run_recorded(sd_pipe, SIDE, SIDE, 1)
    assert records[0].kv_calls == 0 and records[0].window_calls == 5


def test_describe_names_where_it_acts(sd_pipe):
    names = changes(sd_pipe, kv_downsample=2)
    kv = {k: v for k, v in names.items() if "downsampled 2x" in v}
    assert sorted(kv) == [
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1",
        "down_blocks.0.attentions.1.transformer_blocks.0.attn1",
        "up_blocks.3.attentions.0.transformer_blocks.0.attn1",
        "up_blocks.3.attentions.1.transformer_blocks.0.attn1",
        "up_blocks.3.attentions.2.transformer_blocks.0.attn1",
    ]
    assert all("windows" in v for v in kv.values())
    alone = changes(sd_pipe, kv_downsample=2, raunet=False, window_attn=False)
    assert all("windows" not in v for v in alone.values() if "downsampled" in v)
    assert not any("downsampled 2x" in v for v in changes(sd_pipe).values())


class OutsideProcessor:
    """An attention processor from outside diffusers: plain attention from to_q/to_k/to_v."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        q, k, v = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        w = torch.softmax(q @ k.transpose(1, 2) * attn.scale, -1)
        return attn.to_out[1](attn.to_out[0](w @ v))


OutsideProcessor.__module__ = "someone_elses_package"


def test_works_with_a_processor_from_elsewhere(sd_pipe):
    for attn in top_attn1(sd_pipe.unet):
        attn.set_processor(OutsideProcessor())
    hidiff.apply_hidiffusion(sd_pipe, kv_downsample=2, raunet=False)
    seen, handles = record_projections(sd_pipe.unet)
    out, records = run_recorded(sd_pipe, SIDE, SIDE, 1)
    for h in handles:
        h.remove()
    assert torch.isfinite(out).all() and records[0].kv_calls == 5
    assert all(k == v == 20 * 20 for _, k, v in seen)


@pytest.mark.slow
def test_sdxl_acts_on_its_window_stage(sdxl_pipe):
    """SDXL windows down_blocks.1 / up_blocks.1 (two transformer blocks per layer in the tiny config)."""
    names = changes(sdxl_pipe, kv_downsample=2)
    acting = sorted(k for k, v in names.items() if "downsampled 2x" in v)
    assert acting and all(k.startswith(("down_blocks.1.", "up_blocks.1.")) for k in acting)
    hidiff.apply_hidiffusion(sdxl_pipe, kv_downsample=2)
    _, records = run_recorded(sdxl_pipe, 1024, 1024, 1)  # latent 128 over the small native 64
    rec = records[0]
    assert rec.kv_calls == rec.window_calls == len(acting) > 0
    # stage 1 of SDXL is at half the latent side: 64x64, windows of 32x32, keys from 16x16
    assert set(rec.kv_maps) == {((32, 32), (16, 16))}


# ------------------------------------------------------------------ kv_levels 2: one stage deeper
@pytest.mark.parametrize("windows", [True, False])
def test_deeper_level_shrinks_the_next_stage_too(sd_pipe, windows):
    """kv_levels 2 on tiny SD 1.5 at latent 80: the 640-wide stage (down_blocks.1, up_blocks.2, 40x40)
    takes keys from its whole 20x20 map; the top stage still shrinks as with kv_levels 1."""
    hidiff.apply_hidiffusion(sd_pipe, kv_downsample=2, kv_levels=2, raunet=False, window_attn=windows)
    deep, deep_handles = record_projections(sd_pipe.unet, stage_attn1(sd_pipe.unet, ("down_blocks.1", "up_blocks.2")))
    top, top_handles = record_projections(sd_pipe.unet)
    _, records = run_recorded(sd_pipe, SIDE, SIDE, 1)
    for h in deep_handles + top_handles:
        h.remove()
    assert deep == [(40 * 40, 20 * 20, 20 * 20)] * 5
    assert top == ([(40 * 40, 20 * 20, 20 * 20)] if windows else [(80 * 80, 40 * 40, 40 * 40)]) * 5
    rec = records[0]
    assert rec.kv_calls == 10 and sorted(rec.kv_at) == [0] * 5 + [1] * 5
    assert [m for m, at in zip(rec.kv_maps, rec.kv_at) if at == 1] == [((40, 40), (20, 20))] * 5


def test_deeper_level_follows_rau_net_and_odd_sizes(sd_pipe):
    """Latent 81x83, 5 steps: in the strided-conv steps the deeper stage sees 21x21 (the conv's
    stride 4), after them 41x42; keys come from ceil(side / 2) per side."""
    hidiff.apply_hidiffusion(sd_pipe, kv_downsample=2, kv_levels=2)
    out, records = run_recorded(sd_pipe, 648, 664, STEPS)
    assert out.shape[-2:] == (81, 83) and torch.isfinite(out).all()
    for rec in records:
        deep = {m for m, at in zip(rec.kv_maps, rec.kv_at) if at == 1}
        assert deep == ({((21, 21), (11, 11))} if rec.conv else {((41, 42), (21, 21))}), (rec.step, deep)
    assert records[0].conv and not records[-1].conv


def test_level_one_leaves_the_next_stage_alone(sd_pipe):
    hidiff.apply_hidiffusion(sd_pipe, kv_downsample=2)
    deep, handles = record_projections(sd_pipe.unet, stage_attn1(sd_pipe.unet, ("down_blocks.1", "up_blocks.2")))
    _, records = run_recorded(sd_pipe, SIDE, SIDE, 1)
    for h in handles:
        h.remove()
    assert deep == [(40 * 40, 40 * 40, 40 * 40)] * 5 and set(records[0].kv_at) == {0}


def test_describe_names_the_deeper_level(sd_pipe):
    names = changes(sd_pipe, kv_downsample=4, kv_levels=2)
    deep = sorted(k for k, v in names.items() if "(kv level 2)" in v)
    assert deep == [
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1",
        "down_blocks.1.attentions.1.transformer_blocks.0.attn1",
        "up_blocks.2.attentions.0.transformer_blocks.0.attn1",
        "up_blocks.2.attentions.1.transformer_blocks.0.attn1",
        "up_blocks.2.attentions.2.transformer_blocks.0.attn1",
    ]
    assert all("downsampled 4x" in names[k] and "windows" not in names[k] for k in deep)


@pytest.mark.slow
def test_sdxl_deeper_level_is_its_1280_stage(sdxl_pipe):
    """SDXL's level below the windows is down_blocks.2 / up_blocks.0 (at a quarter of the latent side)."""
    names = changes(sdxl_pipe, kv_downsample=2, kv_levels=2)
    deep = sorted(k for k, v in names.items() if "(kv level 2)" in v)
    assert deep and all(k.startswith(("down_blocks.2.", "up_blocks.0.")) for k in deep)
    hidiff.apply_hidiffusion(sdxl_pipe, kv_downsample=2, kv_levels=2, raunet=False)
    _, records = run_recorded(sdxl_pipe, 1024, 1040, 1)  # latent 128x130
    rec = records[0]
    assert rec.kv_at.count(2) == len(deep) and rec.kv_at.count(1) == rec.window_calls > 0
    assert {m for m, at in zip(rec.kv_maps, rec.kv_at) if at == 2} == {((32, 33), (16, 17))}


def test_kv_levels_needs_a_factor_and_a_valid_value(sd_pipe):
    with pytest.raises(ValueError, match="kv_levels=2 .* kv_downsample is 1"):
        hidiff.apply_hidiffusion(sd_pipe, kv_levels=2)
    with pytest.raises(ValueError, match="kv_levels must be 1"):
        hidiff.apply_hidiffusion(sd_pipe, kv_downsample=2, kv_levels=3)
    assert hidiff.get_patch(sd_pipe) is None
