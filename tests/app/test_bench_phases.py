"""hidiff bench --per-phase: one U-Net call per distinct phase, composed over the schedule."""

from __future__ import annotations

import pytest
from helpers import reference_python

from hidiff.app.bench import run_bench
from hidiff.app.bench_report import format_table


@pytest.mark.slow
def test_per_phase_times_one_call_per_phase_and_composes_the_schedule():
    result = run_bench(
        family="sd15", tiny=True, height=640, width=640, steps=5, batch=1, warmup=0, per_phase=True, kv_downsample=2
    )
    assert result["per_phase"] is True
    modes = result["modes"]
    assert list(modes) == ["baseline", "hidiff", "hidiff-kv2"]
    # sd-1024 at 5 steps: the strided conv in steps 0-1, then the stock geometry
    assert modes["hidiff"]["rau_steps"] == 2 and modes["baseline"]["rau_steps"] == 0
    for r in modes.values():
        assert r["total_s"] > 0 and r["flop_speedup"] > 0
    assert "per phase" in format_table(result)


@pytest.mark.reference
@pytest.mark.slow
def test_per_phase_times_the_published_package_phase_by_phase():
    result = run_bench(
        family="sd15",
        tiny=True,
        height=640,
        width=640,
        steps=5,
        batch=1,
        warmup=1,
        per_phase=True,
        modes=("hidiff", "published"),
        reference_python=reference_python(),
    )
    published, ours = result["modes"]["published"], result["modes"]["hidiff"]
    # one call per phase, each at its own step: had the package's own call counters not been
    # set to the step, the plain phase's call would still run the strided conv (rau_steps 5)
    assert result["published"]["unet_calls"] == [2]
    assert published["rau_steps"] == ours["rau_steps"] == 2
    assert published["flops"] == ours["flops"]
    assert published["total_s"] > 0


def test_per_phase_warm_up_calls_every_phase(monkeypatch):
    # a one-step warm-up would leave the later phases cold, and a cold phase's time is
    # multiplied by its number of steps in the composition
    import hidiff.app.bench as bench

    calls: list = []
    real_phase_run = bench._phase_run

    def recording(mode, unet, scheduler, inputs):
        run = real_phase_run(mode, unet, scheduler, inputs)

        def wrapped(steps):
            result = run(steps)
            calls.append((mode, steps, result["unet_calls"]))
            return result

        return wrapped

    monkeypatch.setattr(bench, "_phase_run", recording)
    run_bench(
        family="sd15", tiny=True, height=640, width=640, steps=5, batch=1, warmup=1, per_phase=True, modes=("hidiff",)
    )
    warm = [c for c in calls if c[0] == "hidiff"][0]
    assert warm[1] == 5 and warm[2] == 2  # both phases of the sd-1024 schedule at 5 steps
