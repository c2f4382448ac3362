"""tomesd (token merging) with hidiff, applied before or after: RAU-Net alone composes; MSW-MSA and
kv_downsample, which need the token grid tomesd takes away, are refused with a clear message."""

from __future__ import annotations

import pytest
import torch
from helpers import latents_of

import hidiff

tomesd = pytest.importorskip("tomesd")

SIDE = 640  # latent 80 > the tiny SD native 64


def test_tomesd_first_then_windows_is_refused(sd_pipe):
    tomesd.apply_patch(sd_pipe, ratio=0.5)
    with pytest.raises(ValueError, match="tomesd is applied to this U-Net.*window_attn.*tomesd.remove_patch"):
        hidiff.apply_hidiffusion(sd_pipe)
    with pytest.raises(ValueError, match="kv_downsample"):
        hidiff.apply_hidiffusion(sd_pipe, window_attn=False, kv_downsample=2)
    assert not hidiff.is_patched(sd_pipe)  # refused before anything was touched


@pytest.mark.slow
def test_tomesd_after_windows_is_refused_at_the_call_and_removing_it_restores(sd_pipe):
    hidiff.apply_hidiffusion(sd_pipe)
    plain = latents_of(sd_pipe, SIDE, SIDE)
    tomesd.apply_patch(sd_pipe, ratio=0.5)
    with pytest.raises(ValueError, match="tomesd is applied to this U-Net"):
        latents_of(sd_pipe, SIDE, SIDE)
    latents_of(sd_pipe, 512, 512)  # at native size hidiff does nothing: no refusal
    tomesd.remove_patch(sd_pipe)
    again = latents_of(sd_pipe, SIDE, SIDE)
    assert torch.equal(again, plain) and hidiff.last_call(sd_pipe).windows


@pytest.mark.slow
@pytest.mark.parametrize("order", ["tomesd first", "hidiff first"])
def test_rau_net_alone_composes_in_either_order(sd_pipe, order):
    hidiff.apply_hidiffusion(sd_pipe, window_attn=False)
    rau = latents_of(sd_pipe, SIDE, SIDE)
    hidiff.remove_hidiffusion(sd_pipe)
    if order == "tomesd first":
        tomesd.apply_patch(sd_pipe, ratio=0.5)
        hidiff.apply_hidiffusion(sd_pipe, window_attn=False)
    else:
        hidiff.apply_hidiffusion(sd_pipe, window_attn=False)
        tomesd.apply_patch(sd_pipe, ratio=0.5)
    both = latents_of(sd_pipe, SIDE, SIDE)
    record = hidiff.last_call(sd_pipe)
    assert record.preset == "sd-1024" and record.skip_sizes[0] == (80, 80) and not record.windows
    assert torch.isfinite(both).all() and not torch.equal(both, rau)  # tomesd really merged
    tomesd.remove_patch(sd_pipe)
    assert torch.equal(latents_of(sd_pipe, SIDE, SIDE), rau)
