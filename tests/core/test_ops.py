"""Tensor operations of hidiff (hidiff.core.ops), checked against independent computations.

The reference computations here are written from REFERENCE.md ("The operations"), not
from hidiff's code: windows are cut straight out of the rolled (H, W) grid with explicit
slices at ceil(H/2) and ceil(W/2), and attention inside each window is a plain softmax.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hidiff.core import ops

SIZES = [(8, 8), (7, 9), (5, 4), (3, 3), (2, 2), (6, 11), (9, 2)]
# One u from each band of the published rule, so that every shift the rule can give appears.
US = [0.0, 0.3, 0.6, 0.9]


def all_shifts(h: int, w: int) -> list[tuple[int, int]]:
    return sorted({ops.shift_from_uniform(u, h, w) for u in US})


def cases():
    for h, w in SIZES:
        for shift in all_shifts(h, w):
            yield h, w, shift


CASES = list(cases())
CASE_IDS = [f"{h}x{w}-shift{s[0]}_{s[1]}" for h, w, s in CASES]


# --------------------------------------------------------------------------- references
def regions(h: int, w: int) -> list[tuple[slice, slice]]:
    """The 2x2 grid of windows over an h x w map, row-major: rows split at ceil(h/2), columns at ceil(w/2)."""
    r, c = math.ceil(h / 2), math.ceil(w / 2)
    rows = [slice(0, r), slice(r, h)]
    cols = [slice(0, c), slice(c, w)]
    return [(rs, cs) for rs in rows for cs in cols]


def plain_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v over the last two dims, no masking, no fused kernel."""
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    return torch.softmax(scores, dim=-1) @ v


def reference_window_attention(q, k, v, h, w, shift, heads):
    """Per-window attention of (B, h*w, C) maps: roll by -shift, attend inside each of the
    four window regions separately, paste back, roll by +shift."""
    b, _, c = q.shape
    d = c // heads

    def grid(t):
        return torch.roll(t.reshape(b, h, w, c), shifts=(-shift[0], -shift[1]), dims=(1, 2))

    gq, gk, gv = grid(q), grid(k), grid(v)
    out = torch.empty_like(gq)
    for rs, cs in regions(h, w):

        def tok(g, rs=rs, cs=cs):
            t = g[:, rs, cs, :].reshape(b, -1, heads, d)
            return t.transpose(1, 2)  # (B, heads, n, d)

        o = plain_attention(tok(gq), tok(gk), tok(gv))  # (B, heads, n, d)
        n_h = rs.stop - rs.start
        n_w = cs.stop - cs.start
        out[:, rs, cs, :] = o.transpose(1, 2).reshape(b, n_h, n_w, c)
    out = torch.roll(out, shifts=(shift[0], shift[1]), dims=(1, 2))
    return out.reshape(b, h * w, c)


def windowed_sdpa(q, k, v, h, w, shift, heads):
    """What the adapter does around attn1: partition, SDPA with key_bias as the additive
    mask (diffusers shape handling: (4B, 1, N) -> (4B, heads, 1, N)), merge."""
    wq = ops.window_partition(q, h, w, shift)
    wk = ops.window_partition(k, h, w, shift)
    wv = ops.window_partition(v, h, w, shift)
    assert wq.tokens.shape == wk.tokens.shape == wv.tokens.shape
    bw, n, c = wq.tokens.shape
    d = c // heads

    def split(t):
        return t.view(bw, n, heads, d).transpose(1, 2)

    mask = None
    if wk.key_bias is not None:
        assert wk.key_bias.shape == (bw, 1, n)
        # diffusers' prepare_attention_mask repeats over heads, then views (batch, heads, -1, N).
        mask = wk.key_bias.repeat_interleave(heads, dim=0).view(bw, heads, -1, n)
    o = F.scaled_dot_product_attention(split(wq.tokens), split(wk.tokens), split(wv.tokens), attn_mask=mask)
    o = o.transpose(1, 2).reshape(bw, n, c)
    return ops.window_merge(o, wq)


# --------------------------------------------------------------------------- partition / merge
@pytest.mark.parametrize("h,w,shift", CASES, ids=CASE_IDS)
def test_partition_merge_round_trip_is_bitwise_identity(h, w, shift):
    gen = torch.Generator().manual_seed(h * 100 + w)
    x = torch.randn(3, h * w, 5, generator=gen)
    win = ops.window_partition(x, h, w, shift)
    wh, ww = math.ceil(h / 2), math.ceil(w / 2)
    assert win.tokens.shape == (4 * 3, wh * ww, 5)
    back = ops.window_merge(win.tokens, win)
    assert back.shape == x.shape
    assert torch.equal(back, x)


@pytest.mark.parametrize("h,w,shift", CASES, ids=CASE_IDS)
def test_partition_is_batch_major_and_cuts_the_rolled_grid(h, w, shift):
    """Window k (row-major in the 2x2 grid) of sample b is row 4*b + k; its valid tokens
    are exactly the region of the rolled grid, in row-major order."""
    b, c = 2, 3
    gen = torch.Generator().manual_seed(7 + h + 31 * w)
    x = torch.randn(b, h * w, c, generator=gen)
    win = ops.window_partition(x, h, w, shift)
    rolled = torch.roll(x.view(b, h, w, c), shifts=(-shift[0], -shift[1]), dims=(1, 2))
    wh, ww = math.ceil(h / 2), math.ceil(w / 2)
    for bi in range(b):
        for k, (rs, cs) in enumerate(regions(h, w)):
            window = win.tokens[4 * bi + k].view(wh, ww, c)
            region = rolled[bi, rs, cs, :]
            rh, rw = region.shape[:2]
            assert torch.equal(window[:rh, :rw], region)
            if win.key_bias is not None:
                valid = win.key_bias[4 * bi + k, 0].view(wh, ww) == 0
                expected = torch.zeros(wh, ww, dtype=torch.bool)
                expected[:rh, :rw] = True
                assert torch.equal(valid, expected)
            else:
                assert (rh, rw) == (wh, ww)


@pytest.mark.parametrize("h,w", SIZES)
def test_key_bias_only_for_odd_sides(h, w):
    x = torch.randn(2, h * w, 4)
    win = ops.window_partition(x, h, w)
    if h % 2 == 0 and w % 2 == 0:
        assert win.key_bias is None
    else:
        wh, ww = math.ceil(h / 2), math.ceil(w / 2)
        assert win.key_bias is not None
        assert win.key_bias.shape == (8, 1, wh * ww)
        assert win.key_bias.dtype == x.dtype
        # Padded keys get a bias that zeroes them in a softmax; valid keys get exactly 0.
        masked = win.key_bias != 0
        n_valid = (~masked).sum().item()
        assert n_valid == 2 * h * w
        assert torch.all(win.key_bias[masked] <= -1e30)


def test_partition_rejects_mismatched_token_count():
    with pytest.raises(ValueError):
        ops.window_partition(torch.randn(1, 63, 4), 8, 8)
    with pytest.raises(ValueError):
        ops.window_partition(torch.randn(2, 7 * 9, 4), 9, 8)


# --------------------------------------------------------------------------- windowed attention
@pytest.mark.parametrize("heads", [1, 2])
@pytest.mark.parametrize("h,w,shift", CASES, ids=CASE_IDS)
def test_windowed_sdpa_equals_per_window_attention(h, w, shift, heads):
    gen = torch.Generator().manual_seed(1000 + 17 * h + w)
    b, c = 2, 8
    q, k, v = (torch.randn(b, h * w, c, generator=gen) for _ in range(3))
    got = windowed_sdpa(q, k, v, h, w, shift, heads)
    want = reference_window_attention(q, k, v, h, w, shift, heads)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("h,w,shift", [(7, 9, (1, 1)), (5, 4, (0, 0)), (6, 11, (2, 3)), (8, 8, (2, 2))])
def test_windowed_self_attention_identity_projections(h, w, shift):
    """Self-attention of one token map x (q = k = v = x): the windowed result is local to each window."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, h * w, 4, generator=gen)
    got = windowed_sdpa(x, x, x, h, w, shift, heads=1)
    want = reference_window_attention(x, x, x, h, w, shift, heads=1)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    # and it really is windowed: full attention over the map differs
    full = plain_attention(x, x, x)
    assert not torch.allclose(got, full, atol=1e-3)


@pytest.mark.parametrize("h,w,shift", [(7, 9, (1, 2)), (6, 8, (1, 2)), (3, 3, (0, 0)), (5, 4, (0, 0))])
def test_windows_through_diffusers_attention_module(h, w, shift):
    """A real diffusers Attention (AttnProcessor2_0) on the windows, with key_bias as its
    attention_mask, equals the same module run on each window region on its own."""
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(11)
    c, heads = 8, 2
    attn = Attention(query_dim=c, heads=heads, dim_head=c // heads).eval()
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, h * w, c, generator=gen)
    with torch.no_grad():
        win = ops.window_partition(x, h, w, shift)
        out = attn(win.tokens, attention_mask=win.key_bias)
        got = ops.window_merge(out, win)

        grid = torch.roll(x.view(2, h, w, c), shifts=(-shift[0], -shift[1]), dims=(1, 2))
        want = torch.empty_like(grid)
        for rs, cs in regions(h, w):
            region = grid[:, rs, cs, :]
            rh, rw = region.shape[1:3]
            want[:, rs, cs, :] = attn(region.reshape(2, rh * rw, c)).view(2, rh, rw, c)
        want = torch.roll(want, shifts=shift, dims=(1, 2)).reshape(2, h * w, c)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------- shifts
@pytest.mark.parametrize("h,w", [(16, 16), (13, 30), (64, 40), (2, 2), (7, 9), (96, 128)])
def test_shift_from_uniform_thresholds(h, w):
    wh, ww = math.ceil(h / 2), math.ceil(w / 2)
    q = (wh // 4, ww // 4)
    eps = 1e-6
    table = [
        (0.0, 0),
        (0.1, 0),
        (0.25, 0),  # u <= 0.25: no shift
        (0.25 + eps, 1),
        (0.5, 1),  # u <= 0.5: one quarter
        (0.5 + eps, 2),
        (0.75, 2),  # u <= 0.75: two quarters
        (0.75 + eps, 3),
        (0.999999, 3),  # else: three quarters
    ]
    for u, quarters in table:
        assert ops.shift_from_uniform(u, h, w) == (q[0] * quarters, q[1] * quarters), (u, h, w)


def test_shift_from_uniform_matches_torch_rand_draws():
    """With draws like the published torch.rand(1), the four shifts come out in the right proportions."""
    gen = torch.Generator().manual_seed(0)
    us = torch.rand(4000, generator=gen)
    counts = {}
    for u in us.tolist():
        s = ops.shift_from_uniform(u, 32, 32)  # window 16: quarter 4
        counts[s] = counts.get(s, 0) + 1
    assert set(counts) == {(0, 0), (4, 4), (8, 8), (12, 12)}
    for n in counts.values():
        assert 850 < n < 1150


def test_window_sides_are_ceil_halves():
    for h, w in itertools.product(range(1, 12), range(1, 12)):
        assert ops.window_sides(h, w) == (math.ceil(h / 2), math.ceil(w / 2))


# --------------------------------------------------------------------------- RAU-Net pool / conv
@pytest.mark.parametrize("h,w", [(8, 8), (7, 9), (5, 4), (3, 3), (2, 2), (1, 5), (80, 80), (25, 31)])
def test_rau_pool_halves_with_ceil_and_unpool_restores(h, w):
    gen = torch.Generator().manual_seed(h * w)
    x = torch.randn(2, 3, h, w, generator=gen)
    pooled = ops.rau_pool(x)
    assert pooled.shape == (2, 3, math.ceil(h / 2), math.ceil(w / 2))
    # each output cell is the mean of the cells of its 2x2 block that exist (ceil mode)
    for i in range(pooled.shape[-2]):
        for j in range(pooled.shape[-1]):
            block = x[:, :, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2]
            torch.testing.assert_close(pooled[:, :, i, j], block.mean(dim=(-2, -1)), rtol=0, atol=1e-6)
    back = ops.rau_unpool(pooled, (h, w))
    assert back.shape == x.shape
    # bicubic resize of a constant map is that constant
    const = torch.full((1, 2, math.ceil(h / 2), math.ceil(w / 2)), 0.75)
    torch.testing.assert_close(ops.rau_unpool(const, (h, w)), torch.full((1, 2, h, w), 0.75), rtol=0, atol=1e-5)


def test_rau_unpool_matches_bicubic_interpolate():
    x = torch.randn(1, 2, 4, 5)
    torch.testing.assert_close(
        ops.rau_unpool(x, (7, 9)), F.interpolate(x, size=(7, 9), mode="bicubic", align_corners=False)
    )


def test_rau_conv_geometry_is_published():
    g = ops.RAU_CONV_GEOMETRY
    assert tuple(g["stride"]) == (4, 4)
    assert tuple(g["padding"]) == (2, 2)
    assert tuple(g["dilation"]) == (2, 2)


@pytest.mark.parametrize("n", range(5, 41))
def test_conv_out_side_matches_real_conv(n):
    g = ops.RAU_CONV_GEOMETRY
    conv = nn.Conv2d(1, 1, 3, stride=g["stride"], padding=g["padding"], dilation=g["dilation"])
    m = n + 3  # a non-square map checks both sides
    with torch.no_grad():
        out = conv(torch.zeros(1, 1, n, m))
    side = ops.conv_out_side(n, g["stride"][0], g["padding"][0], g["dilation"][0])
    assert out.shape[-2] == side == math.ceil(n / 4)
    assert out.shape[-1] == ops.conv_out_side(m, g["stride"][1], g["padding"][1], g["dilation"][1]) == math.ceil(m / 4)
    # and the stock geometry halves with ceil
    stock = nn.Conv2d(1, 1, 3, stride=2, padding=1)
    with torch.no_grad():
        assert stock(torch.zeros(1, 1, n, m)).shape[-2] == ops.conv_out_side(n, 2, 1, 1) == math.ceil(n / 2)
