"""hidiff.edit: the edit path against a hand-written invert-then-sample loop, the mask, HiDiffusion
for large pictures, reproducibility, the pipeline restored (also after an exception), bad input."""

import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler
from helpers import SharedPipelines, assert_untouched, snapshot

import hidiff
from hidiff.app.toy import ToyPipeline, toy_components
from hidiff.diffusers import cfgpp
from hidiff.diffusers.testing import tiny_pipeline

N, STRENGTH, LAM = 5, 0.6, 0.6
SOURCE, TARGET, NEGATIVE = "one red circle", "one blue square", "green"

_SHARED = SharedPipelines()
_pipe = _SHARED.get


@pytest.fixture(autouse=True)
def _restore_shared():
    yield
    _SHARED.restore()


def _image(side, seed=4):
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, 4, 4, generator=g)
    return torch.nn.functional.interpolate(coarse, size=(side, side), mode="bicubic", align_corners=False).clamp(0, 1)


def _mask(side):
    mask = torch.zeros(side, side)
    mask[side // 4 : 3 * side // 4, side // 8 : side // 2] = 1.0
    return mask


# ---------------------------------------------------------------------- the loop, written out
def _eps(pipe, x, t, embeddings):
    with torch.no_grad():
        return pipe.unet(torch.cat([x, x]), t, encoder_hidden_states=embeddings).sample.chunk(2)


def hand_edit(pipe, image, sampler, lam=None, w=None, mask=None):
    """DDIM inversion of the last k = round(0.6 N) steps under SOURCE, sampling back under TARGET."""
    ddim = DDIMScheduler.from_config(pipe.scheduler.config)
    ddim.set_timesteps(N)
    alphas, k = ddim.alphas_cumprod, round(STRENGTH * N)
    tail = ddim.timesteps[N - k :]

    def alpha(t):
        return alphas[t] if t >= 0 else ddim.final_alpha_cumprod

    def embed(prompt):
        positive, negative = pipe.encode_prompt(prompt, "cpu", 1, True, NEGATIVE)
        return torch.cat([negative, positive])

    vae = pipe.vae
    with torch.no_grad():
        clean = vae.encode(image * 2 - 1).latent_dist.mean * vae.config.scaling_factor
    x, levels, source = clean, {}, embed(SOURCE)
    for t in reversed(tail):
        a_from, a_to = alpha(int(t) - 1000 // N), alpha(int(t))
        eps_u, eps_c = _eps(pipe, x, t, source)
        guided = eps_u + (lam if w is None else w) * (eps_c - eps_u)
        x0 = (x - (1 - a_from) ** 0.5 * (eps_u if w is None else guided)) / a_from**0.5
        x = a_to**0.5 * x0 + (1 - a_to) ** 0.5 * guided
        levels[int(t)] = x
    target = embed(TARGET)
    next_level = [levels[int(t)] for t in tail[1:]] + [clean]
    if mask is not None:
        mask = torch.nn.functional.interpolate(mask[None, None], size=x.shape[-2:], mode="area")
    if sampler == "ddim":
        for t, ref in zip(tail, next_level):
            a, a_prev = alpha(int(t)), alpha(int(t) - 1000 // N)
            eps_u, eps_c = _eps(pipe, x, t, target)
            guided = eps_u + (lam if w is None else w) * (eps_c - eps_u)
            x0 = (x - (1 - a) ** 0.5 * guided) / a**0.5
            x = a_prev**0.5 * x0 + (1 - a_prev) ** 0.5 * (eps_u if w is None else guided)
            if mask is not None:
                x = mask * x + (1 - mask) * ref
    else:  # CFG++ Euler in sigma form: x = x0 + s eps, x_next = D_l + s_next (x - D_u) / s
        # the tiny pipeline's betas and DDIM's spacing (the edit samples at the inversion's timesteps)
        euler = EulerDiscreteScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            steps_offset=1,
            timestep_spacing="leading",
        )
        euler.set_timesteps(N)
        sigmas = euler.sigmas[N - k :]
        x = x * (1 + sigmas[0] ** 2) ** 0.5
        for i, t in enumerate(tail):
            s, s_next = sigmas[i], sigmas[i + 1]
            eps_u, eps_c = _eps(pipe, x / (1 + s**2) ** 0.5, t, target)
            d_u, d_c = x - s * eps_u, x - s * eps_c
            x = d_u + lam * (d_c - d_u) + s_next * (x - d_u) / s
    with torch.no_grad():
        decoded = vae.decode(x / vae.config.scaling_factor).sample
    return (decoded.clamp(-1, 1) + 1) / 2


def _edit(pipe, image, **kwargs):
    kwargs.setdefault("strength", STRENGTH)
    kwargs.setdefault("num_inference_steps", N)
    kwargs.setdefault("negative_prompt", NEGATIVE)
    return hidiff.edit(pipe, image, SOURCE, TARGET, output_type="pt", **kwargs).images


@pytest.mark.parametrize(
    "sampler, guidance, mask",
    [
        ("ddim", {"guidance": LAM}, False),
        ("euler", {"guidance": LAM}, False),
        ("ddim", {"cfg_scale": 4.0}, False),
        ("ddim", {"guidance": LAM}, True),
    ],
)
def test_edit_equals_a_hand_written_invert_then_sample_loop(sampler, guidance, mask):
    pipe = _pipe()
    image = _image(64)
    m = _mask(64) if mask else None
    ours = _edit(pipe, image, sampler=sampler, mask=m, **guidance)
    expected = hand_edit(pipe, image, sampler, lam=guidance.get("guidance"), w=guidance.get("cfg_scale"), mask=m)
    assert ours.shape == (1, 3, 64, 64)
    assert float((ours - expected).abs().max()) <= 1e-5
    assert float((ours - image).abs().mean()) > 1e-3  # the edit changed the picture


def test_the_mask_keeps_the_rest_of_a_pixel_space_picture_exactly():
    """Pixel-space (the toy model's layout, untrained): outside the mask the result is the input."""
    pipe = ToyPipeline(**toy_components())
    pipe.set_progress_bar_config(disable=True)
    image, mask = _image(16), _mask(16)
    out = hidiff.edit(
        pipe,
        image,
        "one red circle on white",
        "one blue square on black",
        mask=mask,
        num_inference_steps=4,
        output_type="pt",
    ).images
    keep = mask == 0
    assert float((out - image)[..., keep].abs().max()) <= 1e-6
    assert float((out - image)[..., ~keep].abs().mean()) > 1e-2


@pytest.mark.slow
def test_every_sampler_runs_and_is_reproducible():
    pipe = _pipe()
    image = _image(64)
    for sampler in cfgpp.SAMPLERS:
        first = _edit(pipe, image, sampler=sampler, generator=torch.Generator().manual_seed(3))
        again = _edit(pipe, image, sampler=sampler, generator=torch.Generator().manual_seed(3))
        assert torch.equal(first, again), sampler
        if sampler == "euler-a":  # the stochastic one follows its generator
            other = _edit(pipe, image, sampler=sampler, generator=torch.Generator().manual_seed(4))
            assert not torch.equal(first, other)


def _patched_during(pipe, run):
    seen = []
    handle = pipe.unet.register_forward_pre_hook(lambda m, a: seen.append(hidiff.is_patched(pipe.unet)))
    try:
        run()
    finally:
        handle.remove()
    return seen


def test_hidiffusion_is_on_for_pictures_above_native_and_removed_after():
    pipe = _pipe(sample_size=8)  # native 64 px
    scheduler, before = pipe.scheduler, snapshot(pipe.unet)
    large = _patched_during(pipe, lambda: _edit(pipe, _image(128)))
    native = _patched_during(pipe, lambda: _edit(pipe, _image(64)))
    forced = _patched_during(pipe, lambda: _edit(pipe, _image(64), hidiffusion=True))
    off = _patched_during(pipe, lambda: _edit(pipe, _image(128), hidiffusion=False))
    assert large and all(large) and forced and all(forced)
    assert native and not any(native) and off and not any(off)
    assert pipe.scheduler is scheduler
    assert_untouched(pipe.unet, before)


def test_the_pipeline_is_restored_after_an_exception():
    pipe = _pipe(sample_size=8)
    scheduler, config, before = pipe.scheduler, dict(pipe.scheduler.config), snapshot(pipe.unet)
    calls = []

    def fail_in_sampling(module, args):
        calls.append(1)
        if len(calls) == 5:  # past the inversion's 3 calls: inside the CFG++ sampling loop
            raise RuntimeError("boom")

    handle = pipe.unet.register_forward_pre_hook(fail_in_sampling)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            _edit(pipe, _image(128))
    finally:
        handle.remove()
    assert pipe.scheduler is scheduler and dict(pipe.scheduler.config) == config
    assert cfgpp.cfgpp_settings(pipe) is None
    assert_untouched(pipe.unet, before)


def _rgba(side):
    from PIL import Image

    return Image.new("RGBA", (side, side))


@pytest.mark.parametrize(
    "change, error, words",
    [
        ({"image": _rgba(64)}, ValueError, "convert('RGB')"),
        ({"image": _image(60)}, ValueError, "multiples of 8"),
        ({"image": _image(64) * 2 - 1}, ValueError, "[0, 1]"),
        ({"image": torch.rand(2, 3, 64, 64)}, ValueError, "one RGB picture"),
        ({"image": "picture.png"}, TypeError, "PIL image or a tensor"),
        ({"source_prompt": ""}, ValueError, "source_prompt must be a non-empty string"),
        ({"target_prompt": "  "}, ValueError, "target_prompt must be a non-empty string"),
        ({"strength": 0.0}, ValueError, "strength must be in (0.0, 1.0]"),
        ({"strength": 1.5}, ValueError, "strength must be in (0.0, 1.0]"),
        ({"num_inference_steps": 0}, ValueError, "positive int"),
        ({"guidance": 7.5}, ValueError, "guidance must be in [0.0, 1.0]"),
        ({"guidance": 0.5, "cfg_scale": 7.5}, ValueError, "not both"),
        ({"cfg_scale": 0.5}, ValueError, "cfg_scale must be in [1.0"),
        ({"sampler": "heun"}, ValueError, "ddim, euler, euler-a, dpmpp-2m"),
        ({"mask": torch.ones(32, 32)}, ValueError, "mask is 32x32 but the image is 64x64"),
        ({"mask": torch.ones(2, 64, 64)}, ValueError, "one channel"),
        ({"mask": torch.full((64, 64), 2.0)}, ValueError, "mask tensor must hold values in [0, 1]"),
        ({"output_type": "np"}, ValueError, "'pil' or 'pt'"),
    ],
)
def test_bad_input_is_refused_before_the_pipeline_is_touched(change, error, words):
    pipe = _pipe()
    scheduler, before = pipe.scheduler, snapshot(pipe.unet)
    args = {"image": _image(64), "source_prompt": SOURCE, "target_prompt": TARGET, **change}
    with pytest.raises(error) as info:
        hidiff.edit(pipe, args.pop("image"), args.pop("source_prompt"), args.pop("target_prompt"), **args)
    assert words in str(info.value)
    assert pipe.scheduler is scheduler
    assert_untouched(pipe.unet, before)


def test_unsupported_pipelines_are_refused():
    pipe = _pipe()
    with pytest.raises(TypeError, match="needs the pipeline"):
        hidiff.edit(pipe.unet, _image(64), SOURCE, TARGET)
    hidiff.enable_cfgpp(pipe, "ddim")
    with pytest.raises(ValueError, match="disable_cfgpp"):
        hidiff.edit(pipe, _image(64), SOURCE, TARGET)
    hidiff.disable_cfgpp(pipe)
    clipping = tiny_pipeline("sd15")
    clipping.scheduler = DDIMScheduler.from_config(clipping.scheduler.config, clip_sample=True)
    scheduler, before = clipping.scheduler, snapshot(clipping.unet)
    with pytest.raises(ValueError, match="clip_sample=False"):
        hidiff.edit(clipping, _image(64), SOURCE, TARGET, num_inference_steps=N)
    assert clipping.scheduler is scheduler
    assert_untouched(clipping.unet, before)
