"""The host contract: what every host of hidiff must do, checked on the same tiny weights.

Each test runs once per host of :data:`hosts.HOSTS` (and per layout, SD 1.x-like and
SDXL-like): the host's own sampling loop with HiDiffusion on, read back through the core's
call record, against what the core plans (:func:`hidiff.core.planner.plan_call`) and its
per-call rules (:mod:`hidiff.core.rules`). A new host is done when it passes this module.
"""

from __future__ import annotations

import pytest
import torch
import weights
from hosts import HOSTS

from hidiff.core import ops, rules
from hidiff.core.config import HiDiffusionConfig
from hidiff.core.planner import Progress, plan_call
from hidiff.diffusers.model import detect_layout

LAYOUTS = ("sd15", "sdxl")
#: 2x, 4x and an odd size (odd sides at every level, uneven windows); native is 32.
SIZES = {"2x": (64, 64), "4x": (128, 128), "odd": (37, 53)}
#: Presets under which both RAU-Net parts act at the first step (strided conv and pooling).
BOTH_PARTS = {"sd15": "sd-2048", "sdxl": "sdxl-4096"}

_MODELS: dict = {}


@pytest.fixture(params=HOSTS, ids=[h.name for h in HOSTS])
def host(request):
    reason = request.param.unavailable()
    if reason:
        pytest.skip(reason)
    return request.param


def model_of(host, layout):
    """The host's model of the layout (built once per host and layout; runs leave it as it was)."""
    key = (host.name, layout)
    if key not in _MODELS:
        _MODELS[key] = host.load(layout)
    return _MODELS[key]


def architecture(layout):
    """The core's architecture of the contract's weights (read once, host-independently)."""
    return detect_layout(weights.diffusers_unet(layout))


def planned(layout, hw, steps, options):
    arch, config = architecture(layout), HiDiffusionConfig(**options)
    return [plan_call(arch, hw, config, Progress(i, steps)) for i in range(steps)]


def run(host, layout, hw, steps, options, batch=1, seed=11):
    return host.sample(model_of(host, layout), layout, weights.noise(batch, hw, seed), steps, options)


def row_shift(shift, row):
    """The shift of batch row ``row`` from a recorded shift (one for all rows, or one per row)."""
    return shift[row] if isinstance(shift[0], tuple) else shift


def stage_input(plan, arch, stage):
    """The map a down stage's first layer runs on under ``plan``."""
    return plan.skip_sizes[rules.input_block_stages(arch).index((stage, "layer")) - 1]


def windowed_layers(arch, stage):
    """Self-attentions of a down stage and its mirror in the up path."""
    network = arch.network
    return network.stages[stage].layers + network.up_layers[arch.up_index(stage)]


# ---------------------------------------------------------------- feature sizes
@pytest.mark.slow
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_planned_feature_sizes(host, layout, size):
    hw = SIZES[size]
    options = dict(preset=BOTH_PARTS[layout], at_native="apply", window_seed=3)
    records = run(host, layout, hw, 4, options)
    first, plan = records[0], planned(layout, hw, 4, options)[0]
    arch = architecture(layout)
    assert first.plan == plan and plan.conv and plan.pool
    # every downsampler met the planned input
    assert first.skip_sizes == dict(enumerate(plan.downsample_inputs))
    conv_in = plan.downsample_inputs[arch.conv_stage]
    assert first.conv and first.conv_out == (ops.rau_conv_side(conv_in[0]), ops.rau_conv_side(conv_in[1]))
    pooled_block = rules.input_block_stages(arch).index((arch.pool_stage, "layer"))
    assert first.pool and first.pooled == (plan.skip_sizes[pooled_block - 1], plan.skip_sizes[pooled_block])
    assert first.unpooled == (first.pooled_to, first.pooled_from)  # grown back to its skip's size
    assert first.window_maps[0] == stage_input(plan, arch, arch.window_stage)


# ---------------------------------------------------------------- when modules act
@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS)
def test_modules_act_at_the_planned_steps(host, layout):
    steps, options = 6, dict(window_seed=3)
    records = run(host, layout, SIZES["2x"], steps, options)
    plans = planned(layout, SIZES["2x"], steps, options)
    got = [(r.step, r.total, r.conv, r.pool, r.windows) for r in records]
    assert got == [(p.step, p.total, p.conv, p.pool, p.windows) for p in plans]
    assert {g[2] or g[3] for g in got} == {True, False}  # RAU-Net on in the first steps only


# ---------------------------------------------------------------- window and kv counts
KV_CASES = [(1, 1, True), (2, 1, True), (2, 1, False), (2, 2, True)]


@pytest.mark.parametrize(
    "kv,levels,windows", KV_CASES, ids=[f"kv{k}-l{lv}-{'win' if w else 'whole'}" for k, lv, w in KV_CASES]
)
@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS)
def test_window_and_kv_counts(host, layout, kv, levels, windows):
    arch = architecture(layout)
    options = dict(kv_downsample=kv, kv_levels=levels, window_attn=windows, raunet=False, window_seed=3)
    records = run(host, layout, SIZES["odd"], 2, options)
    top = windowed_layers(arch, arch.window_stage)
    plan = planned(layout, SIZES["odd"], 2, options)[0]
    for r in records:
        assert r.window_calls == (top if windows else 0)
        want = {stage: windowed_layers(arch, stage) for stage in plan.kv_stages}
        assert {stage: r.kv_at.count(stage) for stage in set(r.kv_at)} == want
        for run_ in r.kv_runs:
            whole = stage_input(plan, arch, run_.stage)
            side = ops.window_sides(*whole) if windows and run_.stage == arch.window_stage else whole
            assert run_.map == side and run_.kv_map == (ops.kv_side(side[0], kv), ops.kv_side(side[1], kv))


# ---------------------------------------------------------------- per-image seeds
@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS)
def test_window_seeds_do_not_depend_on_batch_position(host, layout):
    model, hw = model_of(host, layout), SIZES["2x"]
    a, b = weights.noise(1, hw, 11), weights.noise(1, hw, 12)
    options = dict(raunet=False)

    def shifts(noise, row):
        records = host.sample(model, layout, noise, 2, options)
        return [row_shift(w.shift, row) for r in records for w in r.window_runs]

    alone = shifts(a, 0)
    assert shifts(torch.cat([a, b]), 0) == alone
    assert shifts(torch.cat([b, a]), 1) == alone
    assert shifts(torch.cat([b, a]), 0) != alone  # another image, other shifts


# ---------------------------------------------------------------- off the schedule
@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS)
def test_calls_off_the_sampled_schedule(host, layout):
    """The one rule (docs/how-it-works.md): a call at a noise level not in the run's schedule is
    planned at the step whose interval of levels holds it (above the first level: step 0), with
    the run's total; one above the whole schedule is reported by a warning."""
    model, noise, steps = model_of(host, layout), weights.noise(1, SIZES["2x"], 11), 5
    record, messages = host.call_at(model, layout, noise, steps, {}, -0.5)
    assert (record.step, record.total) == (0, steps)
    assert any("rule for calls off the sampled schedule" in m for m in messages), messages
    record, _ = host.call_at(model, layout, noise, steps, {}, 2.5)
    assert (record.step, record.total) == (2, steps)


# ---------------------------------------------------------------- exact removal
@pytest.mark.slow
@pytest.mark.parametrize("interrupt", [False, True], ids=["run", "interrupted"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_removal_leaves_the_model_exactly_as_it_was(host, layout, interrupt):
    model, probe = model_of(host, layout), weights.noise(1, (40, 40), 5)
    state, out = host.stock(model, layout, probe)
    options = dict(window_seed=3)
    if interrupt:
        with pytest.raises(KeyboardInterrupt):
            host.sample(model, layout, weights.noise(1, SIZES["odd"], 11), 4, options, raise_at=1)
    else:
        assert run(host, layout, SIZES["odd"], 2, options)  # it acted
    after_state, after_out = host.stock(model, layout, probe)
    assert list(after_state) == list(state)
    assert all(torch.equal(after_state[k], state[k]) for k in state)
    assert torch.equal(after_out, out)


# ---------------------------------------------------------------- the same call record
def fingerprint(record):
    """Everything a call record says (the plan included)."""
    return (
        record.plan,
        record.batch,
        record.conv_out,
        record.pooled,
        record.unpooled,
        record.skip_sizes,
        record.windows,
        record.window_runs,
        record.unwindowed,
        record.kv_runs,
        record.residual_sizes,
    )


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS)
def test_same_call_record_as_every_other_host(host, layout):
    """With the same weights, inputs and options, every host's records are identical (the
    diffusers host is the reference: every other host is compared with it)."""
    reference = HOSTS[0]
    options = dict(window_seed=3, kv_downsample=2, kv_levels=2)
    mine = [fingerprint(r) for r in run(host, layout, SIZES["odd"], 4, options, batch=2)]
    theirs = [fingerprint(r) for r in run(reference, layout, SIZES["odd"], 4, options, batch=2)]
    assert mine == theirs
    assert any(f[2] or f[3] for f in mine) and all(f[7] and f[9] for f in mine)  # RAU-Net, windows and kv ran
