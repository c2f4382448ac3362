"""InvokeAI's denoise with the node's HiDiffusion equals the diffusers host on the same weights,
noise and schedule: the InvokeAI host adds nothing of its own to the maths."""

from __future__ import annotations

import sys

import pytest
import torch
from invoketest import NATIVE_LATENT, ROOT

import hidiff
from hidiff.core.config import HiDiffusionConfig

sys.path.insert(0, str(ROOT / "tools"))
import invokeai_builtin as harness  # noqa: E402

STEPS = 5
CFG = 5.0
LATENT = 2 * NATIVE_LATENT


def tiny_parts(seed: int = 0):
    from diffusers import EulerDiscreteScheduler

    from hidiff.diffusers.testing import tiny_components

    parts = tiny_components("sd15", seed=seed, sample_size=NATIVE_LATENT)
    scheduler = EulerDiscreteScheduler.from_config(parts["scheduler"].config, use_karras_sigmas=False)
    return parts, scheduler


def invokeai_latents(unet, scheduler, cond, uncond, noise, config, denoising=(0.0, 1.0), start_latents=None):
    """The node's path (InvokeAI's pipeline and schedule, latents_from_embeddings with HiDiffusion;
    plain where ``config`` is None): (final latents, the run's report)."""
    from invokeai.backend.stable_diffusion.diffusion.conditioning_data import (
        BasicConditioningInfo,
        TextConditioningData,
    )

    reports: list = []
    latents = harness.denoise(
        "plain" if config is None else "hidiff",
        unet,
        scheduler,
        0,
        tuple(noise.shape[-2:]),
        STEPS,
        denoising,
        start_latents,
        config=config,
        conditioning_data=TextConditioningData(
            BasicConditioningInfo(uncond), BasicConditioningInfo(cond), None, None, guidance_scale=CFG
        ),
        noise=noise,
        reports=reports,
    )
    return latents, (reports[0] if reports else None)


@pytest.mark.parametrize("options", [{}, {"window_shift": "none", "t1_ratio": 0.6}], ids=["defaults", "options"])
def test_final_latents_equal_the_diffusers_host(options):
    from diffusers import StableDiffusionPipeline

    parts, scheduler = tiny_parts()
    pipe = StableDiffusionPipeline(**{**parts, "scheduler": scheduler}, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(3)
    cond, uncond = torch.randn(1, 6, 32, generator=g), torch.randn(1, 6, 32, generator=g)
    noise = torch.randn(1, 4, LATENT, LATENT, generator=g)

    ours, report = invokeai_latents(parts["unet"], scheduler, cond, uncond, noise, HiDiffusionConfig(**options))
    assert report.summary()["conv_steps"], "RAU-Net did not act: the comparison would prove little"

    # InvokeAI starts from add_noise(zeros, noise, t0) = noise x sigma_0; diffusers from latents x
    # init_noise_sigma: hand diffusers the latents that make the two starts one.
    scheduler.set_timesteps(STEPS)
    start = noise * scheduler.sigmas[0] / scheduler.init_noise_sigma
    with hidiff.hidiffusion(pipe, **options):
        theirs = pipe(
            prompt_embeds=cond,
            negative_prompt_embeds=uncond,
            guidance_scale=CFG,
            num_inference_steps=STEPS,
            latents=start,
            output_type="latent",
        ).images
    plain, _ = invokeai_latents(parts["unet"], scheduler, cond, uncond, noise, None)
    assert (ours - plain).abs().max() > 1e-2, "HiDiffusion changed nothing"
    assert torch.allclose(ours, theirs, atol=1e-4, rtol=0), (ours - theirs).abs().max()


def test_image_to_image_equals_the_diffusers_host_on_the_steps_that_run():
    """InvokeAI's denoising_start runs a slice of the schedule; the diffusers host given just those
    timesteps (a run of that many steps) plans the same steps, so the latents agree. (A fixed window
    seed: the seeded shifts hash the first call's latents, which the two hosts' start arithmetic
    reaches only to the last bit.)"""
    from diffusers import StableDiffusionPipeline

    parts, scheduler = tiny_parts()
    pipe = StableDiffusionPipeline(**{**parts, "scheduler": scheduler}, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(4)
    cond, uncond = torch.randn(1, 6, 32, generator=g), torch.randn(1, 6, 32, generator=g)
    noise = torch.randn(1, 4, LATENT, LATENT, generator=g)
    image = torch.randn(1, 4, LATENT, LATENT, generator=g)

    ours, report = invokeai_latents(
        parts["unet"], scheduler, cond, uncond, noise, HiDiffusionConfig(window_seed=7), (0.4, 1.0), image
    )
    ran = len(report.records)
    assert 0 < ran < STEPS and report.summary()["conv_steps"] == list(range(int(ran * 0.4)))

    scheduler.set_timesteps(STEPS)
    timesteps = scheduler.timesteps[STEPS - ran :]
    sigma = scheduler.sigmas[STEPS - ran]
    with hidiff.hidiffusion(pipe, window_seed=7):
        pipe.scheduler.set_timesteps(timesteps=timesteps.tolist())
        start = (image + noise * sigma) / pipe.scheduler.init_noise_sigma
        theirs = pipe(
            prompt_embeds=cond,
            negative_prompt_embeds=uncond,
            guidance_scale=CFG,
            timesteps=timesteps.tolist(),
            latents=start,
            output_type="latent",
        ).images
    assert torch.allclose(ours, theirs, atol=1e-4, rtol=0), (ours - theirs).abs().max()
