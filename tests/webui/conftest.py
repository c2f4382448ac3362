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

from comfytest import COMFY_ROOT, HAVE_COMFY  # noqa: E402

if HAVE_COMFY:
    if COMFY_ROOT not in sys.path:
        sys.path.insert(0, COMFY_ROOT)
    _argv = sys.argv
    sys.argv = [_argv[0], "--cpu", "--use-pytorch-cross-attention"]
    try:
        import comfy.options

        comfy.options.enable_args_parsing()
        import comfy.cli_args  # noqa: F401
        import comfy.model_management  # noqa: F401
    finally:
        sys.argv = _argv
    import torch

    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
