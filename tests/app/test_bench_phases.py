"""hidiff bench --per-phase: one U-Net call per distinct phase, composed over the schedule."""

from __future__ import annotations

import pytest

from hidiff.app.bench import format_table, run_bench
from hidiff.app.cli import main


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


def test_per_phase_refuses_the_published_mode(capsys, tmp_path):
    python = tmp_path / "python"
    python.write_text("")
    assert (
        main(["bench", "--tiny", "--per-phase", "--modes", "hidiff,published", "--reference-python", str(python)]) == 2
    )
