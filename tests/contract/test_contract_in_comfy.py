"""The contract's ComfyUI host runs inside a real ComfyUI's environment (.comfy, made by
tools/install_comfy.sh), which this suite's Python does not have: this test runs the
contract there (as tests/comfy_suite runs tests/comfy), so the README's one test command
checks every host. Inside .comfy the contract runs directly and this test has nothing to do."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from comfytest import HAVE_COMFY
from helpers import ENVIRONMENTS, ROOT


@pytest.mark.comfy
@pytest.mark.slow
@pytest.mark.skipif(HAVE_COMFY, reason="this Python is the ComfyUI environment: the contract runs here directly")
def test_comfyui_host_passes_the_contract_in_a_real_comfyui():
    python = ENVIRONMENTS["comfy"][0]
    assert os.path.exists(python), ENVIRONMENTS["comfy"][1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    contract = os.path.join(ROOT, "tests", "contract", "test_contract.py")
    proc = subprocess.run(
        [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", contract, "-k", "comfyui or webui"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=3600,
    )
    sys.stdout.write(proc.stdout[-4000:])
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    assert proc.returncode == 0, (
        f"the contract failed for ComfyUI in {python}:\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"
    )
    assert " passed" in summary and "skipped" not in summary, summary
