"""Tests of the WebUI extension.

Without a WebUI (CI): the options / infotext round trip (any Python), and the WebUI
backend on the ldm-layout U-Net of the ComfyUI that CI installs (reForge runs ComfyUI's
own ``openaimodel``; AUTOMATIC1111 and Forge the same layout), run in that venv:

    .comfy/bin/python -m pytest tests/webui

With a WebUI installation (by hand): ``test_e2e.py`` (see its docstring).
"""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
COMFY_TESTS = os.path.join(os.path.dirname(HERE), "comfy")
if COMFY_TESTS not in sys.path:
    sys.path.insert(0, COMFY_TESTS)

from comfytest import HAVE_COMFY, start_comfy  # noqa: E402

if HAVE_COMFY:
    start_comfy()
