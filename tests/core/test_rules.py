"""The per-call rules of hidiff.core.rules, host-free: seeds, shifts, windowed self-attention
with key/value downsampling, residual sizes, the schedule rules. Expected values are written
out from the rules' definitions (docs/how-it-works.md), not from the functions under test."""

from __future__ import annotations

import pytest
import torch

from hidiff.core import ops, rules
from hidiff.core.architecture import NetworkDescription, Stage, recognise
from hidiff.core.config import HiDiffusionConfig
from hidiff.core.planner import Progress, plan_call


def sd_architecture():
    stages = tuple(
        Stage(c, 2, a, d) for c, a, d in ((32, True, True), (64, True, True), (64, True, True), (64, False, False))
    )
    return recognise(NetworkDescription(stages, (3, 3, 3, 3), (False, True, True, True), native=(32, 32)))


# ---------------------------------------------------------------- seeds and shifts
def test_row_seeds_cycle_the_images_and_a_fixed_seed_wins():
    config = HiDiffusionConfig()
    assert rules.row_seeds(config, 4, [7, 9]) == [7, 9, 7, 9]  # cond and uncond copies share a seed
    assert rules.row_seeds(config, 2, []) == [0, 0]
    assert rules.row_seeds(HiDiffusionConfig(window_seed=5), 3, [7, 9]) == [5, 5, 5]


def test_window_shifts_per_mode():
    seeds = [1, 2]
    seeded = rules.window_shifts(HiDiffusionConfig(), seeds, 3, 4, (32, 32))
    assert seeded == [ops.shift_for(1, 3, 4, 32, 32), ops.shift_for(2, 3, 4, 32, 32)]
    assert rules.window_shifts(HiDiffusionConfig(window_shift="none"), seeds, 3, 4, (32, 32)) == (0, 0)
    torch.manual_seed(0)
    u = float(torch.rand(1))
    torch.manual_seed(0)
    drawn = rules.window_shifts(HiDiffusionConfig(window_shift="reference"), seeds, 3, 4, (32, 32))
    assert drawn == ops.shift_from_uniform(u, 32, 32)  # one draw of the global RNG per call


# ---------------------------------------------------------------- self-attention
def plain_attention(q, k, v, bias):
    scores = q @ k.transpose(1, 2) / q.shape[-1] ** 0.5
    if bias is not None:
        scores = scores + bias
    return scores.softmax(-1) @ v


@pytest.mark.parametrize("hw", [(8, 8), (7, 9)])
@pytest.mark.parametrize("kv", [1, 2])
def test_self_attention_is_attention_inside_each_window(hw, kv):
    """Each token attends only to the tokens of its own (shifted) window, with keys from that
    window downsampled by ``kv``: checked token by token against a direct computation."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, hw[0] * hw[1], 4, generator=g)
    shift = (1, 2)
    rule = rules.LayerRule(True, kv, 0)
    record = rules.CallRecord()
    out = rules.self_attention(x, x, x, hw, rule, plain_attention, shift, record=record, layer=3)
    wh, ww = ops.window_sides(*hw)
    grid = x.view(hw[0], hw[1], 4)
    for r in range(hw[0]):
        for c in range(hw[1]):
            # position (r, c) of the rolled grid holds token ((r + dy) mod H, (c + dx) mod W)
            rr, cc = (r - shift[0]) % hw[0], (c - shift[1]) % hw[1]  # where token (r, c) sits
            top, left = (rr // wh) * wh, (cc // ww) * ww
            rows = [(top + i) for i in range(0, wh, kv) if top + i < hw[0]]
            cols = [(left + j) for j in range(0, ww, kv) if left + j < hw[1]]
            keys = torch.stack([grid[(i + shift[0]) % hw[0], (j + shift[1]) % hw[1]] for i in rows for j in cols])
            want = plain_attention(grid[r, c].view(1, 1, 4), keys[None], keys[None], None)
            torch.testing.assert_close(out[0, r * hw[1] + c], want[0, 0], rtol=1e-5, atol=1e-6)
    assert record.window_runs == [rules.WindowCall(3, hw, shift)]
    assert record.kv_runs == ([rules.KVCall(3, 0, (wh, ww), (-(-wh // kv), -(-ww // kv)), kv)] if kv > 1 else [])


def test_arrange_then_merge_is_the_identity_and_whole_map_kv():
    x = torch.randn(2, 7 * 9, 3)
    arranged = rules.arrange_self_attention(x, (7, 9), rules.LayerRule(True, 2, 0), [(1, 1), (2, 3)])
    assert torch.equal(rules.merge_self_attention(arranged.tokens, arranged), x)
    whole = rules.arrange_self_attention(x, (7, 9), rules.LayerRule(False, 2, 1))
    assert whole.windows is None and whole.key_bias is None and whole.tokens is x
    assert torch.equal(whole.keys, x.view(2, 7, 9, 3)[:, ::2, ::2].reshape(2, 20, 3))


# ---------------------------------------------------------------- residual sizes
def test_residual_sizes_follow_the_plan_and_a_pooled_block_takes_its_residual_before_pooling():
    arch = sd_architecture()
    plan = plan_call(arch, (64, 64), HiDiffusionConfig(preset="sd-2048", at_native="apply"), Progress(0, 10))
    assert plan.pool
    sizes = rules.residual_sizes(plan, arch)
    assert sizes.down == plan.skip_sizes and sizes.mid == plan.mid_size and sizes.adapter == plan.adapter_sizes
    pooled = rules.input_block_stages(arch).index((arch.pool_stage, "layer"))
    assert sizes.block_outputs[pooled] == plan.skip_sizes[pooled - 1] != plan.skip_sizes[pooled]
    assert [s for i, s in enumerate(sizes.block_outputs) if i != pooled] == [
        s for i, s in enumerate(plan.skip_sizes) if i != pooled
    ]
    assert rules.input_block_stages(arch)[:4] == ((-1, "conv_in"), (0, "layer"), (0, "layer"), (0, "downsample"))


# ---------------------------------------------------------------- the schedule
FALLING = [901.0, 801.0, 701.0, 601.0, 501.0]


@pytest.mark.parametrize(
    "value,step",
    [(950.0, 0), (901.0, 0), (850.0, 0), (801.0, 1), (650.0, 2), (550.0, 3), (501.0, 4), (10.0, 4)],
)
def test_off_schedule_rule(value, step):
    """Between the levels of steps i and i + 1: step i; above the first: 0; below the last: the last."""
    assert rules.off_schedule_progress(value, FALLING, 5) == Progress(step, 5)
    assert rules.off_schedule_progress(value, FALLING[::-1], 5) == Progress(step, 5)  # an ascending list too


def test_ascending_schedules_are_mirrored():
    rising = FALLING[::-1]
    assert rules.ascending(rising) and not rules.ascending(FALLING) and not rules.ascending([5.0])
    # the inversion's first call (t = 501) is sampling's last step
    assert rules.schedule_progress(501.0, rising) == Progress(4, 5)
    assert rules.schedule_progress(901.0, rising) == Progress(0, 5)
    assert rules.schedule_progress(801.0, FALLING) == Progress(1, 5)
    assert rules.schedule_progress(850.0, FALLING) is None
