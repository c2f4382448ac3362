"""The ComfyUI host's tests (tests/comfy) and the WebUI backend's (tests/webui, on the ldm-layout
U-Net of the ComfyUI CI installs) run inside a real ComfyUI's environment (.comfy,
made by tools/install_comfy.sh), which this suite's Python does not have: this test runs
them there, so the one test command of the README covers both hosts."""

from __future__ import annotations

import os

import pytest
from helpers import ROOT, pytest_in


@pytest.mark.comfy
@pytest.mark.slow
def test_comfyui_host_suite_passes_in_a_real_comfyui():
    pytest_in("comfy", os.path.join(ROOT, "tests", "comfy"), os.path.join(ROOT, "tests", "webui"), timeout=2400)
