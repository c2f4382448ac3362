"""Pure tensor operations of HiDiffusion. Nothing here knows about diffusers.

Token maps are (B, N, C) sequences of an H x W grid in row-major order, as the
transformer blocks of a Stable Diffusion U-Net see them.
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Sequence
from typing import Any, NamedTuple, Optional, Union

import torch
import torch.nn.functional as F
from typing_extensions import TypeGuard

#: Geometry of the resolution-aware conv downsampler: the stock 3x3 stride-2 conv
#: re-run with stride 4, padding 2 and dilation 2 (same weights), so that a side of
#: n becomes ceil(n / 4) instead of ceil(n / 2).
RAU_CONV_GEOMETRY = {"stride": (4, 4), "padding": (2, 2), "dilation": (2, 2)}


def conv_out_side(n: int, stride: int, padding: int, dilation: int, kernel: int = 3) -> int:
    return (n + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def rau_pool(x: torch.Tensor) -> torch.Tensor:
    """Halve a (B, C, H, W) map, odd sides rounded up."""
    return F.avg_pool2d(x, kernel_size=(2, 2), ceil_mode=True)


def resize_to(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize a (B, C, H, W) map to ``size`` bicubically (as published); no-op when it fits."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bicubic")


#: Grow a map pooled by :func:`rau_pool` back to its recorded size.
rau_unpool = resize_to


def stock_downsample_side(n: int) -> int:
    """Side after a stock 3x3 stride-2 padding-1 downsampler: ceil(n / 2)."""
    return conv_out_side(n, 2, 1, 1)


def rau_conv_side(n: int) -> int:
    g = RAU_CONV_GEOMETRY
    return conv_out_side(n, g["stride"][0], g["padding"][0], g["dilation"][0])


def window_sides(h: int, w: int) -> tuple[int, int]:
    """Sides of each window of the 2x2 grid over an h x w map (the last row/column may be short)."""
    return math.ceil(h / 2), math.ceil(w / 2)


def shift_from_uniform(u: float, h: int, w: int) -> tuple[int, int]:
    """The published shift rule: u in [0, 1] picks 0, 1, 2 or 3 quarters of a window side."""
    wh, ww = window_sides(h, w)
    quarters = 0 if u <= 0.25 else 1 if u <= 0.5 else 2 if u <= 0.75 else 3
    return (wh // 4) * quarters, (ww // 4) * quarters


def shift_for(seed: int, step: int, layer: int, height: int, width: int) -> tuple[int, int]:
    """The window shift of one image at one denoising step in one windowed layer.

    A pure function of its arguments (a hash, no generator state): every host gives the
    same shifts for the same seed, however it batches the images or splits the
    conditional and unconditional halves of a step into calls. ``layer`` is the ordinal
    of the windowed self-attention among all windowed ones, in forward order.
    """
    digest = hashlib.blake2b(f"{seed}:{step}:{layer}".encode(), digest_size=8).digest()
    u = int.from_bytes(digest, "little") / 2**64
    return shift_from_uniform(u, height, width)


def image_seeds(x: torch.Tensor) -> list[int]:
    """One seed per batch row of ``x``, hashed from the row's first values.

    A run's first latents are a function of the caller's generator, so seeding each image's
    window shifts from its own latents makes any image of a batch reproducible alone with
    its own generator, and the global RNG is never touched.
    """
    rows = x.detach().reshape(x.shape[0], -1)[:, :256].to("cpu", torch.float32)
    return [int.from_bytes(hashlib.blake2b(row.numpy().tobytes(), digest_size=8).digest(), "little") for row in rows]


Shift = tuple[int, int]


class Windows(NamedTuple):
    """What :func:`window_partition` returns: the windows and what undoes them."""

    tokens: torch.Tensor  # (4B, wh*ww, C), batch-major: window k of sample b is row 4*b + k
    key_bias: Optional[torch.Tensor]  # (4B, 1, wh*ww) additive mask over padded keys, or None
    batch: int
    height: int
    width: int
    shift: Union[Shift, tuple[Shift, ...]]  # one shift for the batch, or one per sample


def window_partition(
    x: torch.Tensor, height: int, width: int, shift: Union[Shift, Sequence[Shift]] = (0, 0)
) -> Windows:
    """Cut the (B, H*W, C) token map into a 2x2 grid of windows after a cyclic shift.

    ``shift`` is one (dy, dx) for every sample, or a sequence of B of them (one per sample).
    Odd sides give uneven windows (ceil and floor halves); they are padded to the
    larger size and ``key_bias`` masks the padding, so attention inside each window
    is exact: no resampling of the map.

    The shift, the cut and the padding are one precomputed gather: a single copy of the
    map (a roll over two dims then a permute would copy it three times).
    """
    b, n, c = x.shape
    if n != height * width:
        raise ValueError(f"token count {n} does not match a {height}x{width} map")
    shifts = _normalise_shift(shift, b)
    wh, ww = window_sides(height, width)
    if _is_pair(shifts):
        source, _ = _window_order(height, width, shifts, x.device)
        tokens = x.index_select(1, source).view(b * 4, wh * ww, c)
    else:
        source = torch.stack([_window_order(height, width, s, x.device)[0] for s in shifts])
        tokens = x.gather(1, source.unsqueeze(-1).expand(-1, -1, c)).view(b * 4, wh * ww, c)
    key_bias = None
    if 2 * wh != height or 2 * ww != width:
        valid = torch.zeros(2 * wh, 2 * ww, dtype=torch.bool, device=x.device)
        valid[:height, :width] = True
        valid = valid.view(2, wh, 2, ww).permute(0, 2, 1, 3).reshape(4, wh * ww)
        bias = torch.zeros(4, wh * ww, dtype=x.dtype, device=x.device)
        bias.masked_fill_(~valid, torch.finfo(x.dtype).min)
        key_bias = bias.repeat(b, 1).unsqueeze(1)
    return Windows(tokens, key_bias, b, height, width, shifts)


def window_merge(tokens: torch.Tensor, windows: Windows) -> torch.Tensor:
    """Inverse of :func:`window_partition`: (4B, wh*ww, C) back to (B, H*W, C), one gather."""
    b, c, shift = windows.batch, tokens.shape[-1], windows.shift
    flat = tokens.reshape(b, -1, c)
    if _is_pair(shift):
        _, target = _window_order(windows.height, windows.width, shift, tokens.device)
        return flat.index_select(1, target)
    target = torch.stack([_window_order(windows.height, windows.width, s, tokens.device)[1] for s in shift])
    return flat.gather(1, target.unsqueeze(-1).expand(-1, -1, c))


def _is_pair(shift: Any) -> TypeGuard[Shift]:
    return len(shift) == 2 and all(isinstance(v, int) for v in shift)


def _normalise_shift(shift: Any, batch: int) -> Union[Shift, tuple[Shift, ...]]:
    """One (dy, dx) pair, or a tuple of ``batch`` of them (collapsed to one when all are equal)."""
    if _is_pair(shift):
        return (int(shift[0]), int(shift[1]))
    shifts = tuple((int(s[0]), int(s[1])) for s in shift)
    if len(shifts) != batch:
        raise ValueError(f"{len(shifts)} window shifts for a batch of {batch}: give one per sample, or one for all")
    return shifts[0] if len(set(shifts)) == 1 else shifts


@functools.lru_cache(maxsize=64)
def _window_order(height: int, width: int, shift: Shift, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Index maps between a map's tokens and its windows, batch-major and row-major.

    ``source[j]``: the token that window position j holds, where j runs over window k of
    the 2x2 grid (row-major), then row and column inside it; the windows cut the grid
    rolled by -shift, so position (r, c) of the padded grid holds token
    ((r + sh) mod H, (c + sw) mod W). Padding positions hold token 0: its keys are masked
    by ``key_bias`` and its outputs are never read back. ``target[t]``: the window
    position of token t (what :func:`window_merge` reads).
    """
    wh, ww = window_sides(height, width)
    rows = torch.arange(2).view(2, 1, 1, 1) * wh + torch.arange(wh).view(1, 1, wh, 1)
    cols = torch.arange(2).view(1, 2, 1, 1) * ww + torch.arange(ww).view(1, 1, 1, ww)
    rows, cols = rows.expand(2, 2, wh, ww), cols.expand(2, 2, wh, ww)  # (window row, window col, row, col)
    padding = (rows >= height) | (cols >= width)
    source = ((rows + shift[0]) % height) * width + (cols + shift[1]) % width
    source = source.masked_fill(padding, 0).reshape(-1)
    target = torch.empty(height * width, dtype=torch.long)
    target[source[~padding.reshape(-1)]] = torch.nonzero(~padding.reshape(-1)).squeeze(1)
    return source.to(device), target.to(device)


#: Key/value downsampling factors (1: off) and methods of :func:`kv_downsample`.
KV_FACTORS = (1, 2, 4)
KV_METHODS = ("nearest", "average", "area")
#: The method hidiff runs, chosen by measurement (docs/speed.md): on the shipped toy model's
#: real top-stage token maps it gave half the output error of "average" and "area".
KV_METHOD = "nearest"


class KVTokens(NamedTuple):
    """What :func:`kv_downsample` returns."""

    tokens: torch.Tensor  # (B, h*w, C): the downsampled map, row-major
    valid: Optional[torch.Tensor]  # (B, h*w) bool: cells with at least one real token (None: all)
    height: int
    width: int


def kv_side(n: int, factor: int) -> int:
    """Side of a map of side ``n`` after key/value downsampling by ``factor``: ceil(n / factor)."""
    return -(-n // factor)


def kv_downsample(
    x: torch.Tensor,
    height: int,
    width: int,
    factor: int,
    method: str = KV_METHOD,
    valid: Optional[torch.Tensor] = None,
) -> KVTokens:
    """Shrink a (B, H*W, C) token map to ceil(H/f) x ceil(W/f) tokens: the keys and values of a
    ToDo-style self-attention (queries stay at full resolution, so the output keeps its size).

    Methods: ``"nearest"`` keeps the top-left token of each f x f cell; ``"average"`` averages
    each f x f cell (cells cut by an odd side average what they hold, so no token is
    invented and none counted twice); ``"area"`` is adaptive average pooling to the target
    size (overlapping cells where the side is not a multiple of f).

    ``valid`` (B, H*W) bool marks real tokens among padding (the padded windows of an
    odd-sized map): padding never enters an average, and a cell with no real token is
    returned as invalid (mask its key). ``factor`` 1 returns the map unchanged.
    """
    b, n, c = x.shape
    if n != height * width:
        raise ValueError(f"token count {n} does not match a {height}x{width} map")
    if factor not in KV_FACTORS:
        raise ValueError(f"kv_downsample factor must be one of {KV_FACTORS}, got {factor!r}")
    if method not in KV_METHODS:
        raise ValueError(f"kv_downsample method must be one of {KV_METHODS}, got {method!r}")
    if valid is not None and tuple(valid.shape) != (b, n):
        raise ValueError(f"valid mask of shape {tuple(valid.shape)} does not match tokens of shape {(b, n)}")
    if factor == 1:
        return KVTokens(x, valid, height, width)
    h, w = kv_side(height, factor), kv_side(width, factor)
    grid = x.view(b, height, width, c)
    mask = valid.view(b, height, width) if valid is not None else None
    if method == "nearest":
        tokens = grid[:, ::factor, ::factor].reshape(b, h * w, c)
        cells = mask[:, ::factor, ::factor].reshape(b, h * w) if mask is not None else None
        return KVTokens(tokens, cells, h, w)
    if method == "average" and mask is None and height % factor == 0 and width % factor == 0:
        tokens = grid.view(b, h, factor, w, factor, c).mean(dim=(2, 4))
        return KVTokens(tokens.reshape(b, h * w, c), None, h, w)
    weight = (
        mask.to(x.dtype) if mask is not None else torch.ones(1, height, width, dtype=x.dtype, device=x.device)
    ).unsqueeze(-1)
    if method == "average":
        ph, pw = h * factor - height, w * factor - width
        total = F.pad(grid * weight, (0, 0, 0, pw, 0, ph)).view(b, h, factor, w, factor, c).sum(dim=(2, 4))
        count = F.pad(weight, (0, 0, 0, pw, 0, ph)).view(-1, h, factor, w, factor, 1).sum(dim=(2, 4))
    else:  # area: adaptive average pooling, weighted by the mask
        total = F.adaptive_avg_pool2d((grid * weight).permute(0, 3, 1, 2), (h, w)).permute(0, 2, 3, 1)
        count = F.adaptive_avg_pool2d(weight.permute(0, 3, 1, 2), (h, w)).permute(0, 2, 3, 1)
    tokens = (total / count.clamp_min(torch.finfo(x.dtype).tiny)).expand(b, h, w, c).reshape(b, h * w, c)
    cells = (count[..., 0] > 0).expand(b, h, w).reshape(b, h * w) if mask is not None else None
    return KVTokens(tokens, cells, h, w)


def key_bias(valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, N) bool of real keys -> (B, 1, N) additive attention mask (0 for real keys, dtype min for the rest)."""
    bias = torch.zeros(valid.shape, dtype=dtype, device=valid.device)
    return bias.masked_fill_(~valid, torch.finfo(dtype).min).unsqueeze(1)
