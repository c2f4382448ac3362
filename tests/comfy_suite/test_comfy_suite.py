"""The ComfyUI host's tests (tests/comfy) and the WebUI backend's (tests/webui, on the ldm-layout
U-Net of the ComfyUI CI installs) run inside a real ComfyUI's environment (.comfy,
made by tools/install_comfy.sh), which this suite's Python does not have: this test runs
them there, so the one test command of the README covers both hosts."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from helpers import ENVIRONMENTS, ROOT


@pytest.mark.comfy
@pytest.mark.slow
def test_comfyui_host_suite_passes_in_a_real_comfyui():
    python = ENVIRONMENTS["comfy"][0]
    assert os.path.exists(python), ENVIRONMENTS["comfy"][1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    proc = subprocess.run(
        [
            python,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            os.path.join(ROOT, "tests", "comfy"),
            os.path.join(ROOT, "tests", "webui"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=2400,
    )
    sys.stdout.write(proc.stdout[-4000:])
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    assert proc.returncode == 0, (
        f"tests/comfy or tests/webui failed in {python}:\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"
    )
    assert " passed" in summary and "no tests ran" not in summary, summary
