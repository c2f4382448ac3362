"""Tests of the ComfyUI nodes, run in the ComfyUI venv made by scripts/install_comfy.sh:

    .comfy/bin/python -m pytest tests/comfy

The ComfyUI root is ``$HIDIFF_COMFYUI`` or ``<venv>/ComfyUI``; without one (any other
Python) the whole folder is skipped at collection.
"""

import os
import sys

import pytest

COMFY_ROOT = os.path.abspath(os.environ.get("HIDIFF_COMFYUI") or os.path.join(sys.prefix, "ComfyUI"))
HAVE_COMFY = os.path.isfile(os.path.join(COMFY_ROOT, "comfy", "model_patcher.py"))

if not HAVE_COMFY:
    collect_ignore_glob = ["test_*.py"]
else:
    if COMFY_ROOT not in sys.path:
        sys.path.insert(0, COMFY_ROOT)
    # ComfyUI reads its command line when comfy.cli_args is first imported: give it ours
    # (CPU; PyTorch's SDPA, the attention diffusers uses, ~10x faster than the CPU default).
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


@pytest.fixture(autouse=True)
def _one_thread():
    import torch

    torch.set_num_threads(1)
    yield
