"""Bad input gets a clear error before anything changes: the model is left exactly as it
was (unpatched, or with its earlier patch intact and working)."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch
from helpers import assert_same_state, assert_untouched, run_recorded, snapshot
from torch import nn

import hidiff
from hidiff import (
    PRESETS,
    HiDiffusionConfig,
    UnsupportedModelError,
    apply_hidiffusion,
    get_patch,
    is_patched,
    last_call,
    remove_hidiffusion,
)
from hidiff.diffusers.testing import tiny_pipeline

NATIVE = 8  # latent side of the tiny SD pipeline (64 px): 96 px is above it
SIDE = 96
STEPS = 3
GOOD = dict(t1_ratio=0.7, window_seed=3)  # T1 = int(3 * 0.7) = 2: RAU-Net acts in steps 0 and 1


# --------------------------------------------------------------------------- helpers
def hook_counts(module: nn.Module) -> dict:
    return {
        name: (len(m._forward_hooks), len(m._forward_pre_hooks))
        for name, m in module.named_modules()
        if m._forward_hooks or m._forward_pre_hooks
    }


def run(pipe, height=SIDE, width=SIDE, steps=STEPS, seed=0, **kwargs):
    return run_recorded(pipe, height, width, steps, seed, **kwargs)


def record_key(r):
    return (r.step, r.total, r.latent, r.preset, r.conv, r.pool, r.windows, r.window_calls, tuple(r.shifts))


def fresh_patched_run(**run_kwargs):
    """Latents and records of the same call on a freshly built and patched pipeline."""
    pipe = tiny_pipeline("sd15", sample_size=NATIVE)
    apply_hidiffusion(pipe, **GOOD)
    return run(pipe, **run_kwargs)


FIELDS = [f.name for f in dataclasses.fields(HiDiffusionConfig)]

BAD_OPTIONS = {
    # options, exception type, patterns the message must contain
    "t1-above-one": (dict(t1_ratio=1.5), ValueError, [r"t1_ratio", r"1\.5"]),
    "t2-negative": (dict(t2_ratio=-0.1), ValueError, [r"t2_ratio", r"-0\.1"]),
    "t2-nan": (dict(t2_ratio=float("nan")), ValueError, [r"t2_ratio"]),
    "t2-above-t1": (dict(t1_ratio=0.3, t2_ratio=0.5), ValueError, [r"T2", r"T1", r"0\.5", r"0\.3"]),
    "t1-string": (dict(t1_ratio="0.5"), TypeError, [r"t1_ratio", r"'0\.5'"]),
    "t1-bool": (dict(t1_ratio=True), TypeError, [r"t1_ratio"]),
    "raunet-string": (dict(raunet="yes"), TypeError, [r"raunet", r"'yes'"]),
    "window-attn-int": (dict(window_attn=0), TypeError, [r"window_attn"]),
    "apply-raunet-int": (dict(apply_raunet=1), TypeError, [r"apply_raunet"]),
    "apply-window-attn-string": (dict(apply_window_attn="no"), TypeError, [r"apply_window_attn"]),
    "aggressive-string": (dict(aggressive="yes"), TypeError, [r"aggressive"]),
    "window-seed-float": (dict(window_seed=1.5), TypeError, [r"window_seed", r"1\.5"]),
    "config-dict": (dict(config={"raunet": False}), TypeError, [r"config", r"HiDiffusionConfig", r"dict"]),
    "unknown-option": (dict(foo=1), TypeError, [r"\bfoo\b"] + [rf"\b{name}\b" for name in FIELDS]),
    "unknown-preset": (
        dict(preset="sdxl-8192"),
        ValueError,
        [r"sdxl-8192"] + [re.escape(name) for name in PRESETS],
    ),
    "window-shift-random": (
        dict(window_shift="random"),
        ValueError,
        [r"window_shift", r"'random'", r"seeded", r"reference", r"none"],
    ),
    "at-native-always": (dict(at_native="always"), ValueError, [r"at_native", r"skip", r"apply"]),
    "raunet-disagrees-with-apply-raunet": (
        dict(raunet=True, apply_raunet=False),
        ValueError,
        [r"raunet", r"apply_raunet"],
    ),
    "window-attn-disagrees": (
        dict(window_attn=False, apply_window_attn=True),
        ValueError,
        [r"window_attn", r"apply_window_attn"],
    ),
}


@pytest.fixture(scope="module")
def sd_pipe():
    return tiny_pipeline("sd15", sample_size=NATIVE)


@pytest.fixture(scope="module")
def patched():
    """A patched pipeline and what it produced before any bad input."""
    pipe = tiny_pipeline("sd15", sample_size=NATIVE)
    apply_hidiffusion(pipe, **GOOD)
    latents, records = run(pipe)
    assert any(r.conv for r in records) and any(not r.conv for r in records)
    return pipe, latents, records


# --------------------------------------------------------------------------- option errors
@pytest.mark.parametrize("target", ["pipeline", "unet"])
@pytest.mark.parametrize("case", list(BAD_OPTIONS))
def test_bad_options_raise_before_any_change(sd_pipe, case, target):
    options, error, patterns = BAD_OPTIONS[case]
    obj = sd_pipe if target == "pipeline" else sd_pipe.unet
    before = snapshot(sd_pipe.unet)
    with pytest.raises(error) as info:
        apply_hidiffusion(obj, **options)
    assert not isinstance(info.value, UnsupportedModelError), "the model is supported; the options are wrong"
    message = str(info.value)
    for pattern in patterns:
        assert re.search(pattern, message), (pattern, message)
    assert_untouched(sd_pipe.unet, before)
    assert is_patched(sd_pipe) is False


@pytest.mark.parametrize(
    "case",
    [
        "t2-above-t1",
        "t1-string",
        "apply-raunet-int",
        "config-dict",
        "unknown-option",
        "unknown-preset",
        "window-shift-random",
    ],
)
def test_failed_apply_keeps_earlier_patch_working(patched, case):
    pipe, latents, records = patched
    options, error, _ = BAD_OPTIONS[case]
    patch = get_patch(pipe)
    hooks = hook_counts(pipe.unet)
    assert hooks, "the earlier patch hooks the model"
    state = snapshot(pipe.unet)

    with pytest.raises(error):
        apply_hidiffusion(pipe, **options)

    assert is_patched(pipe) and get_patch(pipe) is patch
    assert patch.config == HiDiffusionConfig(**GOOD)
    assert hook_counts(pipe.unet) == hooks
    assert_same_state(pipe.unet, state)
    again, again_records = run(pipe)
    assert torch.equal(again, latents)
    assert [record_key(r) for r in again_records] == [record_key(r) for r in records]
    assert last_call(pipe) is not None and last_call(pipe).step == STEPS - 1


@pytest.mark.parametrize("case", ["t1-above-one", "unknown-option"])
def test_failed_scoped_apply_keeps_earlier_patch(patched, case):
    pipe, latents, records = patched
    options, error, _ = BAD_OPTIONS[case]
    patch, hooks = get_patch(pipe), hook_counts(pipe.unet)
    with pytest.raises(error):
        with hidiff.hidiffusion(pipe, **options):
            pytest.fail("the block must not run with bad options")
    assert get_patch(pipe) is patch
    assert hook_counts(pipe.unet) == hooks
    again, _ = run(pipe)
    assert torch.equal(again, latents)


def test_failed_scoped_apply_on_unpatched_model_leaves_it_untouched(sd_pipe):
    before = snapshot(sd_pipe.unet)
    with pytest.raises(ValueError, match="window_shift"):
        with hidiff.hidiffusion(sd_pipe, window_shift="random"):
            pytest.fail("the block must not run with bad options")
    assert_untouched(sd_pipe.unet, before)


# --------------------------------------------------------------------------- the config object
def test_config_is_frozen_and_from_options_overrides():
    base = HiDiffusionConfig(t1_ratio=0.6, window_seed=7, window_shift="reference")
    with pytest.raises(dataclasses.FrozenInstanceError):
        base.t1_ratio = 0.5
    with pytest.raises(dataclasses.FrozenInstanceError):
        base.raunet = False
    assert base.t1_ratio == 0.6 and base.raunet is True

    derived = HiDiffusionConfig.from_options(base, t1_ratio=0.5, raunet=False)
    assert (derived.t1_ratio, derived.raunet) == (0.5, False)
    assert (derived.window_seed, derived.window_shift) == (7, "reference")  # kept from base
    assert (base.t1_ratio, base.raunet) == (0.6, True)  # base unchanged
    assert HiDiffusionConfig.from_options() == HiDiffusionConfig()
    assert HiDiffusionConfig.from_options(preset="sd-2048").preset == "sd-2048"

    # from_options validates like the constructor.
    with pytest.raises(TypeError, match="foo"):
        HiDiffusionConfig.from_options(base, foo=1)
    with pytest.raises(ValueError, match="T2"):
        HiDiffusionConfig.from_options(base, t2_ratio=0.9)
    with pytest.raises(ValueError, match="t1_ratio"):
        HiDiffusionConfig(t1_ratio=-0.5)


def test_apply_with_config_and_overrides(sd_pipe):
    base = HiDiffusionConfig(t1_ratio=0.6, window_seed=7)
    try:
        apply_hidiffusion(sd_pipe, config=base, t2_ratio=0.1, apply_window_attn=False)
        cfg = get_patch(sd_pipe).config
        assert cfg == dataclasses.replace(base, t2_ratio=0.1, window_attn=False)
        assert base.window_attn is True and base.t2_ratio is None
        # Applying again replaces the earlier options (not merged with them).
        apply_hidiffusion(sd_pipe, preset="sd-2048")
        assert get_patch(sd_pipe).config == HiDiffusionConfig(preset="sd-2048")
    finally:
        remove_hidiffusion(sd_pipe)
    assert hook_counts(sd_pipe.unet) == {}


# --------------------------------------------------------------------------- refused calls
@pytest.mark.parametrize("size", [dict(height=1001, width=SIDE), dict(height=SIDE, width=1001)])
def test_size_refused_by_pipeline_leaves_patch_usable(size):
    pipe = tiny_pipeline("sd15", sample_size=NATIVE)
    apply_hidiffusion(pipe, **GOOD)
    with pytest.raises(ValueError, match="8"):
        run(pipe, **size)
    assert is_patched(pipe)
    latents, records = run(pipe)
    expected, expected_records = fresh_patched_run()
    assert torch.equal(latents, expected)
    assert [record_key(r) for r in records] == [record_key(r) for r in expected_records]


def test_run_interrupted_by_error_leaves_patch_usable():
    pipe = tiny_pipeline("sd15", sample_size=NATIVE)
    apply_hidiffusion(pipe, **GOOD)

    def fail_after_first_step(p, i, t, callback_kwargs):
        if i == 0:
            raise RuntimeError("stopped by the user")
        return callback_kwargs

    with pytest.raises(RuntimeError, match="stopped by the user"):
        pipe(
            "one red circle",
            height=SIDE,
            width=SIDE,
            num_inference_steps=STEPS,
            generator=torch.Generator().manual_seed(5),
            output_type="latent",
            callback_on_step_end=fail_after_first_step,
        )
    # No conv left re-geometried, no window left open.
    assert all(tuple(m.stride) in ((1, 1), (2, 2)) for m in pipe.unet.modules() if isinstance(m, nn.Conv2d))
    latents, records = run(pipe)
    expected, expected_records = fresh_patched_run()
    assert [r.step for r in records] == list(range(STEPS))
    assert torch.equal(latents, expected)
    assert [record_key(r) for r in records] == [record_key(r) for r in expected_records]


# --------------------------------------------------------------------------- remove
class TransformerPipeline:
    def __init__(self) -> None:
        self.transformer = nn.Linear(4, 4)


@pytest.mark.parametrize(
    "obj",
    ["runwayml/stable-diffusion-v1-5", {"unet": None}, 42, object(), TransformerPipeline()],
    ids=["str", "dict", "int", "object", "transformer-pipeline"],
)
def test_remove_on_non_diffusers_object_raises(obj):
    with pytest.raises(UnsupportedModelError) as info:
        remove_hidiffusion(obj)
    assert type(obj).__name__ in str(info.value)
    with pytest.raises(UnsupportedModelError):
        is_patched(obj)


def test_remove_on_unpatched_model_is_a_noop(sd_pipe):
    before = snapshot(sd_pipe.unet)
    stock, _ = run(sd_pipe, steps=2)
    assert remove_hidiffusion(sd_pipe) is sd_pipe
    assert remove_hidiffusion(sd_pipe.unet) is sd_pipe.unet
    assert_untouched(sd_pipe.unet, before)
    after, _ = run(sd_pipe, steps=2)
    assert torch.equal(after, stock)

    # Removing twice after an apply is also fine and leaves the stock model.
    apply_hidiffusion(sd_pipe)
    patched, _ = run(sd_pipe, steps=2)
    assert not torch.equal(patched, stock)
    remove_hidiffusion(sd_pipe)
    remove_hidiffusion(sd_pipe)
    assert_untouched(sd_pipe.unet, before)
    again, _ = run(sd_pipe, steps=2)
    assert torch.equal(again, stock)
