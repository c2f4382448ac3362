"""A property-based fuzzer for the host-neutral core (issue 27), with Hypothesis.

It draws networks of every family with random layers per stage and widths, latent sizes
from one cell (8 px, the smallest a VAE allows) to 1024 cells (8192 px) on either side at
any aspect ratio (odd sides included), runs of 1 to 200 steps, every preset and option
combination, batch sizes and seeds, and checks:

* planning never crashes, and every size the plan gives fits the network: an independent
  walk through the U-Net meets every skip connection and residual with a feature map of
  its own size;
* window partition followed by merge is the identity at every shift and padding, and the
  padding is exactly what the key bias masks;
* key/value downsampling keeps what the plan says (the map sizes, the cells, the mask);
* the plan is a pure function of its inputs;
* an invalid config is refused at construction with a message naming the field.

Runs in the normal test command, derandomized (a fixed seed) with a bounded example count.
A longer run is one environment variable away: ``HIDIFF_FUZZ_EXAMPLES=2000 pytest
tests/core/test_fuzz.py`` (the count per property; ``HIDIFF_FUZZ_RANDOM=1`` draws new examples
instead of the fixed ones). Every failure it ever found is a plain regression test in
``tests/core/test_fuzz_regressions.py``.
"""

from __future__ import annotations

import dataclasses
import math
import os

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from hidiff.core import ops, rules
from hidiff.core.architecture import REGISTRY, Architecture, NetworkDescription, Stage, recognise
from hidiff.core.config import HiDiffusionConfig, option_specs
from hidiff.core.planner import Plan, Progress, Task, plan_call
from hidiff.core.presets import PRESETS
from hidiff.core.progress import close

EXAMPLES = int(os.environ.get("HIDIFF_FUZZ_EXAMPLES", "60"))
FUZZ = settings(
    max_examples=EXAMPLES,
    derandomize=not os.environ.get("HIDIFF_FUZZ_RANDOM"),  # CI: the same examples on every run
    deadline=None,
    database=None,  # nothing written into the tree; failures are kept as regression tests instead
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    print_blob=True,
)

MAX_LATENT = 1024  # 8192 px at 8 px per cell
SIDES = st.integers(1, MAX_LATENT)


# --------------------------------------------------------------------------- strategies
@st.composite
def networks(draw: st.DrawFn) -> NetworkDescription:
    """A network of one of the families, with random layers per stage, widths and native size."""
    record = draw(st.sampled_from(REGISTRY))
    n = record.num_stages
    layers = draw(st.lists(st.integers(1, 4), min_size=n, max_size=n))
    width = draw(st.sampled_from([32, 320, 384]))
    stages = tuple(Stage(width * (k + 1), layers[k], k in record.attention_stages, k < n - 1) for k in range(n))
    native = draw(st.none() | st.tuples(st.integers(4, 160), st.integers(4, 160)))
    return NetworkDescription(
        stages=stages,
        up_layers=tuple(layers[n - 1 - u] + 1 for u in range(n)),
        up_cross_attention=tuple((n - 1 - u) in record.attention_stages for u in range(n)),
        in_channels=draw(st.sampled_from(record.in_channels)),
        cross_attention_dim=draw(st.sampled_from([32, 768, 1024, 1280, 2048])),
        native=native,
        name="fuzzed",
        embedding=draw(st.sampled_from(record.embeddings + (None,))),
    )


def _valid_value(spec, draw):
    if spec.optional and draw(st.booleans()):
        return None
    if spec.kind == "bool":
        return draw(st.booleans())
    if spec.choices is not None:
        return draw(st.sampled_from(spec.choices))
    if spec.kind == "int":
        return draw(st.integers(int(spec.minimum or 0), int(spec.maximum if spec.maximum is not None else 2**64 - 1)))
    low = spec.minimum if spec.minimum is not None else -1e6
    high = spec.maximum if spec.maximum is not None else 1e6
    return draw(st.floats(low, high, allow_nan=False))


@st.composite
def configs(draw: st.DrawFn) -> HiDiffusionConfig:
    """A valid config: every option drawn from its own spec (every preset and combination)."""
    values = {spec.name: _valid_value(spec, draw) for spec in option_specs()}
    if values["kv_downsample"] == 1:
        values["kv_levels"] = 1
    if values["t1_ratio"] is not None and values["t2_ratio"] is not None and values["t2_ratio"] > values["t1_ratio"]:
        values["t1_ratio"], values["t2_ratio"] = values["t2_ratio"], values["t1_ratio"]
    if (values["t1_ratio"] is None) != (values["t2_ratio"] is None):
        # one override alone must still keep T2 <= T1 for the presets it can meet
        try:
            return HiDiffusionConfig(**values)
        except ValueError:
            assume(False)
    return HiDiffusionConfig(**values)


tasks = st.builds(Task, st.booleans(), st.booleans(), st.booleans())


@st.composite
def calls(draw: st.DrawFn):
    """(architecture, latent size, config, progress, task) of one U-Net call."""
    arch = recognise(draw(networks()))
    latent = (draw(SIDES), draw(SIDES))
    total = draw(st.integers(1, 200))
    progress = Progress(draw(st.integers(0, total - 1)), total)
    config = draw(configs())
    try:
        config.check_ratios(arch.kind)  # what apply_hidiffusion checks against the model's presets
    except ValueError:
        assume(False)
    return arch, latent, config, progress, draw(tasks)


# --------------------------------------------------------------------------- the network walk
def walk(arch: Architecture, plan: Plan) -> None:
    """Run the plan's sizes through the U-Net as diffusers and ComfyUI run it, independently of
    the planner: every skip connection must meet a feature map of its size."""
    network = arch.network
    assert network is not None
    h = plan.latent
    skips = [h]
    pooled_from = None
    downsample_inputs = []
    for k, stage in enumerate(network.stages):
        for j in range(stage.layers):
            if plan.pool and k == arch.pool_stage and j == 0:
                pooled_from = h
                h = (math.ceil(h[0] / 2), math.ceil(h[1] / 2))  # avg-pool 2x2, ceil
            skips.append(h)
        if stage.downsample:
            downsample_inputs.append(h)
            strided = plan.conv and k == arch.conv_stage
            stride, padding, dilation = (4, 2, 2) if strided else (2, 1, 1)
            h = tuple((s + 2 * padding - dilation * 2 - 1) // stride + 1 for s in h)  # the 3x3 conv's output
            skips.append(h)
    assert all(s[0] >= 1 and s[1] >= 1 for s in skips), skips
    assert tuple(skips) == plan.skip_sizes and h == plan.mid_size
    assert tuple(downsample_inputs) == plan.downsample_inputs
    # the up path: each up stage takes its stage's skips, deepest first
    n = len(network.stages)
    multiple = 2 ** sum(s.downsample for s in network.stages)
    for u in range(n):
        k = n - 1 - u
        if u > 0:
            target = skips[-1]
            if plan.resizes:
                # hidiff gives each upsampler its skip's size (the input of the mirrored downsampler)
                assert target == plan.downsample_inputs[k], (target, plan.downsample_inputs)
            elif plan.latent[0] % multiple == 0 and plan.latent[1] % multiple == 0:
                # stock: diffusers doubles unless the latent is off the grid (then it forwards the size)
                assert target == (2 * h[0], 2 * h[1]), (target, h)
            h = target
        for j in range(network.up_layers[u]):
            skip = skips.pop()
            assert skip == h, f"up stage {u} layer {j} meets a {skip} skip with a {h} map"
            if plan.pool and k == arch.pool_stage and j == arch.unpool_layer:
                h = pooled_from  # grown back to the size it had before pooling
    assert not skips, f"skips left over: {skips}"


# --------------------------------------------------------------------------- properties
@FUZZ
@given(calls())
def test_planning_never_crashes_and_every_size_fits_the_network(call):
    arch, latent, config, progress, task = call
    plan = plan_call(arch, latent, config, progress, task)
    assert plan.latent == latent and 0 <= plan.step < plan.total == progress.total
    assert plan.preset is None or plan.preset in PRESETS
    if plan.preset is None:
        assert not (plan.conv or plan.pool or plan.windows) and plan.kv == 1
    if config.at_native == "skip" and latent[0] <= arch.native[0] and latent[1] <= arch.native[1]:
        assert plan.preset is None
    if not config.raunet:
        assert not plan.resizes
    walk(arch, plan)
    # the residuals every host resizes ControlNet / T2I-Adapter outputs to
    sizes = rules.residual_sizes(plan, arch)
    blocks = rules.input_block_stages(arch)
    assert len(sizes.down) == len(blocks) == len(plan.skip_sizes)
    assert len(sizes.adapter) == len(arch.network.stages) + 1 and sizes.mid == plan.mid_size
    # key/value downsampling acts where the plan says, on stages with transformer blocks
    if plan.kv > 1:
        assert plan.kv_stages[0] == arch.window_stage and len(plan.kv_stages) == config.kv_levels
        assert all(arch.network.stages[k].cross_attention for k in plan.kv_stages)


@FUZZ
@given(calls(), st.data())
def test_the_plan_is_a_pure_function_of_its_inputs(call, data):
    arch, latent, config, progress, task = call
    first = plan_call(arch, latent, config, progress, task)
    # other calls in between (another size, step, config) leave nothing behind
    other = data.draw(calls())
    plan_call(*other)
    same = plan_call(
        dataclasses.replace(arch),
        (int(latent[0]), int(latent[1])),
        dataclasses.replace(config),
        Progress(progress.index, progress.total, not progress.new_run),
        dataclasses.replace(task),
    )
    assert same == first and hash(same) == hash(first)


@st.composite
def token_maps(draw: st.DrawFn):
    h, w = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    b, c = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    x = torch.randn(b, h * w, c, generator=torch.Generator().manual_seed(draw(st.integers(0, 2**31))))
    pair = st.tuples(st.integers(-2 * h, 2 * h), st.integers(-2 * w, 2 * w))
    shift = draw(pair | st.lists(pair, min_size=b, max_size=b))
    return x, h, w, shift


@FUZZ
@given(token_maps())
def test_window_partition_then_merge_is_the_identity_at_every_shift_and_padding(case):
    x, h, w, shift = case
    windows = ops.window_partition(x, h, w, shift)
    wh, ww = ops.window_sides(h, w)
    assert windows.tokens.shape == (4 * x.shape[0], wh * ww, x.shape[2])
    assert torch.equal(ops.window_merge(windows.tokens, windows), x)
    # the key bias masks exactly the padding: as many masked keys per image as padded cells
    padded = 4 * wh * ww - h * w
    if padded == 0:
        assert windows.key_bias is None
    else:
        masked = (windows.key_bias != 0).view(x.shape[0], -1).sum(dim=1)
        assert masked.tolist() == [padded] * x.shape[0]
    # every real token sits in exactly one window position (a permutation of the map)
    ids = torch.arange(h * w, dtype=torch.float64).view(1, h * w, 1).expand(x.shape[0], -1, 1).contiguous()
    placed = ops.window_partition(ids, h, w, shift)
    real = placed.tokens.view(x.shape[0], -1)[
        (placed.key_bias == 0).view(x.shape[0], -1) if placed.key_bias is not None else slice(None)
    ]
    assert sorted(real.view(-1).long().tolist()) == sorted(list(range(h * w)) * x.shape[0])
    # the rules' arrange / merge around any attention is the identity for an identity attention
    rule = rules.LayerRule(windowed=True, kv=1, stage=0)
    arranged = rules.arrange_self_attention(x, (h, w), rule, shift)
    assert torch.equal(rules.merge_self_attention(arranged.tokens, arranged), x)


@FUZZ
@given(token_maps(), st.sampled_from([2, 4]), st.booleans())
def test_key_value_downsampling_keeps_what_the_plan_says(case, factor, windowed):
    x, h, w, shift = case
    record = rules.CallRecord()
    rule = rules.LayerRule(windowed=windowed, kv=factor, stage=0)
    arranged = rules.arrange_self_attention(x, (h, w), rule, shift, record=record, layer=3)
    side_h, side_w = ops.window_sides(h, w) if windowed else (h, w)
    rows = 4 * x.shape[0] if windowed else x.shape[0]
    if min(side_h, side_w) < 2:
        assert arranged.keys is None and not record.kv_runs  # nothing to shrink on a one-cell side
        return
    kh, kw = ops.kv_side(side_h, factor), ops.kv_side(side_w, factor)
    assert arranged.keys.shape == (rows, kh * kw, x.shape[2])
    assert record.kv_maps == [((side_h, side_w), (kh, kw))] and record.kv_runs[0].factor == factor
    # nearest: each key is the top-left token of its cell of the (padded) map
    grid = arranged.tokens.view(rows, side_h, side_w, -1)
    assert torch.equal(arranged.keys.view(rows, kh, kw, -1), grid[:, ::factor, ::factor])
    if arranged.key_bias is not None:
        # a key is masked exactly where its cell's top-left token is padding
        assert windowed and arranged.windows.key_bias is not None
        real = (arranged.windows.key_bias[:, 0] == 0).view(rows, side_h, side_w)[:, ::factor, ::factor]
        assert torch.equal(arranged.key_bias[:, 0] == 0, real.reshape(rows, -1))
    out = rules.merge_self_attention(arranged.tokens, arranged)
    assert torch.equal(out, x)  # queries keep full resolution: the output keeps the map's size


@FUZZ
@given(st.integers(0, 2**64 - 1), st.integers(0, 199), st.integers(0, 63), SIDES, SIDES)
def test_window_shifts_stay_inside_a_window_and_are_pure(seed, step, layer, h, w):
    shift = ops.shift_for(seed, step, layer, h, w)
    wh, ww = ops.window_sides(h, w)
    assert 0 <= shift[0] < max(wh, 1) and 0 <= shift[1] < max(ww, 1)
    assert shift == ops.shift_for(seed, step, layer, h, w)
    config = HiDiffusionConfig(window_seed=seed)
    assert rules.window_shifts(config, rules.row_seeds(config, 3, [1, 2]), step, layer, (h, w)) == [shift] * 3


@FUZZ
@given(st.lists(st.floats(0.0, 1000.0, allow_nan=False), min_size=1, max_size=200), st.floats(0.0, 1000.0))
def test_off_schedule_calls_land_on_a_real_step(levels, value):
    levels = sorted(set(levels), reverse=True)
    # levels within the schedule's matching tolerance (relative 1e-6) are one level: real
    # schedules' steps lie far apart (the fuzzer's first long run drew 1e-95 and 2e-313)
    assume(not any(close(a, b) for a, b in zip(levels, levels[1:])))
    progress = rules.off_schedule_progress(value, levels, len(levels))
    assert 0 <= progress.index < progress.total == len(levels)
    found = rules.schedule_progress(levels[progress.index], levels)
    assert found is not None and found.index == progress.index


# --------------------------------------------------------------------------- invalid configs
def _invalid_values(spec):
    """Values ``spec`` must refuse, each with the kind of error."""
    wrong_type = [object(), "1"] if spec.kind != "choice" else [3, object()]
    if spec.kind == "bool":
        wrong_type += [1, 0.0]
    if spec.kind == "int":
        wrong_type += [1.5, True]
    if spec.kind == "float":
        wrong_type += [True]
    bad = [(v, (TypeError, ValueError)) for v in wrong_type]
    if not spec.optional:
        bad.append((None, (TypeError, ValueError)))
    if spec.kind == "choice":
        bad.append(("not-a-" + spec.name, (ValueError,)))
    if spec.kind in ("int", "float"):
        if spec.minimum is not None:
            bad.append((type(spec.default or 0)(spec.minimum) - 1, (ValueError,)))
        if spec.maximum is not None:
            bad.append((spec.maximum + 1, (ValueError,)))
        if spec.kind == "float":
            bad.append((math.nan, (ValueError,)))
    return bad


INVALID = [(spec.name, value, errors) for spec in option_specs() for value, errors in _invalid_values(spec)]


@FUZZ
@given(st.sampled_from(INVALID), configs())
def test_an_invalid_config_is_refused_at_construction_naming_the_field(case, base):
    name, value, errors = case
    values = {f.name: getattr(base, f.name) for f in dataclasses.fields(base)}
    values[name] = value
    with pytest.raises(errors) as info:
        HiDiffusionConfig(**values)
    assert name in str(info.value), (name, str(info.value))


@FUZZ
@given(configs(), st.sampled_from(sorted(PRESETS)), st.floats(0.0, 1.0), st.floats(0.0, 1.0))
def test_crossed_ratios_and_kv_levels_without_kv_are_refused_naming_the_fields(base, preset, a, b):
    assume(a != b)
    low, high = sorted((a, b))
    with pytest.raises(ValueError, match="t2_ratio"):
        dataclasses.replace(base, preset=preset, t1_ratio=low, t2_ratio=high)
    with pytest.raises(ValueError, match="kv_levels"):
        dataclasses.replace(base, kv_downsample=1, kv_levels=2)
