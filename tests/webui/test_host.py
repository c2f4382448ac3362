"""The WebUI glue (hidiff.webui.host) on a duck-typed generation: the sampler's function wrapped
with its signature kept, each image's own window seed, models HiDiffusion is not for, bad options.

The U-Net is ComfyUI's ldm-layout ``UNetModel`` (tiny, random), placed where AUTOMATIC1111
keeps it (``p.sd_model.model.diffusion_model``); runs in the ComfyUI venv (.comfy).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
from types import SimpleNamespace

import pytest
import torch
from comfytest import HAVE_COMFY, build, conds

from hidiff.webui import host, options

pytestmark = pytest.mark.skipif(not HAVE_COMFY, reason="needs the ComfyUI venv (.comfy) for an ldm-layout U-Net")


def euler(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """k-diffusion's Euler, as the WebUIs hand it to their sampler object."""
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * x.new_ones([x.shape[0]]), **(extra_args or {}))
        x = x + (x - denoised) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
    return x


def generation(patcher):
    model = patcher.model
    positive, _ = conds("sd15", 512, 512)

    def denoiser(x, sigma):
        context = positive[0][0].expand(x.shape[0], -1, -1)
        return model.apply_model(x, sigma, c_crossattn=context)

    sd_model = SimpleNamespace(model=SimpleNamespace(diffusion_model=model.diffusion_model), parameterization="eps")
    p = SimpleNamespace(sd_model=sd_model, sampler=SimpleNamespace(func=euler), extra_generation_params={})
    return p, denoiser


def sample(patcher, noise, args, tmp_path, monkeypatch):
    p, denoiser = generation(patcher)
    record = tmp_path / "records.jsonl"
    monkeypatch.setenv(host.RECORD_ENV, str(record))
    notes = []
    settings = options.read_args(args)
    assert host.prepare_sampling(p, settings, noise, notes.append)
    assert "sigmas" in inspect.signature(p.sampler.func).parameters  # the WebUIs read it to pass the sigmas
    sigmas = torch.tensor([14.6, 4.0, 1.5, 0.0])
    with torch.no_grad():
        out = p.sampler.func(denoiser, noise * sigmas[0], sigmas=sigmas, extra_args={})
    unet = patcher.model.diffusion_model
    assert not any("forward" in m.__dict__ or m._forward_hooks or m._forward_pre_hooks for m in unet.modules())
    runs = [json.loads(line)["run"] for line in record.read_text().splitlines()]
    record.unlink()
    return out, runs[-1], notes


def test_each_image_has_its_own_window_seed_in_a_batch(tmp_path, monkeypatch):
    patcher, _ = build("sd15", seed=2)
    noise = torch.randn(2, 4, 64, 64, generator=torch.Generator().manual_seed(5))
    args = options.api_args(True, raunet=False, at_native="apply")  # windows only, at the tiny model's native size
    batch, calls, _ = sample(patcher, noise, args, tmp_path, monkeypatch)
    alone, _, _ = sample(patcher, noise[1:], args, tmp_path, monkeypatch)
    assert [c["step"] for c in calls] == [0, 1, 2] and all(c["windows"] == 5 for c in calls)
    # The second image alone (its own noise, so its own seed) is the second image of the batch.
    err = float((batch[1:] - alone).abs().max())
    assert err <= 1e-5 * float(alone.abs().max()), err
    # ... and its shifts are not the first image's: a batch of two copies of image 0 differs from it.
    twins, _, _ = sample(patcher, noise[:1].repeat(2, 1, 1, 1), args, tmp_path, monkeypatch)
    assert float((twins[1:] - batch[1:]).abs().max()) > 1e-3


def test_a_model_that_is_not_a_unet_is_left_alone_with_a_message():
    p = SimpleNamespace(
        sd_model=SimpleNamespace(model=SimpleNamespace(diffusion_model=torch.nn.Linear(2, 2))),
        sampler=SimpleNamespace(func=euler),
    )
    notes = []
    assert not host.prepare_sampling(p, options.read_args(options.api_args(True)), None, notes.append)
    assert p.sampler.func is euler
    assert notes and "HiDiffusion is for Stable Diffusion U-Nets" in notes[0] and "without HiDiffusion" in notes[0]


def test_a_config_refused_for_the_loaded_family_fails_the_sampling_with_its_message():
    patcher, _ = build("sdxl")
    p, _ = generation(patcher)
    settings = options.read_args(options.api_args(True))
    # t2 over t1 passes the family-free check (one ratio alone) but not the SDXL presets'
    settings = dataclasses.replace(settings, config=dataclasses.replace(settings.config, t2_ratio=0.9))
    assert host.prepare_sampling(p, settings, None, print)
    with pytest.raises(ValueError, match="HiDiffusion: T2 ratio 0.9 exceeds T1 ratio"):
        p.sampler.func(None, torch.zeros(1, 4, 8, 8), sigmas=torch.tensor([1.0, 0.0]))
    host.refuse(p, "HiDiffusion option preset: bad")  # a second refusal wraps the original, not the first
    assert p.sampler.func.__hidiff_original__ is euler


def test_the_line_says_what_happens_at_the_size(monkeypatch):
    patcher, _ = build("sd15")
    p, _ = generation(patcher)
    on = options.read_args(options.api_args(True))
    assert "nothing changes" in host.what_happens(on, 512, 512, 20, p.sd_model)
    line = host.what_happens(on, 1024, 1024, 20, p.sd_model)
    # (the tiny model's family is "sd": its context width is no real model's)
    assert line.startswith("At 1024x1024 (sd, native 512x512), preset sd-1024: strided conv on steps 1-"), line
    assert host.what_happens(options.read_args([False]), 1024, 1024, 20, p.sd_model) == "HiDiffusion is off."


def test_the_line_waits_for_a_model_where_the_webui_holds_a_placeholder():
    """Forge starts with a placeholder model object (no U-Net, no patcher) until the first generation."""
    on = options.read_args(options.api_args(True))
    placeholder = SimpleNamespace(cond_stage_model=None, chunk_length=75)
    for loaded in (None, placeholder):
        line = host.what_happens(on, 1024, 1024, 20, loaded)
        assert line.startswith("HiDiffusion: no model is loaded yet") and "no U-Net" not in line
