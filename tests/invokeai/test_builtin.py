"""hidiff's node in reference mode against InvokeAI's built-in HiDiffusion (denoise_latents'
``hidiffusion`` switch), on the same weights, noise and settings, in InvokeAI's own pipeline.
The cases where they differ are measured by tools/invokeai_builtin.py (docs/invokeai.md)."""

from __future__ import annotations

import sys

import pytest
import torch
from invoketest import NATIVE_LATENT, ROOT

sys.path.insert(0, str(ROOT / "tools"))
import invokeai_builtin as harness  # noqa: E402

STEPS = 5
TWO_X = (2 * NATIVE_LATENT, 2 * NATIVE_LATENT)


@pytest.fixture(scope="module")
def unet_and_scheduler():
    return harness.tiny_unet_and_scheduler(NATIVE_LATENT)


@pytest.mark.parametrize(
    "how",
    [{}, {"denoising": (0.4, 1.0), "start_latents": harness.noise_of(99, *TWO_X)}],
    ids=["text-to-image", "image-to-image"],
)
def test_reference_mode_equals_the_builtin_at_2x_native(unet_and_scheduler, how):
    unet, scheduler = unet_and_scheduler
    builtin = harness.denoise("builtin", unet, scheduler, 5, TWO_X, STEPS, **how)
    ours = harness.denoise("hidiff", unet, scheduler, 5, TWO_X, STEPS, **how)
    plain = harness.denoise("plain", unet, scheduler, 5, TWO_X, STEPS, **how)
    assert (builtin - plain).abs().max() > 1e-2, "the built-in changed nothing: the comparison would prove little"
    assert torch.allclose(ours, builtin, atol=1e-4, rtol=0), (ours - builtin).abs().max()


def test_reference_mode_equals_the_builtin_on_sdxl_at_2x_native():
    unet, scheduler = harness.tiny_sdxl_and_scheduler(NATIVE_LATENT)
    cond = harness.sdxl_conditioning(unet, TWO_X)
    builtin, ours, plain = (
        harness.denoise(mode, unet, scheduler, 5, TWO_X, STEPS, conditioning_data=cond)
        for mode in ("builtin", "hidiff", "plain")
    )
    assert (builtin - plain).abs().max() > 1e-2, "the built-in changed nothing: the comparison would prove little"
    assert torch.allclose(ours, builtin, atol=1e-4, rtol=0), (ours - builtin).abs().max()


def test_the_builtin_refuses_an_sd1_layout_hidiff_runs(unet_and_scheduler):
    """The built-in knows SD 1.5 by its module names; hidiff by its structure."""
    unet, scheduler = harness.tiny_unet_and_scheduler(NATIVE_LATENT, widths=(32, 64, 64, 64))
    with pytest.raises(Exception, match="tiny is not a supported model"):
        harness.denoise("builtin", unet, scheduler, 5, TWO_X, STEPS)
    before = harness.model_state(unet)
    out = harness.denoise("hidiff", unet, scheduler, 5, TWO_X, STEPS)
    assert torch.isfinite(out).all() and harness.leftovers(before, harness.model_state(unet)) == {}
