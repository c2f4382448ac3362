"""remove_hidiffusion restores the model exactly; apply is idempotent; failures leave no trace."""

import pytest
import torch
from helpers import latents_of

import hidiff

SIZE = 640  # latent 80: above the tiny SD model's native 64, so HiDiffusion acts


def hook_state(module):
    """Hook counts of every submodule, plus classes and the settings hidiff may touch.

    Counts, not handle ids: ids grow with every registration, so two equal patches differ in ids.
    """
    state = []
    for name, m in module.named_modules():
        state.append(
            (
                name,
                type(m),
                len(m._forward_hooks),
                len(m._forward_pre_hooks),
                len(m._forward_hooks_with_kwargs),
                len(m._forward_pre_hooks_with_kwargs),
                len(m._forward_hooks_always_called),
                len(m._backward_hooks),
                len(m._state_dict_hooks),
                len(m._load_state_dict_pre_hooks),
                getattr(m, "stride", None),
                getattr(m, "padding", None),
                getattr(m, "dilation", None),
                type(getattr(m, "processor", None)),
            )
        )
    return state, getattr(module, "num_upsamplers", None), dict(module.config)


def state_dict_equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_patched_then_removed_equals_never_patched(sd_pipe):
    before_state = hook_state(sd_pipe.unet)
    before_weights = {k: v.clone() for k, v in sd_pipe.unet.state_dict().items()}
    stock = latents_of(sd_pipe, SIZE, SIZE)

    hidiff.apply_hidiffusion(sd_pipe)
    assert hook_state(sd_pipe.unet) != before_state
    patched = latents_of(sd_pipe, SIZE, SIZE)
    assert hidiff.last_call(sd_pipe).windows
    assert not torch.equal(patched, stock)

    assert hidiff.remove_hidiffusion(sd_pipe) is sd_pipe
    assert hook_state(sd_pipe.unet) == before_state
    assert state_dict_equal(sd_pipe.unet.state_dict(), before_weights)
    assert not hidiff.is_patched(sd_pipe)
    assert torch.equal(latents_of(sd_pipe, SIZE, SIZE), stock)


@pytest.mark.slow
def test_sdxl_patched_then_removed_equals_never_patched(sdxl_pipe):
    before_state = hook_state(sdxl_pipe.unet)
    side = 9 * sdxl_pipe.unet.config.sample_size  # 1.125x native
    stock = latents_of(sdxl_pipe, side, side, steps=6, guidance_scale=1.0)
    hidiff.apply_hidiffusion(sdxl_pipe)
    patched = latents_of(sdxl_pipe, side, side, steps=6, guidance_scale=1.0)
    assert not torch.equal(patched, stock)
    hidiff.remove_hidiffusion(sdxl_pipe)
    assert hook_state(sdxl_pipe.unet) == before_state
    assert torch.equal(latents_of(sdxl_pipe, side, side, steps=6, guidance_scale=1.0), stock)


@pytest.mark.slow
def test_apply_twice_equals_apply_once(sd_pipe):
    hidiff.apply_hidiffusion(sd_pipe)
    once_state = hook_state(sd_pipe.unet)
    once = latents_of(sd_pipe, SIZE, SIZE)
    hidiff.apply_hidiffusion(sd_pipe)
    assert hook_state(sd_pipe.unet) == once_state
    assert torch.equal(latents_of(sd_pipe, SIZE, SIZE), once)


@pytest.mark.slow
def test_apply_again_replaces_options(sd_pipe):
    hidiff.apply_hidiffusion(sd_pipe, window_attn=False)
    latents_of(sd_pipe, SIZE, SIZE)
    assert hidiff.last_call(sd_pipe).window_calls == 0
    hidiff.apply_hidiffusion(sd_pipe)
    latents_of(sd_pipe, SIZE, SIZE)
    assert hidiff.last_call(sd_pipe).window_calls == 5


def test_remove_unpatched_is_a_no_op(sd_pipe):
    before = hook_state(sd_pipe.unet)
    assert hidiff.remove_hidiffusion(sd_pipe) is sd_pipe
    assert hidiff.remove_hidiffusion(sd_pipe.unet) is sd_pipe.unet
    assert hook_state(sd_pipe.unet) == before


def test_pipeline_and_unet_are_the_same_patch(sd_pipe):
    hidiff.apply_hidiffusion(sd_pipe)
    assert hidiff.get_patch(sd_pipe.unet) is hidiff.get_patch(sd_pipe)
    hidiff.remove_hidiffusion(sd_pipe.unet)
    assert not hidiff.is_patched(sd_pipe)


class Stop(Exception):
    pass


def _raise_at(step):
    def callback(pipe, i, t, kwargs):
        if i == step:
            raise Stop
        return kwargs

    return callback


@pytest.mark.slow
def test_exception_mid_generation_leaves_next_run_correct(sd_pipe):
    hidiff.apply_hidiffusion(sd_pipe)
    clean = latents_of(sd_pipe, SIZE, SIZE, steps=6)
    with pytest.raises(Stop):
        latents_of(sd_pipe, SIZE, SIZE, steps=6, callback_on_step_end=_raise_at(2))
    # no conv left with a changed stride, no half-open window
    for m in sd_pipe.unet.modules():
        if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3) and "downsamplers" in str(m):
            assert m.stride in ((1, 1), (2, 2))
    assert torch.equal(latents_of(sd_pipe, SIZE, SIZE, steps=6), clean)


@pytest.mark.slow
def test_exception_inside_unet_restores_the_strided_conv(sd_pipe):
    """An error raised while the conv runs with stride 4 must not leave it strided."""
    hidiff.apply_hidiffusion(sd_pipe)
    conv = sd_pipe.unet.down_blocks[0].downsamplers[0].conv
    handle = conv.register_forward_hook(lambda *a: (_ for _ in ()).throw(Stop()))
    try:
        with pytest.raises(Stop):
            latents_of(sd_pipe, SIZE, SIZE)
    finally:
        handle.remove()
    assert conv.stride == (2, 2) and conv.padding == (1, 1) and conv.dilation == (1, 1)
    hidiff.remove_hidiffusion(sd_pipe)
    fresh_state = hook_state(sd_pipe.unet)
    stock = latents_of(sd_pipe, SIZE, SIZE)
    hidiff.apply_hidiffusion(sd_pipe)
    latents_of(sd_pipe, SIZE, SIZE)
    hidiff.remove_hidiffusion(sd_pipe)
    assert hook_state(sd_pipe.unet) == fresh_state
    assert torch.equal(latents_of(sd_pipe, SIZE, SIZE), stock)


@pytest.mark.slow
def test_context_manager_removes_on_exit_and_on_error(sd_pipe):
    before = hook_state(sd_pipe.unet)
    stock = latents_of(sd_pipe, SIZE, SIZE)
    with hidiff.hidiffusion(sd_pipe, window_attn=False) as p:
        assert p is sd_pipe and hidiff.is_patched(sd_pipe)
        latents_of(sd_pipe, SIZE, SIZE)
        rec = hidiff.last_call(sd_pipe)
        assert rec.preset == "sd-1024" and rec.window_calls == 0
    assert hook_state(sd_pipe.unet) == before
    with pytest.raises(Stop):
        with hidiff.hidiffusion(sd_pipe):
            latents_of(sd_pipe, SIZE, SIZE, callback_on_step_end=_raise_at(0))
    assert hook_state(sd_pipe.unet) == before
    assert torch.equal(latents_of(sd_pipe, SIZE, SIZE), stock)


def test_context_manager_puts_back_an_earlier_patch(sd_pipe):
    hidiff.apply_hidiffusion(sd_pipe, t1_ratio=0.9)
    outer = hook_state(sd_pipe.unet)
    with hidiff.hidiffusion(sd_pipe, raunet=False):
        assert hidiff.get_patch(sd_pipe).config.raunet is False
    assert hidiff.get_patch(sd_pipe).config.t1_ratio == 0.9
    assert hook_state(sd_pipe.unet) == outer


@pytest.mark.slow
def test_seeded_shifts_reproducible_and_leave_global_rng_alone(sd_pipe):
    hidiff.apply_hidiffusion(sd_pipe)
    torch.manual_seed(0)
    rng = torch.get_rng_state()
    first = latents_of(sd_pipe, SIZE, SIZE, seed=3)
    assert torch.equal(torch.get_rng_state(), rng)
    shifts = list(hidiff.last_call(sd_pipe).shifts)
    torch.manual_seed(99)  # a different global state must not matter
    second = latents_of(sd_pipe, SIZE, SIZE, seed=3)
    assert torch.equal(first, second)
    assert hidiff.last_call(sd_pipe).shifts == shifts
    other = latents_of(sd_pipe, SIZE, SIZE, seed=4)
    assert not torch.equal(other, first)


def test_reference_shift_mode_draws_one_global_number_per_windowed_call(sd_pipe):
    hidiff.apply_hidiffusion(sd_pipe, window_shift="reference", raunet=False)
    calls = []

    def count(pipe, i, t, kwargs):
        calls.append(hidiff.last_call(pipe).window_calls)
        return kwargs

    torch.manual_seed(5)
    latents_of(sd_pipe, SIZE, SIZE, steps=1, callback_on_step_end=count)
    after = torch.rand(1)
    torch.manual_seed(5)
    for _ in range(calls[0]):
        torch.rand(1)
    assert calls == [5] and torch.equal(torch.rand(1), after)
