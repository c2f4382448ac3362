"""hidiff's diffusers CFG++ samplers against ComfyUI's own CFG++ samplers (an external
implementation), on identical weights, noise and sigmas.

ComfyUI's ``euler_cfg_pp`` / ``euler_ancestral_cfg_pp`` / ``dpmpp_2m_cfg_pp`` take their
``cfg`` value as the CFG++ weight itself: ComfyUI cfg c is hidiff's ``guidance`` lam = c
(hidiff's lam in [0, 1] stands for an ordinary guidance scale of 1 + 11.5 lam; ComfyUI users
type that lam into the KSampler's cfg field). The diffusers pipeline runs with
``prompt_embeds`` (no text encoder); its latents are scaled so that it starts where ComfyUI
starts (noise x sqrt(1 + sigma_max^2); the pipeline multiplies by its init_noise_sigma,
sigma_max). For the ancestral sampler ComfyUI gets a noise sampler that returns the values
diffusers' scheduler draws from its generator, step by step.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers", reason="the cross-host comparison needs diffusers in this ComfyUI's Python")
from comfytest import conds
from test_cross_host import TOLERANCE, twin_models

pytestmark = pytest.mark.patch_api

STEPS = 6
HW = (32, 32)


def diffusers_run(unet, sampler, lam, noise, positive, negative, seed, spacing="trailing"):
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    import hidiff
    from hidiff.diffusers.testing import tiny_vae

    base = EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        timestep_spacing=spacing,
        steps_offset=1 if spacing == "leading" else 0,
    )
    pipe = StableDiffusionPipeline(
        vae=tiny_vae(),
        text_encoder=None,
        tokenizer=None,
        unet=unet,
        scheduler=base,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    hidiff.enable_cfgpp(pipe, scheduler=sampler, guidance=lam)
    sched = pipe.scheduler
    sched.set_timesteps(STEPS)
    if hasattr(sched, "sigmas"):
        sigmas = sched.sigmas.clone()
    else:  # DDIM: the sigmas of its integer timesteps, then its final level (alpha 1: sigma 0)
        alphas = sched.alphas_cumprod[sched.timesteps.long()]
        sigmas = torch.cat([((1 - alphas) / alphas) ** 0.5, torch.zeros(1)])
    sigma_max = float(sigmas[0])
    if float(sched.init_noise_sigma) == 1.0:  # a variance-preserving sampler (DPM-Solver): x / sqrt(1 + sigma^2)
        latents = noise
    else:  # sigma form (Euler): ComfyUI's start
        latents = noise * ((1 + sigma_max**2) ** 0.5 / float(sched.init_noise_sigma))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        out = pipe(
            prompt_embeds=positive[0][0],
            negative_prompt_embeds=negative[0][0],
            guidance_scale=2.0,
            num_inference_steps=STEPS,
            latents=latents,
            output_type="latent",
            generator=g,
            height=8 * HW[0],
            width=8 * HW[1],
        ).images
    hidiff.disable_cfgpp(pipe)
    return out, sigmas, sched


def comfy_run(patcher, name, lam, noise, sigmas, positive, negative, noise_seed):
    import comfy.sample
    import comfy.samplers

    extra = {}
    if "ancestral" in name:
        g = torch.Generator().manual_seed(noise_seed)

        def noise_sampler(sigma, sigma_next):  # diffusers' EulerAncestral draws one randn per step
            return torch.randn(noise.shape, generator=g)

        extra["noise_sampler"] = noise_sampler
    sampler = comfy.samplers.ksampler(name, extra)
    out = comfy.sample.sample_custom(
        patcher,
        noise,
        lam,
        sampler,
        sigmas.to(torch.float32),
        positive,
        negative,
        torch.zeros_like(noise),
        disable_pbar=True,
        seed=0,
    )
    return out * patcher.model.latent_format.scale_factor


CASES = [
    ("euler", "euler_cfg_pp", 0.0),
    ("euler", "euler_cfg_pp", 0.6),
    ("euler", "euler_cfg_pp", 1.0),
    ("euler-a", "euler_ancestral_cfg_pp", 0.0),
    ("euler-a", "euler_ancestral_cfg_pp", 0.6),
    ("euler-a", "euler_ancestral_cfg_pp", 1.0),
    ("dpmpp-2m", "dpmpp_2m_cfg_pp", 0.0),  # the stock DPM-Solver++(2M) steps agree
]


@pytest.mark.parametrize("ours,theirs,lam", CASES, ids=[f"{c[0]}-lam{c[2]}" for c in CASES])
def test_cfgpp_matches_comfyui(ours, theirs, lam):
    unet, patcher = twin_models("sd15")
    noise = torch.randn(1, 4, *HW, generator=torch.Generator().manual_seed(4))
    positive, negative = conds("sd15", 8 * HW[0], 8 * HW[1])
    want, sigmas, _ = diffusers_run(unet, ours, lam, noise, positive, negative, seed=9)
    got = comfy_run(patcher, theirs, lam, noise, sigmas, positive, negative, noise_seed=9)
    err, ref = float((got - want).abs().max()), float(want.abs().max())
    print(
        f"CFG++ {ours} vs ComfyUI {theirs} lam={lam}: max|diff| {err:.3g}, max|x| {ref:.3g}, relative {err / ref:.2g}"
    )
    assert err <= TOLERANCE * ref


@pytest.mark.parametrize("lam", [0.6, 1.0])
def test_dpmpp_2m_cfgpp_differs_from_comfyui_in_its_second_order_term(lam):
    """Known, documented difference. Both take x_next = D_l + e^-h (x - D_u) with the 2M
    extrapolated clean estimates, but hidiff extrapolates each history with itself
    (D_l from the guided x0s, D_u from the unconditional ones), while ComfyUI's
    dpmpp_2m_cfg_pp extrapolates with (guided x0 now - unconditional x0 before). The two agree
    at lam = 0 (test above) and on the first step; this test pins the size of the difference
    (relative to max |x|, 6 steps, random weights) so a change on either side shows up."""
    unet, patcher = twin_models("sd15")
    noise = torch.randn(1, 4, *HW, generator=torch.Generator().manual_seed(4))
    positive, negative = conds("sd15", 8 * HW[0], 8 * HW[1])
    want, sigmas, _ = diffusers_run(unet, "dpmpp-2m", lam, noise, positive, negative, seed=9)
    got = comfy_run(patcher, "dpmpp_2m_cfg_pp", lam, noise, sigmas, positive, negative, noise_seed=9)
    rel = float((got - want).abs().max()) / float(want.abs().max())
    print(f"CFG++ dpmpp-2m vs ComfyUI dpmpp_2m_cfg_pp lam={lam}: relative max|diff| {rel:.3g}")
    assert 0.01 < rel < 0.5
    # One step only: both rules are first order there and agree.
    want1, sig1, _ = diffusers_run_steps(unet, lam, noise, positive, negative, steps=1)
    got1 = comfy_run(patcher, "dpmpp_2m_cfg_pp", lam, noise, sig1, positive, negative, noise_seed=9)
    assert float((got1 - want1).abs().max()) <= TOLERANCE * float(want1.abs().max())


def diffusers_run_steps(unet, lam, noise, positive, negative, steps):
    global STEPS
    saved, STEPS = STEPS, steps
    try:
        return diffusers_run(unet, "dpmpp-2m", lam, noise, positive, negative, seed=9)
    finally:
        STEPS = saved


@pytest.mark.parametrize("lam", [0.0, 0.6])
def test_ddim_cfgpp_sampler_node_matches_hidiff_diffusers_ddim_cfgpp(lam):
    """The DDIM CFG++ this pack adds to ComfyUI equals hidiff's diffusers DDIM CFG++ on the DDIM
    scheduler's own timesteps (sigmas of its integer timesteps, down to 0)."""
    import comfy.sample

    from hidiff.comfy.samplers import SamplerDDIMCFGpp

    unet, patcher = twin_models("sd15")
    noise = torch.randn(1, 4, *HW, generator=torch.Generator().manual_seed(4))
    positive, negative = conds("sd15", 8 * HW[0], 8 * HW[1])
    # DDIM's own (leading) timesteps: each step goes exactly to the next timestep, the last to alpha 1.
    want, sigmas, sched = diffusers_run(unet, "ddim", lam, noise, positive, negative, seed=9, spacing="leading")
    assert float(sched.final_alpha_cumprod) == 1.0  # DDIM's last step lands on sigma 0
    step = 1000 // STEPS
    assert all(int(a) - int(b) == step for a, b in zip(sched.timesteps[:-1], sched.timesteps[1:]))
    # DDIM starts from noise at sqrt(1 + sigma_0^2) in sigma form; ComfyUI below sigma_max from noise x sigma_0.
    sigma0 = float(sigmas[0])
    noise = noise * (1 + sigma0**2) ** 0.5 / sigma0
    (sampler,) = SamplerDDIMCFGpp().get_sampler()
    got = (
        comfy.sample.sample_custom(
            patcher,
            noise,
            lam,
            sampler,
            sigmas.float(),
            positive,
            negative,
            torch.zeros_like(noise),
            disable_pbar=True,
            seed=0,
        )
        * patcher.model.latent_format.scale_factor
    )
    err, ref = float((got - want).abs().max()), float(want.abs().max())
    print(f"DDIM CFG++ node vs hidiff diffusers DDIM CFG++ lam={lam}: max|diff| {err:.3g}, relative {err / ref:.2g}")
    assert err <= TOLERANCE * ref
