"""tools/gpu_bench.sh in its reduced CPU form: tiny widths, one step, every case and row written."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from helpers import ROOT

CASES = "sd15:576,sdxl:1088"  # each above its tiny model's native size (512 and 1024 px)


@pytest.mark.slow
def test_gpu_bench_writes_every_case_and_row(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    env["PYTHON"] = sys.executable
    argv = ["bash", os.path.join(ROOT, "tools", "gpu_bench.sh"), "--out", str(tmp_path), "--tiny"]
    argv += ["--device", "cpu", "--dtype", "float32", "--steps", "1", "--warmup", "0", "--threads", "1"]
    argv += ["--cases", CASES, "--reference-python", ""]  # the published rows: absent, with the reason
    proc = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_bench.json").read_text())
    table = (tmp_path / "gpu_bench.md").read_text()
    assert [(c["family"], c["width"]) for c in report["cases"]] == [("sd15", 576), ("sdxl", 1088)]
    for case in report["cases"]:
        modes = case["result"]["modes"]
        assert list(modes) == ["baseline", "hidiff", "hidiff-kv2", "hidiff-kv2-l2"]
        assert all(m["total_s"] > 0 and m["flops"] > 0 and m["peak_memory_bytes"] > 0 for m in modes.values())
        assert modes["hidiff-kv2-l2"]["flops"] < modes["hidiff-kv2"]["flops"] < modes["hidiff"]["flops"]
        assert "no --reference-python" in case["published_absent"]
        label = f"| {case['family']} {case['width']}x{case['width']} |"
        rows = [line for line in table.splitlines() if line.startswith(label)]
        assert [row.split(" | ")[1] for row in rows] == ["baseline", "published", *list(modes)[1:]]
        assert "absent: no --reference-python" in rows[1]
        assert all(row.endswith(" GiB |") for row in rows if "absent" not in row)


def _script():
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    try:
        import gpu_bench
    finally:
        sys.path.pop(0)
    return gpu_bench


def test_the_issue_cases_and_modes_are_the_default():
    gpu_bench = _script()
    assert gpu_bench.CASES == (("sd15", 1024), ("sdxl", 2048), ("sdxl", 4096))
    assert gpu_bench.ROW_ORDER == ("baseline", "published", "hidiff", "hidiff-kv2", "hidiff-kv2-l2")
    args = gpu_bench.build_parser().parse_args([])
    assert (args.device, args.dtype, args.cases) == ("cuda", "float16", gpu_bench.CASES)


def test_a_case_past_the_budget_is_listed_as_skipped():
    gpu_bench = _script()
    args = gpu_bench.argparse.Namespace(
        reference_python=None, device="cpu", cases=(("sd15", 640),), budget_s=-1.0, steps=1, repeats=1, warmup=0,
        dtype="float32", tiny=True,
    )  # fmt: skip
    report = gpu_bench.run(args)
    assert "skipped" in report["cases"][0] and "result" not in report["cases"][0]
    assert "| sd15 640x640 | all | skipped: " in gpu_bench.markdown(report)
