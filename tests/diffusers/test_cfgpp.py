"""CFG++ sampling: each sampler against a plain loop of its rule, the reducing case against the
stock diffusers schedulers, inversion, HiDiffusion together with CFG++, restore and bad input."""

import diffusers
import pytest
import torch
from helpers import SharedPipelines, assert_untouched, snapshot

import hidiff
from hidiff.diffusers import cfgpp, inversion
from hidiff.diffusers.testing import tiny_components

STEPS = 5
LAM = 0.6
PROMPT, NEGATIVE = "one red circle", "blue"


_SHARED = SharedPipelines()
_pipe = _SHARED.get


@pytest.fixture(autouse=True)
def _restore_shared():
    yield
    _SHARED.restore()


def _assert_equal_to_rule(ours, expected):
    """Equal to 1e-5 of the latents' scale (fp32 rounding of values up to ~50 is a few 1e-6)."""
    scale = max(1.0, float(expected.abs().max()))
    assert float((ours - expected).abs().max()) <= 1e-5 * scale


def _start_latents(side, seed=0):
    """Initial noise for ``latents=`` (the pipeline scales it by its scheduler's init_noise_sigma)."""
    return torch.randn(1, 4, side // 8, side // 8, generator=torch.Generator().manual_seed(seed))


def _sample(pipe, side, latents, seed=1, **kwargs):
    """Final latents of a seeded pipeline call; also the U-Net keywords of its guided call."""
    seen = {}

    def keep(module, args, kw):
        seen.setdefault("kwargs", {k: v for k, v in kw.items() if k not in ("sample", "timestep")})

    handle = pipe.unet.register_forward_pre_hook(keep, with_kwargs=True)
    try:
        kwargs.setdefault("prompt", PROMPT)
        out = pipe(
            height=side,
            width=side,
            num_inference_steps=STEPS,
            latents=latents.clone(),
            generator=torch.Generator().manual_seed(seed),
            output_type="latent",
            negative_prompt=NEGATIVE,
            **kwargs,
        )
    finally:
        handle.remove()
    return out.images, seen["kwargs"]


# ---------------------------------------------------------------------- the rules, written out
def _to_eps(out, x_vp, alpha_bar, prediction):
    """Model output -> epsilon, at the VP latents the U-Net saw."""
    if prediction == "v_prediction":
        return alpha_bar**0.5 * out + (1 - alpha_bar) ** 0.5 * x_vp
    return out


def _eps_pair(unet, x_vp, t, kwargs, alpha_bar, prediction):
    with torch.no_grad():
        out = unet(torch.cat([x_vp, x_vp]), t, **kwargs)[0]
    return _to_eps(out, torch.cat([x_vp, x_vp]), alpha_bar, prediction).chunk(2)


def hand_loop(sampler, pipe, latents, kwargs, lam, seed=1):
    """The CFG++ rule of ``sampler``, step by step; schedules (timesteps, sigmas) from the stock scheduler."""
    stock = cfgpp.stock_scheduler(sampler, pipe.scheduler.config)
    stock.set_timesteps(STEPS)
    prediction = stock.config.prediction_type
    alphas = stock.alphas_cumprod
    unet = pipe.unet
    generator = torch.Generator().manual_seed(seed)
    if sampler == "ddim":
        x = latents.clone()
        for t in stock.timesteps:
            a = alphas[t]
            prev = int(t) - 1000 // STEPS
            a_prev = alphas[prev] if prev >= 0 else stock.final_alpha_cumprod
            eps_u, eps_c = _eps_pair(unet, x, t, kwargs, a, prediction)
            eps_l = eps_u + lam * (eps_c - eps_u)
            x0 = (x - (1 - a) ** 0.5 * eps_l) / a**0.5
            x = a_prev**0.5 * x0 + (1 - a_prev) ** 0.5 * eps_u
        return x
    sigmas = stock.sigmas
    if sampler in ("euler", "euler-a"):  # sigma form: x = x0 + sigma * eps
        x = latents * stock.init_noise_sigma
        for i, t in enumerate(stock.timesteps):
            s, s_next = sigmas[i], sigmas[i + 1]
            a = 1 / (s**2 + 1)
            eps_u, eps_c = _eps_pair(unet, x * a**0.5, t, kwargs, a, prediction)
            d_u, d_c = x - s * eps_u, x - s * eps_c
            d_l = d_u + lam * (d_c - d_u)
            if sampler == "euler":
                x = d_l + s_next * (x - d_u) / s
            else:
                s_up = (s_next**2 * (s**2 - s_next**2) / s**2) ** 0.5
                s_down = (s_next**2 - s_up**2) ** 0.5
                z = torch.randn(x.shape, generator=generator)
                x = d_l + s_down * (x - d_u) / s + s_up * z
        return x
    # DPM-Solver++(2M), VP latents, VE sigmas s: alpha = 1 / sqrt(s^2 + 1), sigma = s * alpha
    x, history = latents.clone(), []
    for i, t in enumerate(stock.timesteps):
        s, s_next = sigmas[i], sigmas[i + 1]
        alpha, alpha_next = 1 / (s**2 + 1) ** 0.5, 1 / (s_next**2 + 1) ** 0.5
        eps_u, eps_c = _eps_pair(unet, x, t, kwargs, alpha**2, prediction)
        x0_u = (x - s * alpha * eps_u) / alpha
        x0_c = (x - s * alpha * eps_c) / alpha
        x0_l = x0_u + lam * (x0_c - x0_u)
        history.append((x0_u, x0_l))
        first_order = i == 0 or i == STEPS - 1  # diffusers: lower order at the end of short runs
        if first_order:
            d_u, d_l = x0_u, x0_l
        else:
            h = torch.log(s / s_next)
            r = torch.log(sigmas[i - 1] / s) / h
            (p_u, p_l), (c_u, c_l) = history[-2], history[-1]
            d_u = (1 + 1 / (2 * r)) * c_u - p_u / (2 * r)
            d_l = (1 + 1 / (2 * r)) * c_l - p_l / (2 * r)
        x = alpha_next * d_l + s_next * alpha_next * (x - alpha * d_u) / (s * alpha)
    return x


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd15", "sd21-768", "sdxl"])
@pytest.mark.parametrize("sampler", cfgpp.SAMPLERS)
def test_sampler_equals_a_hand_written_loop_of_its_rule(sampler, family):
    """fp32, 5 steps: the pipeline under CFG++ equals the rule written out (v-prediction: sd21-768)."""
    pipe = _pipe(family)
    latents = _start_latents(64)
    hidiff.enable_cfgpp(pipe, sampler, guidance=LAM)
    ours, kwargs = _sample(pipe, 64, latents)
    _assert_equal_to_rule(ours, hand_loop(sampler, pipe, latents, kwargs, LAM))


# ---------------------------------------------------------------------- the reducing case
def _task_inputs(task, side):
    g = torch.Generator().manual_seed(5)
    image = torch.rand(1, 3, side, side, generator=g)
    if task == "img2img":
        return {"image": image, "strength": 0.8}
    if task == "inpaint":
        mask = torch.zeros(1, 1, side, side)
        mask[..., side // 4 :, side // 4 :] = 1
        return {"image": image, "mask_image": mask, "strength": 0.8}
    return {}


def _unconditional_only(module, args, output):
    """Make the conditional half of the U-Net output a copy of the unconditional half, so that
    the pipeline's u + w * (c - u) is u exactly."""
    both = output[0]
    half = both.shape[0] // 2
    return (torch.cat([both[:half], both[:half]]),) + tuple(output[1:])


def _stock_run_on_unconditional(pipe, sampler, side, latents, **kwargs):
    """The stock diffusers scheduler stepping on the unconditional prediction."""
    original = pipe.scheduler
    pipe.scheduler = cfgpp.stock_scheduler(sampler, original.config)
    handle = pipe.unet.register_forward_hook(_unconditional_only)
    try:
        return _sample(pipe, side, latents, **kwargs)[0]
    finally:
        handle.remove()
        pipe.scheduler = original


@pytest.mark.parametrize("sampler", cfgpp.SAMPLERS)
def test_lambda_zero_is_the_stock_scheduler_bitwise(sampler):
    pipe = _pipe("sd15")
    latents = _start_latents(64)
    stock = _stock_run_on_unconditional(pipe, sampler, 64, latents)
    hidiff.enable_cfgpp(pipe, sampler, guidance=0.0)
    assert torch.equal(_sample(pipe, 64, latents)[0], stock)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
@pytest.mark.parametrize("task", ["img2img", "inpaint"])
def test_lambda_zero_is_stock_in_img2img_and_inpaint(family, task):
    pipe = _pipe(family, task)
    sampler = "dpmpp-2m" if task == "img2img" else "euler-a"  # a multistep and a stochastic one
    latents = _start_latents(64)
    extra = _task_inputs(task, 64)
    stock = _stock_run_on_unconditional(pipe, sampler, 64, latents, **extra)
    hidiff.enable_cfgpp(pipe, sampler, guidance=0.0)
    ours = _sample(pipe, 64, latents, **extra)[0]
    assert torch.equal(ours, stock)
    hidiff.enable_cfgpp(pipe, sampler, guidance=LAM)
    assert (_sample(pipe, 64, latents, **extra)[0] - ours).abs().max() > 1e-3


def test_controlnet_pipeline_reduces_to_stock_and_guides():
    components = tiny_components("sd15")
    torch.manual_seed(3)
    components["controlnet"] = diffusers.ControlNetModel.from_unet(
        components["unet"], conditioning_embedding_out_channels=(8, 16, 16, 16)
    ).eval()
    pipe = diffusers.StableDiffusionControlNetPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    latents = _start_latents(64)
    control = {"image": torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))}
    stock = _stock_run_on_unconditional(pipe, "ddim", 64, latents, **control)
    hidiff.enable_cfgpp(pipe, "ddim", guidance=0.0)
    assert torch.equal(_sample(pipe, 64, latents, **control)[0], stock)
    hidiff.enable_cfgpp(pipe, "ddim", guidance=LAM)
    assert (_sample(pipe, 64, latents, **control)[0] - stock).abs().max() > 1e-3


# ---------------------------------------------------------------------- with HiDiffusion
@pytest.mark.parametrize("cfgpp_first", [True, False])
def test_hidiffusion_and_cfgpp_together_in_either_order(cfgpp_first):
    """Native latent 8 (sample_size=8), sampled at 16: RAU-Net and MSW-MSA act; the result is the
    CFG++ rule run on the HiDiffusion U-Net, whichever was switched on first; both undo exactly.
    (A fixed window seed: the default seeds the shifts from the first U-Net input, which the
    hand-written loop rounds differently.)"""
    pipe = _pipe("sd15", sample_size=8)
    before = snapshot(pipe.unet)
    stock_scheduler = pipe.scheduler
    latents = _start_latents(128)
    steps_seen = []

    def record(p, i, t, callback_kwargs):
        steps_seen.append(hidiff.last_call(p))
        return callback_kwargs

    switch_on = [
        lambda: hidiff.enable_cfgpp(pipe, "euler", guidance=LAM),
        lambda: hidiff.apply_hidiffusion(pipe, window_seed=1),
    ]
    for on in switch_on if cfgpp_first else switch_on[::-1]:
        on()
    ours, kwargs = _sample(pipe, 128, latents, callback_on_step_end=record)
    assert [r.step for r in steps_seen] == list(range(STEPS))
    assert steps_seen[0].conv and not steps_seen[-1].conv and all(r.window_calls for r in steps_seen)
    _assert_equal_to_rule(ours, hand_loop("euler", pipe, latents, kwargs, LAM))
    hidiff.disable_cfgpp(pipe)
    hidiffusion_only = _sample(pipe, 128, latents)[0]
    assert (hidiffusion_only - ours).abs().max() > 1e-3
    hidiff.remove_hidiffusion(pipe)
    assert pipe.scheduler is stock_scheduler
    assert_untouched(pipe.unet, before)


# ---------------------------------------------------------------------- restore
@pytest.mark.parametrize("sampler", cfgpp.SAMPLERS)
def test_disable_restores_the_pipeline_exactly(sampler):
    pipe = _pipe("sd15")
    scheduler, config = pipe.scheduler, dict(pipe.config)
    before = snapshot(pipe.unet)
    latents = _start_latents(64)
    plain = _sample(pipe, 64, latents)[0]
    scheduler_state = dict(vars(scheduler))
    hidiff.enable_cfgpp(pipe, sampler, guidance=LAM)
    assert isinstance(pipe.scheduler, type(cfgpp.stock_scheduler(sampler, scheduler.config)))
    assert cfgpp.cfgpp_settings(pipe) == (sampler, LAM)
    hidiff.enable_cfgpp(pipe, "ddim", guidance=0.3)  # enabling again replaces, still from the original
    _sample(pipe, 64, latents)
    hidiff.disable_cfgpp(pipe)
    assert pipe.scheduler is scheduler and dict(pipe.config) == config
    assert vars(scheduler).keys() == scheduler_state.keys()
    assert all(vars(scheduler)[k] is v for k, v in scheduler_state.items())
    assert cfgpp.cfgpp_settings(pipe) is None
    assert_untouched(pipe.unet, before)
    assert torch.equal(_sample(pipe, 64, latents)[0], plain)
    hidiff.disable_cfgpp(pipe)  # a no-op now


# ---------------------------------------------------------------------- misuse
def _assert_pipeline_untouched(pipe, scheduler, before):
    assert pipe.scheduler is scheduler
    assert cfgpp.cfgpp_settings(pipe) is None
    assert_untouched(pipe.unet, before)


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        ({"scheduler": "heun"}, ValueError, "ddim, euler, euler-a, dpmpp-2m"),
        ({"scheduler": None}, ValueError, "unknown CFG++ sampler"),
        ({"guidance": 7.5}, ValueError, "(w - 1) / 11.5"),
        ({"guidance": -0.1}, ValueError, "[0, 1]"),
        ({"guidance": float("nan")}, ValueError, "[0, 1]"),
        ({"guidance": "0.5"}, TypeError, "number"),
        ({"guidance": True}, TypeError, "number"),
    ],
)
def test_bad_arguments_raise_and_leave_the_pipeline(kwargs, error, words):
    pipe = _pipe("sd15")
    scheduler, before = pipe.scheduler, snapshot(pipe.unet)
    with pytest.raises(error) as info:
        hidiff.enable_cfgpp(pipe, **kwargs)
    assert words in str(info.value)
    _assert_pipeline_untouched(pipe, scheduler, before)


def _with_scheduler(cls_name, **config):
    """A new pipeline on the shared SD components, with another scheduler."""
    pipe = diffusers.StableDiffusionPipeline(**_pipe("sd15").components)
    # assigned after construction: the constructor would turn clip_sample off itself
    pipe.scheduler = getattr(diffusers, cls_name).from_config(pipe.scheduler.config, **config)
    return pipe


@pytest.mark.parametrize(
    "make, error, words",
    [
        (lambda: _pipe("sd15").unet, TypeError, "needs the pipeline"),
        (lambda: _with_scheduler("DDIMScheduler", clip_sample=True), ValueError, "clip_sample=False"),
        (lambda: _with_scheduler("DDIMScheduler", prediction_type="sample"), ValueError, "prediction_type='sample'"),
        (lambda: _with_scheduler("EDMEulerScheduler"), ValueError, "EDM scheduler"),
        (lambda: _pipe("sd15", time_cond_proj_dim=8), TypeError, "guidance-distilled"),
    ],
)
def test_unsupported_pipelines_are_refused_untouched(make, error, words):
    target = make()
    unet = getattr(target, "unet", target)
    scheduler, before = getattr(target, "scheduler", None), snapshot(unet)
    with pytest.raises(error) as info:
        hidiff.enable_cfgpp(target, "ddim")
    assert words in str(info.value)
    assert getattr(target, "scheduler", None) is scheduler
    assert_untouched(unet, before)


def test_pag_pipeline_is_refused_untouched():
    if not hasattr(diffusers, "StableDiffusionPAGPipeline"):
        pytest.skip(f"diffusers {diffusers.__version__} has no PAG pipelines (they came in diffusers 0.30)")
    pipe = diffusers.StableDiffusionPAGPipeline(**tiny_components("sd15"), pag_applied_layers=["mid"])
    scheduler, before = pipe.scheduler, snapshot(pipe.unet)
    with pytest.raises(TypeError, match="PAG"):
        hidiff.enable_cfgpp(pipe, "euler")
    _assert_pipeline_untouched(pipe, scheduler, before)


def test_calls_that_would_silently_lose_cfgpp_raise():
    pipe = _pipe("sd15")
    latents = _start_latents(64)
    hidiff.enable_cfgpp(pipe, "ddim", guidance=LAM)
    with pytest.raises(ValueError, match="guidance_scale > 1"):
        _sample(pipe, 64, latents, guidance_scale=1.0)
    with pytest.raises(ValueError, match="guidance_rescale=0"):
        _sample(pipe, 64, latents, guidance_rescale=0.7)
    with pytest.raises(ValueError, match="eta=0"):
        _sample(pipe, 64, latents, eta=0.5)
    # after the failed calls the next one is normal CFG++
    ours, kwargs = _sample(pipe, 64, latents)
    _assert_equal_to_rule(ours, hand_loop("ddim", pipe, latents, kwargs, LAM))
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    with pytest.raises(RuntimeError, match="disable_cfgpp"):
        _sample(pipe, 64, latents)
    hidiff.disable_cfgpp(pipe)
    assert type(pipe.scheduler) is diffusers.DDIMScheduler


# ---------------------------------------------------------------------- inversion
def _image(side, seed=4):
    """A smooth random picture in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, 4, 4, generator=g)
    return torch.nn.functional.interpolate(coarse, size=(side, side), mode="bicubic", align_corners=False).clamp(0, 1)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_inversion_is_the_exact_inverse_of_cfgpp_ddim(family):
    """With a U-Net whose output does not depend on the latents (conv_in zeroed), one CFG++ DDIM
    step and one inversion step are inverse maps: invert-then-sample returns the image's latents."""
    pipe = _pipe(family)
    conv_in = pipe.unet.conv_in
    weights = (conv_in.weight.detach().clone(), conv_in.bias.detach().clone())
    try:
        with torch.no_grad():
            conv_in.weight.zero_()
            conv_in.bias.zero_()
        image = _image(64)
        target = inversion.encode_image(pipe, image, "cpu")
        hidiff.enable_cfgpp(pipe, "ddim", guidance=LAM)
        noise = hidiff.invert(pipe, image, PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS)
        assert (noise - target).abs().max() > 0.5  # it did move to noise
        back = _sample(pipe, 64, noise)[0]
    finally:
        with torch.no_grad():
            conv_in.weight.copy_(weights[0])
            conv_in.bias.copy_(weights[1])
    _assert_equal_to_rule(back, target)


def test_inversion_reconstructs_better_than_cfg_at_matched_guidance():
    """Random tiny SD: CFG++ invert-then-sample error is below ordinary CFG's at w = 1 + 11.5 * lam."""
    pipe = _pipe("sd15")
    image = _image(64)
    target = inversion.encode_image(pipe, image, "cpu")
    scale = cfgpp.cfg_scale_for(LAM)
    noise = hidiff.invert(pipe, image, PROMPT, cfg_scale=scale, num_inference_steps=STEPS)
    cfg_error = (_sample(pipe, 64, noise, guidance_scale=scale)[0] - target).pow(2).mean().sqrt()
    hidiff.enable_cfgpp(pipe, "ddim", guidance=LAM)
    noise = hidiff.invert(pipe, image, PROMPT, num_inference_steps=STEPS)
    cfgpp_error = (_sample(pipe, 64, noise)[0] - target).pow(2).mean().sqrt()
    assert cfgpp_error < 0.5 * cfg_error


def test_invert_bad_input():
    pipe = _pipe("sd15")
    with pytest.raises(ValueError, match="enable_cfgpp"):
        hidiff.invert(pipe, _image(64), PROMPT)
    with pytest.raises(ValueError, match="not both"):
        hidiff.invert(pipe, _image(64), PROMPT, guidance=0.5, cfg_scale=7.5)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        hidiff.invert(pipe, _image(64), PROMPT, guidance=2.0)
