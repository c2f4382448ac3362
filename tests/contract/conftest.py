"""The contract runs every host this Python can run. The ComfyUI host needs a real ComfyUI:
under the .comfy Python, ComfyUI is set up here exactly as for tests/comfy (its conftest is
loaded, not copied); elsewhere that host is skipped, and test_contract_in_comfy.py runs the
contract in .comfy."""

import importlib.util
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
COMFY_TESTS = os.path.join(os.path.dirname(HERE), "comfy")
if COMFY_TESTS not in sys.path:
    sys.path.insert(0, COMFY_TESTS)

from comfytest import HAVE_COMFY  # noqa: E402

if HAVE_COMFY:
    _spec = importlib.util.spec_from_file_location("hidiff_comfy_tests_setup", os.path.join(COMFY_TESTS, "conftest.py"))
    _setup = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_setup)  # puts ComfyUI on sys.path and parses its CPU arguments
