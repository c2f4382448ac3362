"""Reliability, from the user's side (issue 14): other block depths, no leaks, copies and
pickles, threads, per-image reproducibility, a bare U-Net, hosts where windows cannot act,
inversion, custom attention processors, shared U-Nets and the refusal messages.

Every test builds tiny random-weight models (native 64 px, latent 8) and runs a few
steps at small sizes; sizes are pixels unless named latent.
"""

from __future__ import annotations

import copy
import gc
import re
import threading
import warnings
import weakref

import pytest
import torch
from helpers import assert_untouched, snapshot, unet2d_model
from torch import nn

import hidiff
from hidiff import UnsupportedModelError, apply_hidiffusion, get_patch, is_patched, last_call, remove_hidiffusion
from hidiff.diffusers.testing import make_unet, tiny_pipeline, tiny_unet_config

NATIVE = 8  # latent side of every tiny model here (64 px)
SIDE = 128  # 2x native
ODD = (72, 104)  # latent 9 x 13: above native, not a multiple of 16 (odd token maps at the window stage)
STEPS = 3
# Forced presets whose T1 = T2 = int(3 * 0.7) = 2: the strided conv and the pooling both run in
# steps 0 and 1 and neither in step 2, on both layouts.
ACTING = {
    "sd15": dict(preset="sd-1024", t1_ratio=0.7, t2_ratio=0.7),
    "sdxl": dict(preset="sdxl-4096", t1_ratio=0.7, t2_ratio=0.7),
}
ACTS = [(True, True), (True, True), (False, False)]


def run(pipe, height=SIDE, width=SIDE, steps=STEPS, seed=0, prompt="one red circle", **kwargs):
    """(final latents, hidiff's record at the end of every step)."""
    records = []

    def on_step_end(p, i, t, callback_kwargs):
        records.append(last_call(p))
        return callback_kwargs

    generator = kwargs.pop("generator", None) or torch.Generator().manual_seed(seed)
    if height is not None:  # img2img pipelines take the size of their image
        kwargs.update(height=height, width=width)
    out = pipe(
        prompt,
        num_inference_steps=steps,
        generator=generator,
        output_type="latent",
        callback_on_step_end=on_step_end,
        **kwargs,
    )
    return out.images, records


def windowed_blocks(unet, arch):
    """Transformer blocks at the window stage and its mirror: one windowed self-attention each."""
    from hidiff.diffusers.model import transformer_blocks

    down = unet.down_blocks[arch.window_stage]
    up = unet.up_blocks[arch.up_index(arch.window_stage)]
    return len(transformer_blocks(down)) + len(transformer_blocks(up))


def sd_pipe(task="text2img", **overrides):
    return tiny_pipeline("sd15", task, sample_size=NATIVE, **overrides)


# --------------------------------------------------------------------------- 1. block depths
DEPTHS = {
    # id: (family, U-Net overrides)
    "sd15-lpb1": ("sd15", dict(layers_per_block=1)),
    "sd15-lpb3": ("sd15", dict(layers_per_block=3)),
    "sd15-lpb1-depth2": ("sd15", dict(layers_per_block=1, transformer_layers_per_block=2)),
    "sd15-lpb2-depth-mixed": ("sd15", dict(layers_per_block=2, transformer_layers_per_block=(2, 1, 1, 1))),
    "sdxl-lpb1": ("sdxl", dict(layers_per_block=1, transformer_layers_per_block=(1, 1, 1))),
    "sdxl-lpb3": ("sdxl", dict(layers_per_block=3, transformer_layers_per_block=(1, 1, 2))),
    "sdxl-lpb2-depth3": ("sdxl", dict(layers_per_block=2, transformer_layers_per_block=(1, 3, 1))),
}


@pytest.mark.slow
@pytest.mark.parametrize("size", [(SIDE, SIDE), ODD, (136, 200)], ids=["2x", "72x104", "136x200"])
@pytest.mark.parametrize("case", list(DEPTHS))
def test_other_block_depths_generate_act_and_remove_exactly(case, size):
    family, overrides = DEPTHS[case]
    pipe = tiny_pipeline(family, sample_size=NATIVE, **overrides)
    stock, _ = run(pipe, *size)
    before = snapshot(pipe.unet)
    apply_hidiffusion(pipe, **ACTING[family])
    arch = get_patch(pipe).arch
    expected_windows = windowed_blocks(pipe.unet, arch)
    assert expected_windows >= 3
    latents, records = run(pipe, *size)
    assert latents.shape == stock.shape and torch.isfinite(latents).all()
    assert not torch.equal(latents, stock)
    assert [(r.conv, r.pool) for r in records] == ACTS, case
    latent = (size[0] // 8, size[1] // 8)
    for r in records:
        assert r.latent == latent and r.step < STEPS and r.total == STEPS
        assert r.windows and r.window_calls == expected_windows and r.unwindowed == 0
        if family == "sd15":
            assert set(r.window_maps) == {latent}  # SD's window stage runs at the latent's own size
    remove_hidiffusion(pipe)
    assert_untouched(pipe.unet, before)
    again, _ = run(pipe, *size)
    assert torch.equal(again, stock)


def test_depth_plan_comes_from_the_structure():
    """The unpool layer and the feature sizes follow the real layer counts."""
    from hidiff.core.planner import feature_sizes
    from hidiff.diffusers.model import detect_layout

    for lpb in (1, 2, 3):
        for family in ("sd15", "sdxl"):
            unet = make_unet(tiny_unet_config(family, sample_size=NATIVE, layers_per_block=lpb))
            arch = detect_layout(unet)
            assert arch.unpool_layer == lpb - 1
            skips, mid, _, _ = feature_sizes(arch, (9, 13), conv=True, pool=True)
            # one skip per resnet and per downsampler, plus the conv_in output
            assert len(skips) == 1 + arch.num_stages * lpb + (arch.num_stages - 1)


# --------------------------------------------------------------------------- 2. leaks
def _collected(ref):
    for _ in range(3):
        gc.collect()
    return ref() is None


@pytest.mark.slow
@pytest.mark.parametrize(
    "drop", ["remove-then-drop", "drop-patched-pipeline", "drop-patched-unet", "drop-with-cfgpp-and-invert"]
)
def test_patched_unet_is_freed_after_a_generation(drop):
    pipe = sd_pipe()
    apply_hidiffusion(pipe, window_seed=1)
    if drop == "drop-with-cfgpp-and-invert":
        hidiff.enable_cfgpp(pipe, "ddim", 0.6)
        hidiff.invert(pipe, torch.rand(1, 3, SIDE, SIDE), "one red circle", num_inference_steps=2)
    run(pipe, steps=2)
    assert last_call(pipe).window_calls > 0
    ref = weakref.ref(pipe.unet)
    if drop == "remove-then-drop":
        remove_hidiffusion(pipe)
        del pipe
    elif drop in ("drop-patched-pipeline", "drop-with-cfgpp-and-invert"):
        del pipe
    else:
        unet = pipe.unet
        del pipe
        assert ref() is unet
        del unet
    assert _collected(ref), [type(r).__name__ for r in gc.get_referrers(ref())]


def test_bare_unet_patched_with_a_scheduler_is_freed_after_calls():
    pipe = sd_pipe()
    unet = pipe.unet
    apply_hidiffusion(unet, scheduler=pipe.scheduler)
    run(pipe, steps=2)
    ref = weakref.ref(unet)
    del pipe, unet
    assert _collected(ref)


def test_load_apply_drop_cycles_do_not_accumulate():
    refs = []
    for _ in range(3):
        pipe = sd_pipe()
        apply_hidiffusion(pipe)
        run(pipe, steps=1)
        refs.append(weakref.ref(pipe.unet))
        del pipe
    gc.collect()
    assert [r() for r in refs] == [None, None, None]


class _Stop(KeyboardInterrupt):
    pass


def _raise_stop(*_):
    raise _Stop


@pytest.mark.parametrize("where", ["mid-block", "strided-conv"])
def test_unet_interrupted_by_ctrl_c_mid_call_is_restored_and_freed(where):
    """KeyboardInterrupt inside the U-Net: torch runs no post-hook for it."""
    pipe = sd_pipe()
    before = snapshot(pipe.unet)
    apply_hidiffusion(pipe, **ACTING["sd15"])
    conv = pipe.unet.down_blocks[0].downsamplers[0].conv
    target = pipe.unet.mid_block if where == "mid-block" else conv
    handle = target.register_forward_pre_hook(_raise_stop)
    with pytest.raises(_Stop):
        run(pipe, steps=2)
    handle.remove()
    if where == "strided-conv":
        assert conv.stride == (4, 4)  # cut short inside the strided call
    remove_hidiffusion(pipe)
    assert_untouched(pipe.unet, before)
    ref = weakref.ref(pipe.unet)
    del pipe, conv, target
    assert _collected(ref)


def test_patch_keeps_working_after_an_interrupted_call():
    pipe = sd_pipe()
    apply_hidiffusion(pipe, **ACTING["sd15"])
    expected, _ = run(pipe)
    handle = pipe.unet.down_blocks[0].downsamplers[0].conv.register_forward_pre_hook(_raise_stop)
    with pytest.raises(_Stop):
        run(pipe)
    handle.remove()
    again, records = run(pipe)
    assert torch.equal(again, expected) and [(r.conv, r.pool) for r in records] == ACTS


# --------------------------------------------------------------------------- 3. copies and saving
@pytest.mark.parametrize("options", [{}, dict(kv_downsample=2)], ids=["default", "kv-downsample"])
def test_deepcopy_of_a_patched_pipeline_behaves_like_the_original_and_removes_alone(options):
    pipe = sd_pipe()
    apply_hidiffusion(pipe, **ACTING["sd15"], **options)
    original, records = run(pipe)
    clone = copy.deepcopy(pipe)
    assert get_patch(clone) is not get_patch(pipe)
    assert get_patch(clone).unet is clone.unet and get_patch(clone).pipe is clone
    copied, copy_records = run(clone)
    assert torch.equal(copied, original)
    assert [(r.conv, r.pool, r.window_calls, r.kv_calls) for r in copy_records] == [
        (r.conv, r.pool, r.window_calls, r.kv_calls) for r in records
    ]
    assert all(r.kv_calls > 0 for r in copy_records) == bool(options)
    assert last_call(clone).window_calls > 0 and last_call(clone) is not last_call(pipe)
    remove_hidiffusion(clone)
    assert not is_patched(clone) and is_patched(pipe)
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in clone.unet.modules())
    again, _ = run(pipe)
    assert torch.equal(again, original)
    stock_pipe = sd_pipe()
    stock, _ = run(stock_pipe)
    assert torch.equal(run(clone)[0], stock)


def test_deepcopy_of_a_patched_unet_behaves_like_the_original_and_removes_alone():
    from diffusers import StableDiffusionPipeline

    pipe = sd_pipe()
    apply_hidiffusion(pipe, **ACTING["sd15"])
    original, _ = run(pipe)
    unet = copy.deepcopy(pipe.unet)
    other = StableDiffusionPipeline(**{**pipe.components, "unet": unet})
    other.set_progress_bar_config(disable=True)
    copied, records = run(other)
    assert torch.equal(copied, original)
    assert [(r.conv, r.pool) for r in records] == ACTS
    assert all(r.window_calls == windowed_blocks(unet, get_patch(unet).arch) for r in records)
    remove_hidiffusion(unet)
    assert not is_patched(unet) and is_patched(pipe)
    assert torch.equal(run(pipe)[0], original)


def test_save_pretrained_of_a_patched_unet_saves_the_stock_model(tmp_path):
    from diffusers import UNet2DConditionModel

    pipe = sd_pipe()
    stock_state = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    apply_hidiffusion(pipe)
    pipe.unet.save_pretrained(tmp_path / "unet")
    loaded = UNet2DConditionModel.from_pretrained(tmp_path / "unet")
    assert not is_patched(loaded) and is_patched(pipe)
    state = loaded.state_dict()
    assert state.keys() == stock_state.keys() and all(torch.equal(state[k], v) for k, v in stock_state.items())


# torch.save / pickle of a patched U-Net, save_pretrained of a patched pipeline and accelerate:
# tests/diffusers/test_copies.py (issue 27).


# --------------------------------------------------------------------------- 4. threads
def test_two_threads_on_one_patched_pipeline_match_sequential_calls_bitwise():
    """Both runs really overlap: each step ends on a barrier both threads must reach. The two
    runs differ in seed and size, so each thread's records show whose calls they describe."""
    steps = 4
    jobs = {"a": (11, (SIDE, SIDE)), "b": (22, ODD)}
    pipe = sd_pipe()
    apply_hidiffusion(pipe, **ACTING["sd15"])
    sequential = {name: run(pipe, *size, steps=steps, seed=seed) for name, (seed, size) in jobs.items()}
    barrier = threading.Barrier(len(jobs), timeout=60)
    results, records, errors, idents = {}, {name: [] for name in jobs}, [], set()
    # A new thread starts with OpenMP's default thread count, not the one torch.set_num_threads
    # gave this thread; with another count a kernel may sum in another order, so each thread
    # takes this thread's count and the arithmetic is the sequential runs'.
    intra_op = torch.get_num_threads()

    def work(name):
        torch.set_num_threads(intra_op)
        seed, size = jobs[name]

        def on_step_end(p, i, t, callback_kwargs):
            idents.add(threading.get_ident())
            records[name].append(last_call(p))
            barrier.wait()
            return callback_kwargs

        try:
            out = pipe(
                "one red circle",
                height=size[0],
                width=size[1],
                num_inference_steps=steps,
                generator=torch.Generator().manual_seed(seed),
                output_type="latent",
                callback_on_step_end=on_step_end,
            )
            results[name] = out.images
        except BaseException as error:  # reported below, with the thread's job
            errors.append((name, error))
            barrier.abort()

    threads = [threading.Thread(target=work, args=(name,)) for name in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors, errors
    assert len(idents) == 2
    for name, (_, size) in jobs.items():
        assert torch.equal(results[name], sequential[name][0]), name
        # each thread's last_call is its own run's: its size, its steps, its RAU-Net phases
        mine = [(r.latent, r.step, r.conv, r.pool, r.window_calls) for r in records[name]]
        assert mine == [(r.latent, r.step, r.conv, r.pool, r.window_calls) for r in sequential[name][1]], name
        assert all(r.latent == (size[0] // 8, size[1] // 8) for r in records[name])
    # the conv geometry is back after the overlapping runs
    conv = pipe.unet.down_blocks[0].downsamplers[0].conv
    assert (conv.stride, conv.padding, conv.dilation) == ((2, 2), (1, 1), (1, 1))


# --------------------------------------------------------------------------- 5. batch vs alone
# Image k of a batch runs the same maths as the image alone, but batched CPU kernels sum in
# another order, so the last bits differ: the stock pipeline, without hidiff, already gives
# batch-vs-alone differences of about 1.6e-6 of the latents' largest value (1.5e-5 on values
# up to 12, measured on these tiny models) with or without HiDiffusion. The tolerance is
# 1e-5 of that largest value, a few times the stock difference (elementwise relative
# tolerances fail near zero, where the same absolute difference is large in relative terms).
# A different window shift for one image moves its latents by orders of magnitude more
# (test_a_different_window_shift_shows_far_above_the_tolerance).
BATCH_TOLERANCE = 1e-5


def assert_same_image(batched, alone):
    scale = float(alone.abs().max())
    torch.testing.assert_close(batched, alone, rtol=0, atol=BATCH_TOLERANCE * scale)


@pytest.mark.slow
@pytest.mark.parametrize("options", [{}, dict(window_seed=7)], ids=["seeded-per-image", "fixed-window-seed"])
@pytest.mark.parametrize("size", [(SIDE, SIDE), ODD], ids=["2x", "72x104"])
def test_image_k_of_a_batch_is_remade_alone_with_its_generator(options, size):
    seeds = (5, 6, 7)
    pipe = sd_pipe()
    apply_hidiffusion(pipe, **ACTING["sd15"], **options)
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    batch, records = run(pipe, *size, prompt=["one red circle"] * len(seeds), generator=generators)
    assert all(r.window_calls > 0 for r in records)
    if not options:  # one shift per image: the images' shifts differ somewhere
        assert any(isinstance(s[0], tuple) for r in records for s in r.shifts)
    for k, seed in enumerate(seeds):
        alone, _ = run(pipe, *size, generator=[torch.Generator().manual_seed(seed)])
        assert_same_image(batch[k : k + 1], alone)


def test_a_different_window_shift_shows_far_above_the_tolerance():
    """The batch test would catch an image given another image's shifts."""
    pipe = sd_pipe()
    apply_hidiffusion(pipe, **ACTING["sd15"])
    first, _ = run(pipe, generator=[torch.Generator().manual_seed(5)])
    apply_hidiffusion(pipe, **ACTING["sd15"], window_seed=12345)
    other, _ = run(pipe, generator=[torch.Generator().manual_seed(5)])
    assert (first - other).abs().max() > 100 * BATCH_TOLERANCE * first.abs().max()


# --------------------------------------------------------------------------- 6. a bare U-Net
def test_bare_unet_without_scheduler_warns_what_cannot_be_known():
    pipe = sd_pipe()
    with pytest.warns(UserWarning) as caught:
        apply_hidiffusion(pipe.unet)
    message = " ".join(str(w.message) for w in caught)
    for part in ("UNet2DConditionModel", "img2img", "SDXL Turbo", "scheduler=pipe.scheduler", "1000"):
        assert part in message, (part, message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        apply_hidiffusion(pipe.unet, scheduler=pipe.scheduler)
        apply_hidiffusion(pipe)


def test_bare_unet_with_scheduler_follows_img2img_strength():
    steps, strength = 6, 0.5  # 3 steps run, from the middle of the schedule
    pipe = sd_pipe("img2img")
    apply_hidiffusion(pipe.unet, scheduler=pipe.scheduler, t1_ratio=0.5, t2_ratio=0.0)
    image = torch.rand(1, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(3))
    _, records = run(pipe, steps=steps, image=image, strength=strength, height=None, width=None)
    assert [(r.step, r.total) for r in records] == [(0, 3), (1, 3), (2, 3)]
    assert [r.conv for r in records] == [True, False, False]  # T1 = int(3 * 0.5) = 1


def test_bare_unet_with_scheduler_picks_the_few_step_preset_on_sdxl():
    pipe = tiny_pipeline("sdxl", sample_size=NATIVE)
    apply_hidiffusion(pipe.unet, scheduler=pipe.scheduler)
    _, records = run(pipe, steps=4)
    assert [r.preset for r in records] == ["sdxl-turbo"] * 4
    assert [(r.step, r.total) for r in records] == [(i, 4) for i in range(4)]
    assert records[0].pool and not records[0].conv


# --------------------------------------------------------------------------- 7. windows that cannot act
def _windowed_transformers(pipe):
    arch = hidiff.detect_layout(pipe.unet)
    down = pipe.unet.down_blocks[arch.window_stage]
    up = pipe.unet.up_blocks[arch.up_index(arch.window_stage)]
    return list(down.attentions) + list(up.attentions)


def _pass_by_keyword(pipe, keyword):
    """Make every windowed Transformer2DModel receive its input under ``keyword``, as some hosts
    (AnimateDiff-style motion U-Nets, wrappers) do; returns the hook handles."""
    handles = []
    for transformer in _windowed_transformers(pipe):
        base = type(transformer)
        if keyword != "hidden_states":

            def forward(self, *args, _base=base, _keyword=keyword, **kwargs):
                return _base.forward(self, kwargs.pop(_keyword), *args, **kwargs)

            transformer.__class__ = type("Motion" + base.__name__, (base,), {"forward": forward})

        def to_keyword(module, args, kwargs, _keyword=keyword):
            return args[1:], {**kwargs, _keyword: args[0]}

        handles.append(transformer.register_forward_pre_hook(to_keyword, with_kwargs=True, prepend=True))
    return handles


def test_record_says_windows_did_not_run_where_they_cannot_act():
    pipe = sd_pipe()
    _pass_by_keyword(pipe, "frames")
    apply_hidiffusion(pipe, **ACTING["sd15"], window_attn=False)
    without, _ = run(pipe)
    apply_hidiffusion(pipe, **ACTING["sd15"])
    latents, records = run(pipe)
    assert [(r.conv, r.pool) for r in records] == ACTS  # RAU-Net ran and says so
    for r in records:
        assert r.windows is False and r.window_calls == 0 and r.window_maps == [] and r.shifts == []
    assert torch.equal(latents, without)  # and nothing was windowed indeed


def test_windows_act_when_hidden_states_come_by_keyword():
    pipe = sd_pipe()
    apply_hidiffusion(pipe, **ACTING["sd15"])
    positional, expected = run(pipe)
    handles = _pass_by_keyword(pipe, "hidden_states")
    latents, records = run(pipe)
    assert [(r.window_calls, r.windows) for r in records] == [(r.window_calls, True) for r in expected]
    assert torch.equal(latents, positional)
    for handle in handles:
        handle.remove()


def test_record_at_native_size_claims_nothing():
    pipe = sd_pipe()
    apply_hidiffusion(pipe)
    _, records = run(pipe, height=64, width=64)
    for r in records:
        assert r.preset is None and not (r.conv or r.pool or r.windows) and r.window_calls == 0


# --------------------------------------------------------------------------- 8. inversion
def test_inversion_runs_raunet_at_the_mirrored_steps():
    steps = 4
    pipe = sd_pipe()
    apply_hidiffusion(pipe, t1_ratio=0.5, t2_ratio=0.0)  # sd-1024: conv in steps 0 and 1 of 4
    _, sampling = run(pipe, steps=steps)
    assert [r.conv for r in sampling] == [True, True, False, False]
    seen = []
    handle = pipe.unet.register_forward_hook(lambda m, a, o: seen.append(last_call(pipe)))
    image = torch.rand(1, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(0))
    noise = hidiff.invert(pipe, image, "one red circle", guidance=0.5, num_inference_steps=steps)
    handle.remove()
    assert noise.shape == (1, 4, SIDE // 8, SIDE // 8) and torch.isfinite(noise).all()
    # Inversion walks sampling's steps backwards: its last calls are sampling's first steps.
    assert [(r.step, r.total) for r in seen] == [(i, steps) for i in reversed(range(steps))]
    assert [r.conv for r in seen] == [False, False, True, True]
    assert all(r.window_calls > 0 for r in seen)
    # Sampling afterwards is planned forwards again, as before the inversion.
    _, after = run(pipe, steps=steps)
    assert [(r.step, r.conv) for r in after] == [(r.step, r.conv) for r in sampling]


# --------------------------------------------------------------------------- 9. custom attention processors
class MaskIgnoringProcessor:
    """A user's processor (not from diffusers) that drops the attention mask."""

    def __init__(self):
        from diffusers.models.attention_processor import AttnProcessor2_0

        self.inner = AttnProcessor2_0()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        return self.inner(attn, hidden_states, encoder_hidden_states, None, temb)


@pytest.mark.parametrize("size", [ODD, (136, 200)], ids=["72x104", "136x200"])
def test_custom_processor_on_odd_maps_falls_back_to_full_attention_exactly(size):
    pipe = sd_pipe()
    pipe.unet.set_attn_processor(MaskIgnoringProcessor())
    apply_hidiffusion(pipe, **ACTING["sd15"], window_attn=False)
    full, _ = run(pipe, *size)
    apply_hidiffusion(pipe, **ACTING["sd15"])
    latents, records = run(pipe, *size)
    expected = windowed_blocks(pipe.unet, get_patch(pipe).arch)
    assert torch.equal(latents, full)
    assert [(r.conv, r.pool) for r in records] == ACTS
    for r in records:
        assert r.unwindowed == expected and r.window_calls == 0 and r.windows is False


def test_custom_processor_on_even_maps_still_windows():
    pipe = sd_pipe()
    pipe.unet.set_attn_processor(MaskIgnoringProcessor())
    apply_hidiffusion(pipe, **ACTING["sd15"])
    _, records = run(pipe)
    expected = windowed_blocks(pipe.unet, get_patch(pipe).arch)
    assert all(r.window_calls == expected and r.unwindowed == 0 for r in records)


def test_diffusers_processor_on_odd_maps_windows():
    from diffusers.models.attention_processor import AttnProcessor

    pipe = sd_pipe()
    pipe.unet.set_attn_processor(AttnProcessor())
    apply_hidiffusion(pipe, **ACTING["sd15"])
    _, records = run(pipe, *ODD)
    expected = windowed_blocks(pipe.unet, get_patch(pipe).arch)
    assert all(r.window_calls == expected and r.unwindowed == 0 and r.windows for r in records)


# --------------------------------------------------------------------------- 10. shared U-Nets
def test_second_pipeline_on_a_shared_unet_is_refused_and_the_first_keeps_working():
    from diffusers import StableDiffusionImg2ImgPipeline

    pipe = sd_pipe()
    other = StableDiffusionImg2ImgPipeline(**pipe.components)
    other.set_progress_bar_config(disable=True)
    apply_hidiffusion(pipe, **ACTING["sd15"])
    first, _ = run(pipe)
    patch = get_patch(pipe)
    hooks = snapshot_hooks(pipe.unet)
    with pytest.raises(ValueError) as info:
        apply_hidiffusion(other)
    message = str(info.value)
    for part in ("UNet2DConditionModel", "StableDiffusionPipeline", "remove_hidiffusion", "own U-Net"):
        assert part in message, (part, message)
    with pytest.raises(ValueError, match="StableDiffusionPipeline"):
        remove_hidiffusion(other)  # removing through the other pipeline would un-patch the first
    with pytest.raises(ValueError, match="StableDiffusionPipeline"):
        with hidiff.hidiffusion(other):
            pass
    assert get_patch(pipe) is patch and patch.pipe is pipe and snapshot_hooks(pipe.unet) == hooks
    again, _ = run(pipe)
    assert torch.equal(again, first)
    # Remove through the first, then the second can have it.
    remove_hidiffusion(pipe)
    apply_hidiffusion(other, **ACTING["sd15"])
    assert get_patch(other).pipe is other
    image = torch.rand(1, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(3))
    _, records = run(other, steps=4, image=image, strength=0.75, height=None, width=None)
    assert records[0].step == 0 and records[0].total == 3 and records[0].conv
    with pytest.raises(ValueError, match="StableDiffusionImg2ImgPipeline"):
        apply_hidiffusion(pipe)
    # The U-Net itself can always be un-patched.
    remove_hidiffusion(pipe.unet)
    assert not is_patched(pipe) and not is_patched(other)


def snapshot_hooks(module):
    return [(n, len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in module.named_modules()]


def test_shared_unet_free_again_once_the_first_pipeline_is_gone():
    from diffusers import StableDiffusionImg2ImgPipeline

    pipe = sd_pipe()
    other = StableDiffusionImg2ImgPipeline(**pipe.components)
    apply_hidiffusion(pipe)
    del pipe
    gc.collect()
    apply_hidiffusion(other)
    assert get_patch(other).pipe is other


# --------------------------------------------------------------------------- 12. refusals
def _if_unet():
    """A tiny DeepFloyd IF-style U-Net: SimpleCrossAttn blocks (added key/value projections)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=3,
        out_channels=6,
        block_out_channels=(32, 64, 64, 64),
        down_block_types=("ResnetDownsampleBlock2D",) + ("SimpleCrossAttnDownBlock2D",) * 3,
        up_block_types=("SimpleCrossAttnUpBlock2D",) * 3 + ("ResnetUpsampleBlock2D",),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        cross_attention_dim=32,
        encoder_hid_dim=48,
        attention_head_dim=8,
        layers_per_block=1,
        norm_num_groups=16,
        resnet_time_scale_shift="scale_shift",
        addition_embed_type="text",
    ).eval()


class _IFLikePipeline:
    def __init__(self):
        self.unet = _if_unet()


class _TransformerPipeline:
    def __init__(self):
        self.transformer = nn.Linear(4, 4)
        self.unet = None


USE_SD = r"Use a Stable Diffusion U-Net"
WITHOUT = r"without (HiDiffusion|it)"
REFUSALS = {
    # builder: (the model named, what is missing, what to do)
    "deepfloyd-if-unet": (_if_unet, r"UNet2DConditionModel", r"added key/value cross-attention", USE_SD),
    "deepfloyd-if-pipeline": (_IFLikePipeline, r"UNet2DConditionModel", r"DeepFloyd IF", WITHOUT),
    "unconditional": (
        lambda: unet2d_model(("AttnDownBlock2D",) * 3 + ("DownBlock2D",), ("UpBlock2D",) + ("AttnUpBlock2D",) * 3),
        r"UNet2DModel",
        r"self-attention only.*none has the cross-attention transformer blocks",
        USE_SD,
    ),
    "no-attention": (
        lambda: make_unet(
            tiny_unet_config("sd15", down_block_types=("DownBlock2D",) * 4, up_block_types=("UpBlock2D",) * 4)
        ),
        r"UNet2DConditionModel",
        r"none has attention",
        USE_SD,
    ),
    "five-stages": (
        lambda: make_unet(
            tiny_unet_config(
                "sd15",
                block_out_channels=(32, 32, 64, 64, 64),
                down_block_types=("CrossAttnDownBlock2D",) * 4 + ("DownBlock2D",),
                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 4,
            )
        ),
        r"UNet2DConditionModel",
        r"5 down stages .*a layout HiDiffusion has no record for",
        USE_SD,
    ),
    "sd-layout-without-up-attention": (
        lambda: make_unet(tiny_unet_config("sd15", up_block_types=("UpBlock2D",) * 4)),
        r"UNet2DConditionModel",
        r"up stage \d needs two attention layers",
        USE_SD,
    ),
    "not-a-unet-module": (lambda: nn.Linear(4, 4), r"Linear", r"no down_blocks/up_blocks", r"pass a Stable Diffusion"),
    "transformer-pipeline": (
        _TransformerPipeline,
        r"_TransformerPipeline",
        r"transformer \(Linear\), not a U-Net",
        WITHOUT,
    ),
    "string": (
        lambda: "runwayml/stable-diffusion-v1-5",
        r"\bstr\b",
        r"`unet`",
        r"pass e\.g\. a StableDiffusionPipeline",
    ),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_every_refusal_names_the_model_what_is_missing_and_what_to_do(case):
    build, model, missing, fix = REFUSALS[case]
    obj = build()
    module = obj if isinstance(obj, nn.Module) else getattr(obj, "unet", None)
    before = snapshot(module) if isinstance(module, nn.Module) else None
    with pytest.raises(UnsupportedModelError) as info:
        apply_hidiffusion(obj)
    message = str(info.value)
    for pattern in (model, missing, fix):
        assert re.search(pattern, message), (pattern, message)
    if before is not None:
        assert_untouched(module, before)


def test_deepfloyd_if_refusal_names_added_key_value_attention_not_a_missing_transformer():
    with pytest.raises(UnsupportedModelError) as info:
        hidiff.detect_layout(_if_unet())
    message = str(info.value)
    assert "added key/value cross-attention" in message and "DeepFloyd IF" in message
    assert "self-attention only" not in message and "none has attention" not in message


def test_pipeline_sharing_unet_and_scheduler_runs_under_the_first_patch():
    from diffusers import StableDiffusionImg2ImgPipeline

    pipe = sd_pipe()
    other = StableDiffusionImg2ImgPipeline(**pipe.components)  # the same scheduler object too
    other.set_progress_bar_config(disable=True)
    apply_hidiffusion(pipe, t1_ratio=0.5, t2_ratio=0.0)
    image = torch.rand(1, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, records = run(other, steps=6, image=image, strength=0.5, height=None, width=None)
    assert [(r.step, r.total, r.conv) for r in records] == [(0, 3, True), (1, 3, False), (2, 3, False)]


def test_pipeline_sharing_unet_with_its_own_scheduler_is_warned_about():
    from diffusers import DDIMScheduler, StableDiffusionImg2ImgPipeline

    pipe = sd_pipe()
    other = StableDiffusionImg2ImgPipeline(
        **{**pipe.components, "scheduler": DDIMScheduler.from_config(pipe.scheduler.config)}
    )
    other.set_progress_bar_config(disable=True)
    apply_hidiffusion(pipe, t1_ratio=0.5, t2_ratio=0.0)
    run(pipe, steps=6)
    image = torch.rand(1, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(3))
    with pytest.warns(UserWarning) as caught:
        run(other, steps=8, image=image, strength=0.5, height=None, width=None)
    messages = [str(w.message) for w in caught if "hidiff" in str(w.message)]
    assert len(messages) == 1, messages  # once, not at every call
    for part in ("UNet2DConditionModel", "StableDiffusionPipeline's scheduler", "estimated", "own U-Net"):
        assert part in messages[0], (part, messages[0])
