"""Every way a patched model is copied or serialised (issue 27, fault 1), from the user's side.

Each one either gives a model that behaves exactly as the original (bitwise the same output
on the same inputs), or saves the stock model with a warning that says so, or is refused with
a message naming hidiff and what to do. The reported case: ``torch.save(pipe.unet)`` of a
patched U-Net, loaded into a pipeline of the same components, was still patched but followed
no schedule (its steps estimated from the timestep value), so RAU-Net ran at other steps and
the image differed (max 0.39 on tiny SD at an odd size), silently.
"""

from __future__ import annotations

import copy
import io
import pickle
import re
import warnings

import pytest
import torch
from diffusers import StableDiffusionPipeline

from hidiff import apply_hidiffusion, get_patch, is_patched, last_call, remove_hidiffusion
from hidiff.diffusers.testing import tiny_pipeline

ODD = dict(height=72, width=104)  # latent 9 x 13 on a 64 px model: the reported odd size
STEPS = 3
# T1 = T2 = int(3 * 0.7) = 2: RAU-Net acts in steps 0 and 1, not in step 2, so a copy that
# placed its calls at other steps would show.
ACTING = dict(preset="sd-1024", t1_ratio=0.7, t2_ratio=0.7)


def sd_pipe():
    return tiny_pipeline("sd15", sample_size=8)


def call(pipe, unet=None, step=0):
    """One U-Net call at step ``step`` of the pipeline's schedule, on fixed inputs (latent 9 x 13)."""
    pipe.scheduler.set_timesteps(STEPS)
    sample = torch.randn(2, 4, 9, 13, generator=torch.Generator().manual_seed(0))
    text = torch.randn(2, 77, 32, generator=torch.Generator().manual_seed(1))
    return (unet or pipe.unet)(sample, pipe.scheduler.timesteps[step], encoder_hidden_states=text).sample


def run(pipe, seed=0, **kwargs):
    """(final latents, (step, conv, pool, window calls) of every step)."""
    records = []

    def on_step_end(p, i, t, callback_kwargs):
        r = last_call(p)
        records.append((r.step, r.conv, r.pool, r.window_calls) if r is not None else None)
        return callback_kwargs

    out = pipe(
        "one red circle",
        num_inference_steps=STEPS,
        generator=torch.Generator().manual_seed(seed),
        output_type="latent",
        callback_on_step_end=on_step_end,
        **{**ODD, **kwargs},
    )
    return out.images, records


def with_unet(pipe, unet):
    other = StableDiffusionPipeline(**{**pipe.components, "unet": unet})
    other.set_progress_bar_config(disable=True)
    return other


def refusal(unet_name, followed):
    return (
        f"hidiff: cannot pickle {unet_name} (torch.save of the module or its pipeline) while HiDiffusion is "
        f"applied: the patch follows {followed}, which does not travel with the pickle, so a loaded copy would run "
        "RAU-Net at other steps. Save the weights instead (torch.save(unet.state_dict(), path) or "
        "save_pretrained) and apply HiDiffusion again after loading, or call hidiff.remove_hidiffusion first; "
        "copy.deepcopy works while patched."
    )


# --------------------------------------------------------------------------- pickle / torch.save
@pytest.mark.parametrize("what", ["unet", "pipeline", "pickle.dumps"])
def test_saving_a_patched_model_by_pickle_is_refused_naming_hidiff_and_the_fix(what):
    pipe = sd_pipe()
    apply_hidiffusion(pipe, **ACTING)
    before = call(pipe)
    assert last_call(pipe).conv
    with pytest.raises(pickle.PicklingError) as info:
        if what == "pickle.dumps":
            pickle.dumps(pipe.unet)
        else:
            torch.save(pipe.unet if what == "unet" else pipe, io.BytesIO())
    assert str(info.value) == refusal("UNet2DConditionModel", "StableDiffusionPipeline's scheduler")
    # nothing changed: still patched, the same output
    assert is_patched(pipe) and get_patch(pipe).pipe is pipe
    assert torch.equal(call(pipe), before)


def test_a_unet_following_a_given_scheduler_or_deep_copied_alone_is_refused_too():
    pipe = sd_pipe()
    unet = copy.deepcopy(pipe.unet)
    apply_hidiffusion(unet, scheduler=pipe.scheduler)
    with pytest.raises(pickle.PicklingError) as info:
        torch.save(unet, io.BytesIO())
    assert str(info.value) == refusal("UNet2DConditionModel", "DDIMScheduler")
    apply_hidiffusion(pipe)
    with pytest.raises(pickle.PicklingError, match="the patch follows DDIMScheduler, which"):
        torch.save(copy.deepcopy(pipe.unet), io.BytesIO())


@pytest.mark.slow
def test_the_fixes_the_refusal_names_give_the_original_result():
    """Save the state dict (or remove first), load, apply again through the new pipeline:
    bitwise the patched original's image, with RAU-Net at the same steps."""
    pipe = sd_pipe()
    apply_hidiffusion(pipe, **ACTING)
    original, records = run(pipe)
    assert [r[1] for r in records] == [True, True, False]

    buffer = io.BytesIO()
    torch.save(pipe.unet.state_dict(), buffer)
    buffer.seek(0)
    fresh = sd_pipe()
    fresh.unet.load_state_dict(torch.load(buffer))
    apply_hidiffusion(fresh, **ACTING)
    fresh_latents, fresh_records = run(fresh)
    assert torch.equal(fresh_latents, original) and fresh_records == records

    remove_hidiffusion(pipe)
    buffer = io.BytesIO()
    torch.save(pipe.unet, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert not is_patched(loaded)
    other = with_unet(pipe, loaded)
    apply_hidiffusion(other, **ACTING)
    again, again_records = run(other)
    assert torch.equal(again, original) and again_records == records


def test_a_unet_patched_without_any_schedule_pickles_exactly():
    """A bare U-Net patched without a scheduler places each call by its timestep value; so
    does its loaded copy: the same output on the same calls, and it is removed on its own."""
    pipe = sd_pipe()
    unet = pipe.unet
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        apply_hidiffusion(unet)
    sample = torch.randn(2, 4, 9, 13, generator=torch.Generator().manual_seed(0))
    text = torch.randn(2, 77, 32, generator=torch.Generator().manual_seed(1))
    buffer = io.BytesIO()
    torch.save(unet, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert is_patched(loaded) and get_patch(loaded).unet is loaded and get_patch(loaded) is not get_patch(unet)
    for t in (981, 741, 501, 261, 21):
        expected = unet(sample, t, encoder_hidden_states=text).sample
        got = loaded(sample, t, encoder_hidden_states=text).sample
        assert torch.equal(got, expected), t
        assert (last_call(loaded).conv, last_call(loaded).window_calls) == (
            last_call(unet).conv,
            last_call(unet).window_calls,
        )
    assert last_call(loaded).window_calls > 0
    remove_hidiffusion(loaded)
    assert not is_patched(loaded) and is_patched(unet)
    assert not any(m._forward_pre_hooks or m._forward_hooks or m._state_dict_pre_hooks for m in loaded.modules())


# --------------------------------------------------------------------------- deepcopy
def test_deep_copies_behave_exactly_as_the_original_at_the_reported_size():
    pipe = sd_pipe()
    apply_hidiffusion(pipe, **ACTING)
    original, records = run(pipe)
    cloned, clone_records = run(copy.deepcopy(pipe))
    assert torch.equal(cloned, original) and clone_records == records
    other = with_unet(pipe, copy.deepcopy(pipe.unet))
    copied, copy_records = run(other)
    assert torch.equal(copied, original) and copy_records == records


def test_a_unet_given_a_scheduler_and_deep_copied_alone_keeps_following_that_scheduler():
    """A deep copy of the scheduler would be a schedule nothing drives: every call off it."""
    pipe = sd_pipe()
    apply_hidiffusion(pipe.unet, scheduler=pipe.scheduler, **ACTING)
    original, records = run(pipe)
    unet = copy.deepcopy(pipe.unet)
    assert get_patch(unet).scheduler is pipe.scheduler
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an off-schedule call would warn
        copied, copy_records = run(with_unet(pipe, unet))
    assert torch.equal(copied, original) and copy_records == records


# --------------------------------------------------------------------------- save_pretrained
def saved_stock(saver):
    return (
        f"hidiff: UNet2DConditionModel is saved by {saver} without HiDiffusion: the patch is applied at run "
        "time and is not part of the weights or the config, so the saved model loads stock. Apply HiDiffusion "
        "again after loading (hidiff.apply_hidiffusion(pipe))."
    )


@pytest.mark.slow
def test_save_pretrained_of_a_patched_pipeline_warns_and_loads_stock(tmp_path):
    pipe = sd_pipe()
    stock = call(pipe)
    apply_hidiffusion(pipe, **ACTING)
    patched = call(pipe)
    assert not torch.equal(patched, stock)
    with pytest.warns(UserWarning) as caught:
        pipe.save_pretrained(tmp_path)
    assert [str(w.message) for w in caught if "hidiff" in str(w.message)] == [saved_stock("diffusers save_pretrained")]
    loaded = StableDiffusionPipeline.from_pretrained(tmp_path)
    assert not is_patched(loaded) and is_patched(pipe)
    assert torch.equal(call(loaded), stock)
    assert torch.equal(call(pipe), patched)
    apply_hidiffusion(loaded, **ACTING)
    assert torch.equal(call(loaded), patched)


def test_only_library_saves_warn_not_every_state_dict():
    pipe = sd_pipe()
    apply_hidiffusion(pipe)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pipe.unet.state_dict()
        torch.save(pipe.unet.state_dict(), io.BytesIO())
    remove_hidiffusion(pipe)
    assert not pipe.unet._state_dict_pre_hooks


# --------------------------------------------------------------------------- accelerate
@pytest.fixture
def fresh_accelerate():
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


def test_accelerate_prepare_keeps_the_patch_exactly(fresh_accelerate):
    from accelerate import Accelerator

    pipe = sd_pipe()
    apply_hidiffusion(pipe, **ACTING)
    original = [call(pipe, step=k) for k in range(STEPS)]
    prepared = Accelerator(cpu=True).prepare(pipe.unet)
    assert prepared is pipe.unet and is_patched(pipe)
    for k in range(STEPS):
        assert torch.equal(call(pipe, step=k), original[k])
        assert last_call(pipe).conv == (k < 2) and last_call(pipe).window_calls > 0


def test_accelerate_mixed_precision_prepare_before_or_after_apply_is_the_same(fresh_accelerate):
    """bf16 autocast changes the numbers for hidiff and stock alike; the order of prepare and
    apply does not matter, and hidiff still acts."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True, mixed_precision="bf16")
    first, second = sd_pipe(), sd_pipe()
    apply_hidiffusion(first, **ACTING)
    accelerator.prepare(first.unet)
    accelerator.prepare(second.unet)
    apply_hidiffusion(second, **ACTING)
    assert torch.equal(call(first), call(second))
    assert last_call(first).conv and last_call(first).window_calls > 0


def test_accelerate_save_model_warns_it_saves_stock(tmp_path, fresh_accelerate):
    from accelerate import Accelerator

    pipe = sd_pipe()
    apply_hidiffusion(pipe)
    with pytest.warns(UserWarning, match=re.escape(saved_stock("accelerate save_model"))):
        Accelerator(cpu=True).save_model(pipe.unet, tmp_path)


@pytest.fixture
def one_process_group(monkeypatch):
    """A gloo process group of one (what accelerate's prepare wraps models in across processes)."""
    import socket

    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_distributed_data_parallel_wraps_the_patched_unet_exactly(one_process_group):
    """accelerate's prepare on several processes wraps the U-Net in DistributedDataParallel: the
    wrapped patched U-Net gives bitwise its own output, and apply / remove through the wrapper
    act on the U-Net inside."""
    from torch.nn.parallel import DistributedDataParallel

    pipe = sd_pipe()
    apply_hidiffusion(pipe, **ACTING)
    original = call(pipe)
    wrapped = DistributedDataParallel(pipe.unet)
    with torch.no_grad():
        assert torch.equal(call(pipe, unet=wrapped), original)
    assert last_call(pipe).conv
    remove_hidiffusion(wrapped)
    assert not is_patched(pipe.unet)
    apply_hidiffusion(wrapped, scheduler=pipe.scheduler, **ACTING)
    assert get_patch(wrapped) is get_patch(pipe.unet) and get_patch(pipe.unet).unet is pipe.unet
    with torch.no_grad():
        assert torch.equal(call(pipe, unet=wrapped), original)
