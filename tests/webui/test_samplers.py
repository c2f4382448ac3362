"""Every sampler and scheduler the WebUIs offer, through the extension's sampling wrapper.

The WebUIs call k-diffusion's sampler functions (AUTOMATIC1111 its own copy of k-diffusion,
reForge and Forge ComfyUI's fork of it, with the same functions and signatures) handing each
the arguments its signature asks for: the sigmas; DPM fast and DPM adaptive only the noise
range (sigma_min, sigma_max, and n for DPM fast); DDIM, PLMS and UniPC the timesteps. Here
ComfyUI's copies run on the tiny ldm U-Net with the wrapper as the WebUIs install it. For
each: every U-Net call lands on a step of the run (no call off the schedule), the strided conv
acts on exactly the steps before T1, the windows on every call, the result is finite and the
model is stock afterwards.
"""

from __future__ import annotations

import inspect
import warnings
from types import SimpleNamespace

import pytest
import torch
from comfytest import HAVE_COMFY, build, conds

pytestmark = pytest.mark.skipif(not HAVE_COMFY, reason="needs the ComfyUI venv (.comfy) for an ldm-layout U-Net")

STEPS = 6
T1 = int(0.4 * STEPS)  # the sd-1024 preset's strided-conv steps
#: The k-diffusion samplers AUTOMATIC1111 v1.10 lists, then those Forge and reForge add.
SAMPLERS = [
    "euler",
    "euler_ancestral",
    "heun",
    "dpm_2",
    "dpm_2_ancestral",
    "lms",
    "dpm_fast",
    "dpm_adaptive",
    "dpmpp_2s_ancestral",
    "dpmpp_sde",
    "dpmpp_2m",
    "dpmpp_2m_sde",
    "dpmpp_3m_sde",
    "deis",
    "heunpp2",
    "ipndm",
    "ipndm_v",
]


def ddim_like(model, x, timesteps, extra_args=None, callback=None, disable=None):
    """The WebUIs' timestep samplers' interface (DDIM, PLMS, UniPC: ``timesteps`` rising, walked
    downwards, the denoiser called with each timestep); a deterministic DDIM on a toy schedule."""
    alphas = torch.linspace(0.9991, 0.0047, 1000)
    steps = list(reversed([int(t) for t in timesteps]))
    for i, t in enumerate(steps):
        a = alphas[t]
        a_next = alphas[steps[i + 1]] if i + 1 < len(steps) else torch.tensor(1.0)
        eps = model(x, torch.full((x.shape[0],), float(t)), **(extra_args or {}))
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        x = a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps
    return x


def generation():
    patcher, _ = build("sd15", seed=2)
    model = patcher.model
    positive, _ = conds("sd15", 512, 512)

    class Denoiser:
        # ComfyUI's sampler copies reach the model's sampling object through the denoiser
        # (noise scaling, the default noise sampler); the WebUIs' denoisers carry theirs too.
        inner_model = SimpleNamespace(
            inner_model=SimpleNamespace(model_sampling=model.model_sampling),
            model_patcher=SimpleNamespace(get_model_object=lambda name: getattr(model, name)),
        )

        def __call__(self, x, level, **extra):
            context = positive[0][0].expand(x.shape[0], -1, -1)
            return model.apply_model(x, level, c_crossattn=context)

    denoiser = Denoiser()

    unet = model.diffusion_model
    sd_model = SimpleNamespace(model=SimpleNamespace(diffusion_model=unet), parameterization="eps")
    return SimpleNamespace(sd_model=sd_model, steps=STEPS, extra_generation_params={}), denoiser, unet, model


def run(func, arguments, p, denoiser, unet):
    """``func`` wrapped as the extension wraps the WebUI's sampler function, called as the WebUIs do."""
    from hidiff.webui import host, options

    p.sampler = SimpleNamespace(func=func)
    records, notes = [], []
    settings = options.read_args(options.api_args(True, at_native="apply", window_seed=3))
    assert host.prepare_sampling(p, settings, None, notes.append, recorder=records.append)
    parameters = inspect.signature(p.sampler.func).parameters  # what the WebUIs read to choose the arguments
    given = {k: v for k, v in arguments.items() if k in parameters}
    x = torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(8)) * float(arguments.get("scale", 1.0))
    with warnings.catch_warnings(record=True) as said, torch.no_grad():
        warnings.simplefilter("always")
        out = p.sampler.func(denoiser, x, extra_args={}, disable=True, **given)
    assert not any("forward" in m.__dict__ or m._forward_hooks or m._forward_pre_hooks for m in unet.modules())
    return out, records, notes, [str(w.message) for w in said if "HiDiffusion" in str(w.message)]


def check(records, notes, said, out, total=STEPS):
    assert not notes and not said, (notes, said)  # no call off the schedule, nothing left out
    assert torch.isfinite(out).all()
    # (a call's step is that of its noise level: look-ahead samplers such as Heun++ call the
    # U-Net at the next steps' levels, DPM adaptive goes back after a rejected step)
    steps = [r.step for r in records]
    assert steps[0] == 0 and all(r.total == total for r in records)
    assert [r.conv for r in records] == [r.step < int(0.4 * total) for r in records]
    assert all(r.window_calls == 5 for r in records)
    return steps


@pytest.mark.parametrize("name", SAMPLERS)
def test_every_k_diffusion_sampler_runs_hidiffusion_on_the_steps_it_samples(name):
    import comfy.k_diffusion.sampling as k
    import comfy.samplers

    p, denoiser, unet, model = generation()
    sigmas = comfy.samplers.calculate_sigmas(model.model_sampling, "karras", STEPS).float()
    arguments = {
        "sigmas": sigmas,
        "sigma_min": float(sigmas[-2]),  # the WebUIs hand DPM fast / adaptive the last nonzero sigma
        "sigma_max": float(sigmas[0]),
        "n": STEPS,
        "scale": float(sigmas[0]),
    }
    out, records, notes, said = run(getattr(k, f"sample_{name}"), arguments, p, denoiser, unet)
    steps = check(records, notes, said, out)
    if name in ("euler", "euler_ancestral", "dpmpp_2m", "lms", "ipndm", "deis"):
        assert steps == list(range(STEPS))  # one call per step
    if name in ("dpm_fast", "dpm_adaptive"):  # their own steps over the range, none past the last level's start
        assert set(steps) <= set(range(STEPS)) and {0, T1 - 1, T1} <= set(steps)
    else:
        assert set(steps) == set(range(STEPS))


@pytest.mark.parametrize(
    "scheduler", ["normal", "karras", "exponential", "sgm_uniform", "simple", "ddim_uniform", "beta", "kl_optimal"]
)
def test_every_schedule_is_followed_as_sampled(scheduler):
    import comfy.k_diffusion.sampling as k
    import comfy.samplers

    p, denoiser, unet, model = generation()
    sigmas = comfy.samplers.calculate_sigmas(model.model_sampling, scheduler, STEPS).float()
    out, records, notes, said = run(k.sample_euler, {"sigmas": sigmas, "scale": float(sigmas[0])}, p, denoiser, unet)
    total = len(sigmas) - 1  # (ComfyUI's ddim_uniform can give one step more than asked)
    assert check(records, notes, said, out, total) == list(range(total))


def test_the_timestep_samplers_follow_their_timesteps():
    p, denoiser, unet, _ = generation()
    timesteps = torch.tensor([1, 167, 334, 500, 667, 834])  # rising, as the WebUIs hand them
    out, records, notes, said = run(ddim_like, {"timesteps": timesteps}, p, denoiser, unet)
    assert check(records, notes, said, out) == list(range(STEPS))


def test_a_sampler_given_neither_sigmas_nor_a_noise_range_runs_without_hidiffusion_and_says_so():
    p, denoiser, unet, _ = generation()

    def opaque(model, x, extra_args=None, callback=None, disable=None):
        return model(x, torch.full((x.shape[0],), 1.0), **(extra_args or {}))

    out, records, notes, _ = run(opaque, {}, p, denoiser, unet)
    assert records == [] and notes and "does not say which sigmas it samples" in notes[0]
