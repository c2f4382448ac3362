"""The WebUI backend (hidiff.webui.patch) on an ldm-layout U-Net equals the diffusers host.

The U-Net is ComfyUI's ``openaimodel.UNetModel`` (the code reForge runs under
``ldm_patched``; AUTOMATIC1111's ldm and Forge's backend U-Nets have the same layout and
layer names), loaded with the weights of a diffusers U-Net (ComfyUI's key map), sampled
by a k-diffusion-style Euler loop as the WebUIs run it: x = noise x sigma_max, the CFG
denoiser called with each sigma, the U-Net with the sigma's timestep. The diffusers side
is the plain scheduler loop with hidiff applied. Same noise, sigmas and window seed:
final latents within 1e-4 of max|x| (fp32), SD 1.5 and SDXL layouts, 2x and odd sizes,
txt2img and img2img (the steps that really run), and the model bitwise stock afterwards.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from comfytest import HAVE_COMFY, NATIVE, conds

pytestmark = pytest.mark.skipif(not HAVE_COMFY, reason="needs the ComfyUI venv (.comfy) for an ldm-layout U-Net")

TOLERANCE = 1e-4


def webui_run(patcher, family, noise, sigmas, positive, latent_in, record=None, interrupt_at=None, **options):
    """k-diffusion Euler over ``sigmas`` with the WebUI backend installed for the run."""
    from hidiff.core.config import HiDiffusionConfig
    from hidiff.core.ops import image_seeds
    from hidiff.webui.patch import SamplingRun
    from hidiff.webui.structure import describe

    model = patcher.model
    unet = model.diffusion_model
    network = describe(unet)
    network = dataclasses.replace(
        network, architecture=dataclasses.replace(network.architecture, native=(NATIVE, NATIVE))
    )
    context = positive[0][0]
    y = None
    if family == "sdxl":
        extra = positive[0][1]
        y = model.encode_adm(**extra)
    x = latent_in + noise * float(sigmas[0])
    run = SamplingRun(
        unet, network, HiDiffusionConfig(**options), [float(s) for s in sigmas], image_seeds(noise), recorder=record
    )

    def cfg_denoiser(x, sigma):
        kwargs = {"c_crossattn": context}
        if y is not None:
            kwargs["y"] = y
        return model.apply_model(x, sigma, **kwargs)

    denoise = run.denoiser(cfg_denoiser)
    run.install()
    try:
        with torch.no_grad():
            for i in range(len(sigmas) - 1):
                if interrupt_at == i:
                    raise KeyboardInterrupt
                s = torch.full((x.shape[0],), float(sigmas[i]))
                denoised = denoise(x, s)
                d = (x - denoised) / float(sigmas[i])
                x = x + d * (float(sigmas[i + 1]) - float(sigmas[i]))
    finally:
        run.remove()
    return x


CASES = [
    ("sd15", (64, 64), 4, 0),  # 2x
    ("sd15", (37, 53), 4, 0),  # odd sides at every level, odd windows
    ("sd15", (64, 64), 6, 2),  # img2img: 4 of 6 steps run
    ("sdxl", (64, 64), 4, 0),
    ("sdxl", (37, 53), 4, 0),
]


@pytest.mark.parametrize(
    "family,hw,steps,start", CASES, ids=[f"{c[0]}-{c[1][0]}x{c[1][1]}-{c[2]}from{c[3]}" for c in CASES]
)
def test_webui_backend_equals_diffusers(family, hw, steps, start):
    from test_cross_host import run_diffusers, scheduler, twin_models

    unet, patcher = twin_models(family)
    g = torch.Generator().manual_seed(11)
    noise = torch.randn(1, 4, *hw, generator=g)
    latent = torch.zeros(1, 4, *hw) if start == 0 else torch.randn(1, 4, *hw, generator=g) * 5
    positive, negative = conds(family, 8 * hw[0], 8 * hw[1])
    sigma0 = float(scheduler(steps).sigmas[start])
    # run_diffusers starts a full-noise run at noise x sqrt(1 + sigma^2) (ComfyUI's choice); the
    # WebUIs' k-diffusion at noise x sigma: hand it the noise that starts at the same latent.
    diff_noise = noise * sigma0 / (1 + sigma0**2) ** 0.5 if start == 0 else noise
    options = dict(window_seed=1234)
    want, sigmas = run_diffusers(
        unet, family, diff_noise, steps, start, positive, latent, (8 * hw[0], 8 * hw[1]), **options
    )
    before = {k: v.clone() for k, v in patcher.model.diffusion_model.state_dict().items()}
    records = []
    got = webui_run(patcher, family, noise, sigmas, positive, latent, record=records.append, **options)
    err, ref = float((got - want).abs().max()), float(want.abs().max())
    print(f"webui backend {family} {hw} steps={steps} start={start}: max|diff| {err:.3g}, relative {err / ref:.2g}")
    assert err <= TOLERANCE * ref, f"max |diff| {err:.3g} vs max |x| {ref:.3g}"
    # It acted: the first call of the run is its step 0 of the steps that really run, features shrank, windows ran.
    assert records[0].step == 0 and records[0].total == steps - start
    assert records[0].conv or records[0].pool
    assert all(r.window_calls == 5 for r in records)
    # ... and not because HiDiffusion did nothing on both sides.
    stock = webui_run(
        patcher, family, noise, sigmas, positive, latent, raunet=False, window_attn=False, at_native="skip"
    )
    assert float((stock - got).abs().max()) > 100 * TOLERANCE * ref
    # Nothing left on the model.
    unet_module = patcher.model.diffusion_model
    assert all(torch.equal(before[k], v) for k, v in unet_module.state_dict().items())
    assert not any("forward" in m.__dict__ for m in unet_module.modules())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in unet_module.modules())


def test_interrupt_leaves_the_model_stock():
    from test_cross_host import scheduler, twin_models

    _, patcher = twin_models("sd15")
    noise = torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(3))
    positive, _ = conds("sd15", 512, 512)
    sigmas = scheduler(3).sigmas
    latent = torch.zeros_like(noise)
    stock = webui_run(patcher, "sd15", noise, sigmas, positive, latent, raunet=False, window_attn=False)
    with pytest.raises(KeyboardInterrupt):
        webui_run(patcher, "sd15", noise, sigmas, positive, latent, interrupt_at=1, window_seed=1)
    unet_module = patcher.model.diffusion_model
    assert not any("forward" in m.__dict__ for m in unet_module.modules())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in unet_module.modules())
    again = webui_run(patcher, "sd15", noise, sigmas, positive, latent, raunet=False, window_attn=False)
    assert torch.equal(again, stock)
