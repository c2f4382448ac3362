"""The InvokeAI host's tests (tests/invokeai) run inside a real InvokeAI's environment
(.invokeai, made by scripts/install_invokeai.sh), which this suite's Python does not have:
this test runs them there, so the one test command of the README covers that host too."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from helpers import ENVIRONMENTS, ROOT


@pytest.mark.invokeai
@pytest.mark.slow
def test_invokeai_host_suite_passes_in_a_real_invokeai():
    python = ENVIRONMENTS["invokeai"][0]
    assert os.path.exists(python), ENVIRONMENTS["invokeai"][1]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "INVOKEAI_"))}
    env.setdefault("OMP_NUM_THREADS", "1")
    proc = subprocess.run(
        [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", os.path.join(ROOT, "tests", "invokeai")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=1200,
    )
    sys.stdout.write(proc.stdout[-4000:])
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    assert proc.returncode == 0, f"tests/invokeai failed in {python}:\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"
    assert " passed" in summary and "no tests ran" not in summary, summary
    assert " skipped" not in summary, f"InvokeAI tests were skipped in {python}: {summary}"
