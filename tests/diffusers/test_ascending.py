"""Runs whose timesteps ascend, or whose scheduler is not the one hidiff follows (issue 27, fault 2).

A user inverts with diffusers' own ``DDIMInverseScheduler`` in a plain loop, as DiffEdit and
pix2pix-zero do. Sampling runs RAU-Net at the high timesteps (the first steps); an inversion
calls the U-Net at the same timesteps in the other order, and each call must be planned as
the sampling step at its timestep (as ``hidiff.invert`` does), or be reported with the fix:
never silently planned as if the inversion's first call (t = 1) were sampling's first step.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from diffusers import DDIMInverseScheduler

import hidiff
from hidiff.diffusers.testing import tiny_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 10
NATIVE = 32  # a tiny SD U-Net with sample_size 32 (256 px), so that 2x native is a cheap 64x64 latent
LATENT = (64, 64)  # 2x native: the sd-1024 preset, RAU-Net in the first 40% of steps


@pytest.fixture
def sd_pipe():
    pipe = tiny_pipeline("sd15", sample_size=NATIVE)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sampling_plan(pipe, steps=STEPS):
    """{timestep: (step, total, conv, pool)} of a sampling run of ``steps`` at LATENT, from a real run."""
    records = {}
    pipe.scheduler.set_timesteps(steps)
    timesteps = [int(t) for t in pipe.scheduler.timesteps]
    with torch.no_grad():
        for t in timesteps:
            pipe.unet(latents(), t, encoder_hidden_states=text(pipe))
            r = hidiff.last_call(pipe)
            records[t] = (r.step, r.total, r.conv, r.pool)
    return records


def latents(seed=0):
    return torch.randn(1, 4, *LATENT, generator=torch.Generator().manual_seed(seed))


def text(pipe):
    return torch.randn(1, 8, pipe.unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))


def invert_loop(pipe, inverse, unet=None):
    """The user's inversion loop: DDIMInverseScheduler's ascending timesteps, one U-Net call each.
    Returns [(t, step, total, conv, pool)] read from hidiff's record after each call."""
    unet = unet if unet is not None else pipe.unet
    x, out = latents(), []
    with torch.no_grad():
        for t in inverse.timesteps:
            eps = unet(x, t, encoder_hidden_states=text(pipe)).sample
            x = inverse.step(eps, t, x).prev_sample
            r = hidiff.last_call(unet)
            out.append((int(t), r.step, r.total, r.conv, r.pool))
    return out


def inverse_scheduler(pipe, steps=STEPS):
    inverse = DDIMInverseScheduler.from_config(pipe.scheduler.config)
    inverse.set_timesteps(steps)
    assert inverse.timesteps[0] < inverse.timesteps[-1]  # the schedule ascends
    return inverse


def test_pipeline_inverse_scheduler_is_planned_as_the_sampling_it_mirrors(sd_pipe):
    """DiffEdit / pix2pix-zero keep their DDIMInverseScheduler as ``pipe.inverse_scheduler``."""
    hidiff.apply_hidiffusion(sd_pipe)
    sampling = sampling_plan(sd_pipe)
    assert any(conv for *_, conv, _ in sampling.values())  # RAU-Net acts somewhere in sampling
    sd_pipe.inverse_scheduler = inverse_scheduler(sd_pipe)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="hidiff")  # and nothing to warn about
        calls = invert_loop(sd_pipe, sd_pipe.inverse_scheduler)
    assert [t for t, *_ in calls] == sorted(sampling)  # the inversion walks sampling's timesteps upwards
    for t, step, total, conv, pool in calls:
        assert (step, total, conv, pool) == sampling[t], t
    # RAU-Net at the high timesteps only (where sampling runs it), not at t = 1.
    assert not calls[0][3] and calls[-1][3]


def test_bare_unet_following_an_inverse_scheduler(sd_pipe):
    hidiff.apply_hidiffusion(sd_pipe)
    sampling = sampling_plan(sd_pipe)
    hidiff.remove_hidiffusion(sd_pipe)
    inverse = inverse_scheduler(sd_pipe)
    hidiff.apply_hidiffusion(sd_pipe.unet, scheduler=inverse)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="hidiff")
        calls = invert_loop(sd_pipe, inverse)
    assert [(step, total, conv, pool) for _, step, total, conv, pool in calls] == [sampling[t] for t, *_ in calls]


def test_same_as_hidiff_invert(sd_pipe):
    """hidiff.invert and a DDIMInverseScheduler loop plan every timestep the same way."""
    hidiff.apply_hidiffusion(sd_pipe)
    seen = {}

    def after_call(module, args, output):
        r = hidiff.last_call(module)
        seen[round(float(args[1]))] = (r.step, r.total, r.conv, r.pool)

    handle = sd_pipe.unet.register_forward_hook(after_call)
    try:
        image = torch.rand(1, 3, 8 * LATENT[0], 8 * LATENT[1], generator=torch.Generator().manual_seed(2))
        hidiff.invert(sd_pipe, image, "a cat", guidance=0.5, num_inference_steps=STEPS)
    finally:
        handle.remove()
    sd_pipe.inverse_scheduler = inverse_scheduler(sd_pipe)
    calls = invert_loop(sd_pipe, sd_pipe.inverse_scheduler)
    assert {t: tuple(rest) for t, *rest in calls} == seen


def test_loop_walking_the_followed_schedule_upwards_warns_with_the_fix(sd_pipe):
    """An inverse scheduler hidiff cannot see, whose timesteps are those of the pipeline's own
    scheduler (set by an earlier sampling run): the upward walk is reported, with the fix, and
    every call from the second on is planned as the sampling step at its timestep."""
    hidiff.apply_hidiffusion(sd_pipe)
    sampling = sampling_plan(sd_pipe)
    with pytest.warns(UserWarning) as caught:
        calls = invert_loop(sd_pipe, inverse_scheduler(sd_pipe))
    messages = [str(w.message) for w in caught if "hidiff" in str(w.message)]
    assert len(messages) == 1, messages  # once, not at every call
    for part in ("upwards", "inversion", "hidiff.invert", "pipe.inverse_scheduler", "scheduler=inverse_scheduler"):
        assert part in messages[0], (part, messages[0])
    for t, step, total, conv, pool in calls[1:]:
        assert (step, total, conv, pool) == sampling[t], t
    assert [conv for *_, conv, _ in calls] == [sampling[t][2] for t, *_ in calls]


def test_loop_off_the_followed_schedule_is_planned_by_noise_level_and_warned(sd_pipe):
    """An inverse scheduler with other steps than the followed one: its timesteps are not in
    that schedule; each call is planned at the sampled step nearest in noise level (the
    off-schedule rule) and a warning says so: RAU-Net only at the high timesteps."""
    hidiff.apply_hidiffusion(sd_pipe)
    sampling = sampling_plan(sd_pipe, steps=7)
    with pytest.warns(UserWarning) as caught:
        calls = invert_loop(sd_pipe, inverse_scheduler(sd_pipe, steps=STEPS))
    messages = [str(w.message) for w in caught if "hidiff" in str(w.message)]
    assert len(messages) == 1 and "estimated" in messages[0] and "hidiff.invert" in messages[0], messages
    assert all(total == 7 for _, _, total, _, _ in calls)
    conv = [c for _, _, _, c, _ in calls]
    assert not conv[0] and conv[-1]
    # RAU-Net exactly above sampling's highest timestep without it: a call between two sampled
    # timesteps belongs to the step it would have started from.
    highest_without = max(t for t, v in sampling.items() if not v[2])
    assert [t > highest_without for t, *_ in calls] == conv
