"""Key/value downsampling (hidiff.core.ops.kv_downsample), against direct computations."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from hidiff.core import ops
from hidiff.core.architecture import NetworkDescription, Stage, recognise
from hidiff.core.config import HiDiffusionConfig
from hidiff.core.planner import Progress, plan_call

SIZES = [(8, 8), (7, 9), (5, 4), (3, 3), (2, 2), (9, 2), (1, 5)]


def grid(b: int, h: int, w: int, c: int = 3) -> torch.Tensor:
    return torch.randn(b, h * w, c, generator=torch.Generator().manual_seed(h * 100 + w))


@pytest.mark.parametrize("method", ops.KV_METHODS)
@pytest.mark.parametrize("h,w", SIZES)
@pytest.mark.parametrize("factor", (2, 4))
def test_shapes_and_odd_sizes(method, h, w, factor):
    x = grid(2, h, w)
    kv = ops.kv_downsample(x, h, w, factor, method)
    assert (kv.height, kv.width) == (math.ceil(h / factor), math.ceil(w / factor))
    assert kv.tokens.shape == (2, kv.height * kv.width, 3)
    assert kv.valid is None
    assert torch.isfinite(kv.tokens).all()


@pytest.mark.parametrize("method", ops.KV_METHODS)
def test_factor_one_is_identity(method):
    x = grid(2, 7, 5)
    kv = ops.kv_downsample(x, 7, 5, 1, method)
    assert kv.tokens is x and (kv.height, kv.width) == (7, 5)


@pytest.mark.parametrize("h,w", SIZES)
@pytest.mark.parametrize("factor", (2, 4))
def test_average_is_the_mean_of_each_cell(h, w, factor):
    x = grid(1, h, w)
    kv = ops.kv_downsample(x, h, w, factor, "average")
    g = x.view(h, w, 3)
    for i in range(kv.height):
        for j in range(kv.width):
            cell = g[i * factor : (i + 1) * factor, j * factor : (j + 1) * factor].reshape(-1, 3)
            torch.testing.assert_close(kv.tokens[0, i * kv.width + j], cell.mean(0))


@pytest.mark.parametrize("h,w", SIZES)
def test_nearest_keeps_the_top_left_token(h, w):
    x = grid(1, h, w)
    kv = ops.kv_downsample(x, h, w, 2, "nearest")
    assert torch.equal(kv.tokens.view(kv.height, kv.width, 3), x.view(h, w, 3)[::2, ::2])


@pytest.mark.parametrize("h,w", [(8, 8), (7, 9)])
def test_area_matches_adaptive_average_pooling(h, w):
    x = grid(1, h, w)
    kv = ops.kv_downsample(x, h, w, 2, "area")
    ref = torch.nn.functional.adaptive_avg_pool2d(x.view(1, h, w, 3).permute(0, 3, 1, 2), (kv.height, kv.width))
    torch.testing.assert_close(kv.tokens, ref.permute(0, 2, 3, 1).reshape(1, -1, 3))


@pytest.mark.parametrize("method", ops.KV_METHODS)
def test_padding_never_enters_a_key_and_empty_cells_are_invalid(method):
    """A padded window (real tokens in the top-left 3x5 of a 4x6 grid): padding is ignored."""
    h, w = 4, 6
    x = grid(1, h, w)
    valid = torch.zeros(h, w, dtype=torch.bool)
    valid[:3, :5] = True
    garbage = x.clone().view(h, w, 3)
    garbage[~valid] = 1e6
    kv = ops.kv_downsample(garbage.view(1, -1, 3), h, w, 2, method, valid=valid.view(1, -1))
    clean = ops.kv_downsample(x.view(1, h, w, 3)[:, :3, :5].reshape(1, -1, 3), 3, 5, 2, method)
    assert kv.valid is not None and bool(kv.valid.all())  # every 2x2 cell holds a real token here
    assert kv.tokens.abs().max() < 1e3
    if method != "area":  # area's cells follow the padded size, so they differ from the unpadded map's
        torch.testing.assert_close(kv.tokens, clean.tokens)
    valid[2:] = False  # the bottom row of cells holds padding only
    kv = ops.kv_downsample(garbage.view(1, -1, 3), h, w, 2, method, valid=valid.view(1, -1))
    assert kv.valid.view(2, 3)[1].eq(False).all() and kv.valid.view(2, 3)[0].all()
    bias = ops.key_bias(kv.valid, x.dtype)
    assert bias.shape == (1, 1, 6) and (bias[0, 0, 3:] == torch.finfo(x.dtype).min).all()


def test_bad_arguments_are_refused():
    x = grid(1, 4, 4)
    with pytest.raises(ValueError, match="factor"):
        ops.kv_downsample(x, 4, 4, 3)
    with pytest.raises(ValueError, match="method"):
        ops.kv_downsample(x, 4, 4, 2, "bilinear")
    with pytest.raises(ValueError, match="does not match"):
        ops.kv_downsample(x, 3, 4, 2)


@pytest.mark.parametrize("method", ops.KV_METHODS)
def test_a_smooth_map_stays_close(method):
    """On a smooth map the shrunk keys/values give nearly the same attention output."""
    h = w = 16
    ys, xs = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    x = torch.stack([torch.sin(3 * ys), torch.cos(2 * xs), ys * xs, ys - xs], -1).view(1, h * w, 4)
    full = torch.softmax(x @ x.transpose(1, 2), -1) @ x
    k = ops.kv_downsample(x, h, w, 2, method).tokens
    approx = torch.softmax(x @ k.transpose(1, 2), -1) @ k
    assert float((approx - full).norm() / full.norm()) < 0.1  # nearest 0.056, average 0.02 here


@pytest.mark.parametrize("value", [0, 3, 8, 2.0, True, "2", None])
def test_config_refuses_other_factors(value):
    with pytest.raises(ValueError, match="kv_downsample must be 1 \\(off\\), 2 or 4"):
        HiDiffusionConfig(kv_downsample=value)


def test_config_accepts_the_factors():
    assert HiDiffusionConfig().kv_downsample == 1
    assert HiDiffusionConfig(kv_downsample=4).to_dict()["kv_downsample"] == 4


@pytest.mark.parametrize("value", [0, 3, 2.0, True, "2", None])
def test_config_refuses_other_levels(value):
    with pytest.raises(ValueError, match="kv_levels must be 1 .* or 2"):
        HiDiffusionConfig(kv_downsample=2, kv_levels=value)


def test_config_refuses_a_level_without_a_factor():
    with pytest.raises(ValueError, match="kv_levels=2 .* kv_downsample is 1 \\(off\\): pass kv_downsample=2 or 4"):
        HiDiffusionConfig(kv_levels=2)
    assert HiDiffusionConfig().kv_levels == 1
    assert HiDiffusionConfig(kv_downsample=2, kv_levels=2).to_dict()["kv_levels"] == 2


def _network(attention):
    n = len(attention)
    return NetworkDescription(
        stages=tuple(Stage(64 * (k + 1), 2, a, k < n - 1) for k, a in enumerate(attention)),
        up_layers=(3,) * n,
        up_cross_attention=tuple(reversed(attention)),
        cross_attention_dim=768,
    )


@pytest.mark.parametrize(
    "attention, levels, stages",
    [
        ([True, True, True, False], 1, (0,)),
        ([True, True, True, False], 2, (0, 1)),  # SD: the 640-wide stage
        ([False, True, True], 2, (1, 2)),  # SDXL: the 1280-wide stage
        ([False, True, True, False], 2, (1, 2)),  # the SDXL refiner
    ],
)
def test_plan_says_where_kv_acts(attention, levels, stages):
    arch = recognise(_network(attention))
    config = HiDiffusionConfig(kv_downsample=2, kv_levels=levels)
    native = arch.native[0]
    plan = plan_call(arch, (2 * native, 2 * native), config, Progress(10, 20))
    assert plan.kv == 2 and plan.kv_stages == stages
    assert plan_call(arch, arch.native, config, Progress(10, 20)).kv_stages == ()  # at native: nothing
    off = plan_call(arch, (2 * native, 2 * native), HiDiffusionConfig(), Progress(10, 20))
    assert off.kv == 1 and off.kv_stages == ()


def test_a_missing_deeper_level_is_refused():
    """An SDXL-layout architecture whose stage below the windows has no transformer blocks
    (recognise refuses such a network as a whole; kv_stages still guards any architecture)."""
    arch = dataclasses.replace(recognise(_network([False, True, True])), network=_network([False, True, False]))
    assert arch.kv_stages(1) == (1,)
    with pytest.raises(ValueError, match="no transformer blocks at down stage 2 .* use kv_levels=1"):
        arch.kv_stages(2)
