"""The contract's ComfyUI host runs inside a real ComfyUI's environment (.comfy, made by
tools/install_comfy.sh), which this suite's Python does not have: this test runs the
contract there (as tests/comfy_suite runs tests/comfy), so the README's one test command
checks every host. Inside .comfy the contract runs directly and this test has nothing to do."""

from __future__ import annotations

import os

import pytest
from comfytest import HAVE_COMFY
from helpers import ROOT, pytest_in


@pytest.mark.comfy
@pytest.mark.slow
@pytest.mark.skipif(HAVE_COMFY, reason="this Python is the ComfyUI environment: the contract runs here directly")
def test_comfyui_host_passes_the_contract_in_a_real_comfyui():
    contract = os.path.join(ROOT, "tests", "contract", "test_contract.py")
    summary = pytest_in("comfy", contract, "-k", "comfyui or webui", timeout=3600)
    assert "skipped" not in summary, summary
