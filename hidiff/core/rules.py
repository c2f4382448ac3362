"""HiDiffusion's per-call rules, written once for every host.

A host hands these functions what it has (the plan of the call, a token map, the images'
seeds, the step, the layer) and gets back what to run. Nothing here knows a host:

* :func:`row_seeds` and :func:`window_shifts`: which window seed each batch row gets, and
  which shift each windowed self-attention uses at a step;
* :func:`arrange_self_attention` / :func:`merge_self_attention` and
  :func:`self_attention`: windowed self-attention with key/value downsampling inside the
  padded windows (partition with the shift, the key/value map and the padding bias, the
  merge), for a host that rewrites an attention module's inputs (diffusers) and for a host
  that replaces the attention itself with its own attention function (ComfyUI);
* :func:`input_block_stages` and :func:`residual_sizes`: the size every ControlNet /
  T2I-Adapter residual is resized to, from the plan;
* :class:`CallRecord`: what a call did, filled by these rules in every host;
* :func:`schedule_progress`: where a call stands in its run, with the one rule for calls
  whose noise level is not in the sampled schedule (:func:`off_schedule_progress`) and for
  schedules that ascend (an inversion: planned as the sampling it mirrors).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Optional, Union

import torch

from . import ops
from .architecture import Architecture
from .config import HiDiffusionConfig
from .planner import Plan, Progress
from .progress import position

Size = tuple[int, int]
#: One (dy, dx) for every row of a batch, or one per row.
Shifts = Union[ops.Shift, tuple[ops.Shift, ...], list[ops.Shift]]


# ---------------------------------------------------------------- the call record
class WindowCall(NamedTuple):
    """One self-attention run in shifted windows."""

    layer: int  # ordinal of the windowed self-attention, in forward order
    map: Size  # (H, W) of the token map
    shift: Union[ops.Shift, tuple[ops.Shift, ...]]  # one (dy, dx), or one per batch row


class KVCall(NamedTuple):
    """One self-attention whose keys/values were downsampled."""

    layer: int  # ordinal as for windows; the next stage's (kv_levels 2) numbered on after them
    stage: int  # the down stage (the stage or its mirror)
    map: Size  # (H, W) the keys were taken from: each (padded) window, or the whole map
    kv_map: Size  # (h, w) after downsampling
    factor: int


@dataclass
class CallRecord:
    """What HiDiffusion did in one U-Net call: what ran, not only what was planned.

    Every host fills it the same way: the plan's fields when the call starts, and the rest
    through the methods below, called by the per-call rules of this module and by the host
    where its RAU-Net hooks act.
    """

    step: int = 0
    total: int = 0
    latent: Size = (0, 0)
    preset: Optional[str] = None
    batch: int = 0
    plan: Optional[Plan] = None
    conv: bool = False  # the strided conv ran
    conv_out: Optional[Size] = None  # the strided conv's output size
    pool: bool = False  # the pooling ran
    pooled_from: Optional[Size] = None
    pooled_to: Optional[Size] = None
    unpooled: Optional[tuple[Size, Size]] = None  # (from, to) where the pooled map was grown back
    skip_sizes: dict[int, Size] = field(default_factory=dict)  # input size of each down stage's downsampler
    windows: bool = False  # at least one self-attention ran in windows
    window_runs: list[WindowCall] = field(default_factory=list)
    unwindowed: int = 0  # planned windowed calls that ran as full attention (a host's attention without masks)
    kv_runs: list[KVCall] = field(default_factory=list)
    residual_sizes: dict[str, list[Optional[Size]]] = field(default_factory=dict)  # "down", "mid", "adapter"

    @classmethod
    def of(cls, plan: Plan, batch: int) -> CallRecord:
        return cls(step=plan.step, total=plan.total, latent=plan.latent, preset=plan.preset, batch=batch, plan=plan)

    # Views kept under the names the diffusers host's record had (public API).
    @property
    def window_calls(self) -> int:
        return len(self.window_runs)

    @property
    def window_maps(self) -> list[Size]:
        return [w.map for w in self.window_runs]

    @property
    def shifts(self) -> list[Union[ops.Shift, tuple[ops.Shift, ...]]]:
        return [w.shift for w in self.window_runs]

    @property
    def kv_calls(self) -> int:
        return len(self.kv_runs)

    @property
    def kv_maps(self) -> list[tuple[Size, Size]]:
        return [(k.map, k.kv_map) for k in self.kv_runs]

    @property
    def kv_at(self) -> list[int]:
        return [k.stage for k in self.kv_runs]

    @property
    def pooled(self) -> Optional[tuple[Size, Size]]:
        if self.pooled_from is None or self.pooled_to is None:
            return None
        return self.pooled_from, self.pooled_to

    def strided(self, out: Size) -> None:
        self.conv, self.conv_out = True, out

    def pooled_map(self, before: Size, after: Size) -> None:
        self.pool, self.pooled_from, self.pooled_to = True, before, after


# ---------------------------------------------------------------- seeds and shifts
def row_seeds(config: HiDiffusionConfig, rows: int, image_seeds: Sequence[int]) -> list[int]:
    """The window seed of each of ``rows`` batch rows.

    ``window_seed`` fixes it for every row; otherwise row r takes the seed of image
    r mod len(image_seeds) (the images' seeds, hashed from each image's initial latents by
    :func:`hidiff.core.ops.image_seeds`): the conditional and unconditional copies of an
    image share its seed, and an image's shifts do not depend on its place in the batch.
    """
    if config.window_seed is not None:
        return [int(config.window_seed)] * rows
    seeds = list(image_seeds) or [0]
    return [int(seeds[r % len(seeds)]) for r in range(rows)]


def window_shifts(
    config: HiDiffusionConfig, seeds: Sequence[int], step: int, layer: int, hw: Size
) -> Union[ops.Shift, list[ops.Shift]]:
    """The window shift of a windowed self-attention call: one for the batch, or one per row.

    ``"seeded"``: a hash of each row's seed, the step and the layer (:func:`ops.shift_for`);
    ``"reference"``: the published draw, the global torch RNG once per windowed call;
    ``"none"``: no shift.
    """
    mode = config.window_shift
    if mode == "reference":
        return ops.shift_from_uniform(float(torch.rand(1)), hw[0], hw[1])
    if mode == "none":
        return (0, 0)
    return [ops.shift_for(seed, step, layer, hw[0], hw[1]) for seed in seeds]


# ---------------------------------------------------------------- self-attention
@dataclass(frozen=True)
class LayerRule:
    """What one self-attention layer does in one call."""

    windowed: bool  # run in shifted 2x2 windows
    kv: int  # key/value downsampling factor (1: off)
    stage: int  # its down stage (the stage or its mirror)

    @property
    def acts(self) -> bool:
        return self.windowed or self.kv > 1


def layer_rule(plan: Plan, arch: Architecture, stage: int) -> LayerRule:
    """The rule of a self-attention at down stage ``stage`` (or its mirror) under ``plan``."""
    windowed = plan.windows and stage == arch.window_stage
    kv = plan.kv if stage in plan.kv_stages else 1
    return LayerRule(windowed, kv, stage)


class Arranged(NamedTuple):
    """What :func:`arrange_self_attention` returns: the inputs of the attention to run."""

    tokens: torch.Tensor  # the queries' token map: windows (4B, wh*ww, C), or the map itself
    keys: Optional[torch.Tensor]  # the downsampled key/value token map (None: keys are ``tokens``)
    key_bias: Optional[torch.Tensor]  # additive mask over the keys (padding of uneven windows), or None
    windows: Optional[ops.Windows]  # what undoes the windows (None: not windowed)


def arrange_self_attention(
    x: torch.Tensor,
    hw: Size,
    rule: LayerRule,
    shift: Optional[Shifts] = None,
    *,
    keys: bool = True,
    record: Optional[CallRecord] = None,
    layer: int = -1,
) -> Arranged:
    """Partition a (B, H*W, C) token map into shifted windows and shrink its keys/values.

    With ``rule.windowed`` the map is cut into a 2x2 grid of windows after the cyclic
    ``shift`` (uneven windows on odd sides padded, the padding masked by the key bias);
    with ``rule.kv`` > 1 the keys/values come from each (padded) window downsampled on its
    own (padding never enters a key; a cell of padding only is masked), or from the whole
    map when not windowed. ``keys`` False arranges queries only (a host that projects q, k
    and v itself arranges each). ``record`` gets the window run and the key/value run.
    """
    windows = None
    tokens, height, width, bias = x, hw[0], hw[1], None
    if rule.windowed:
        windows = ops.window_partition(x, hw[0], hw[1], (0, 0) if shift is None else shift)
        tokens, bias = windows.tokens, windows.key_bias
        height, width = ops.window_sides(hw[0], hw[1])
        if record is not None and keys:
            record.windows = True
            record.window_runs.append(WindowCall(layer, hw, windows.shift))
    small = None
    if keys and rule.kv > 1 and min(height, width) >= 2:
        valid = bias[:, 0, :] == 0 if bias is not None else None
        kv = ops.kv_downsample(tokens, height, width, rule.kv, valid=valid)
        small = kv.tokens
        bias = ops.key_bias(kv.valid, x.dtype) if kv.valid is not None else None
        if record is not None:
            record.kv_runs.append(KVCall(layer, rule.stage, (height, width), (kv.height, kv.width), rule.kv))
    return Arranged(tokens, small, bias, windows)


def merge_self_attention(out: torch.Tensor, arranged: Arranged) -> torch.Tensor:
    """The attention's output back on the token map (the inverse of the windows, if any)."""
    return ops.window_merge(out, arranged.windows) if arranged.windows is not None else out


#: A host's attention: (queries, keys, values, additive key bias or None) -> output tokens.
Attention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]], torch.Tensor]


def self_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    hw: Size,
    rule: LayerRule,
    attention: Attention,
    shift: Optional[Shifts] = None,
    *,
    record: Optional[CallRecord] = None,
    layer: int = -1,
) -> torch.Tensor:
    """Windowed self-attention with downsampled keys/values, around a host's ``attention``.

    For a host whose self-attention receives projected (B, H*W, C) queries, keys and values
    (keys and values are per-token linear maps of the tokens, so arranging them equals
    arranging the tokens first). Arranges each the same way as :func:`arrange_self_attention`,
    runs ``attention`` on the windows and merges.
    """
    if not rule.acts:
        return attention(q, k, v, None)
    queries = arrange_self_attention(q, hw, rule, shift, keys=False)
    shrunk_keys = arrange_self_attention(k, hw, rule, shift, record=record, layer=layer)
    shrunk_values = arrange_self_attention(v, hw, rule, shift, record=None, layer=layer)
    keys = shrunk_keys.keys if shrunk_keys.keys is not None else shrunk_keys.tokens
    values = shrunk_values.keys if shrunk_values.keys is not None else shrunk_values.tokens
    out = attention(queries.tokens, keys, values, shrunk_keys.key_bias)
    return merge_self_attention(out, queries)


# ---------------------------------------------------------------- ControlNet / T2I-Adapter residuals
def input_block_stages(arch: Architecture) -> tuple[tuple[int, str], ...]:
    """(down stage, part) of each input block in ControlNet residual order: block 0 is the
    input conv (stage -1, ``"conv_in"``), then each stage's layers (``"layer"``) and its
    downsampler (``"downsample"``)."""
    network = arch.network
    if network is None:
        raise ValueError("the input blocks need the architecture's network description")
    blocks: list[tuple[int, str]] = [(-1, "conv_in")]
    for k, stage in enumerate(network.stages):
        blocks += [(k, "layer")] * stage.layers
        if stage.downsample:
            blocks.append((k, "downsample"))
    return tuple(blocks)


class ResidualSizes(NamedTuple):
    """The size each ControlNet / T2I-Adapter residual is resized to under a plan."""

    down: tuple[Size, ...]  # ControlNet residual per input block (ControlNet order), where it meets its skip
    mid: Size  # the ControlNet's mid-block residual
    adapter: tuple[Size, ...]  # T2I-Adapter residual per down stage, then the mid block
    block_outputs: tuple[Size, ...]  # each input block's output before RAU-Net pools it (a residual added there)


def residual_sizes(plan: Plan, arch: Architecture) -> ResidualSizes:
    """Residual sizes from the planner's feature sizes, for every host."""
    blocks = input_block_stages(arch)
    outputs = list(plan.skip_sizes)
    if plan.pool:
        # The pooled block's output is pooled after a residual is added to it.
        first = blocks.index((arch.pool_stage, "layer"))
        outputs[first] = plan.skip_sizes[first - 1]
    return ResidualSizes(plan.skip_sizes, plan.mid_size, plan.adapter_sizes, tuple(outputs))


# ---------------------------------------------------------------- the schedule
def ascending(schedule: Sequence[float]) -> bool:
    """Whether a schedule's noise levels rise (an inversion's timesteps), not fall as sampling's do."""
    return len(schedule) > 1 and float(schedule[0]) < float(schedule[-1])


def off_schedule_progress(value: float, levels: Sequence[float], steps: int) -> Progress:
    """THE rule for a call whose noise level is not in the sampled schedule (every host).

    ``levels`` are the schedule's noise levels in sampling order (falling), ``steps`` its
    number of steps. The call is planned at the step whose interval of levels holds its
    value: between ``levels[i]`` and ``levels[i + 1]`` it is step i (the step it would have
    started from); above the first level, step 0; below the last listed level, the last
    step. So an off-schedule call gets the plan of the sampled step nearest in noise, never
    a made-up total, and a host warns that it happened.
    """
    desc = [float(v) for v in levels]
    if ascending(desc):
        desc.reverse()
    steps = max(1, steps)
    if not desc or value >= desc[0]:
        return Progress(0, steps)
    for i in range(1, len(desc)):
        if value >= desc[i]:  # desc[i - 1] > value >= desc[i]: step i - 1, or step i on its level
            return Progress(min(i if value == desc[i] else i - 1, steps - 1), steps)
    return Progress(steps - 1, steps)


def schedule_progress(value: float, levels: Sequence[float], after: int = -1) -> Optional[Progress]:
    """Step of a call at noise level ``value`` in a schedule of ``levels`` (one per step), or
    None when the value is not one of them. A schedule that ascends (an inversion walking
    sampling's steps backwards) is mirrored: a call at the level of sampling step i is
    planned as step i, so RAU-Net acts at the noise levels where sampling will run it."""
    values = [float(v) for v in levels]
    if ascending(values):
        values.reverse()
        found = position(value, values)
    else:
        found = position(value, values, after)
    return None if found is None else Progress(found, len(values))
