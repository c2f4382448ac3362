"""The InvokeAI host's tests (tests/invokeai) run inside a real InvokeAI's environment
(.invokeai, made by tools/install_invokeai.sh), which this suite's Python does not have:
this test runs them there, so the one test command of the README covers that host too."""

import os

import pytest
from helpers import ROOT, pytest_in


@pytest.mark.invokeai
@pytest.mark.slow
def test_invokeai_host_suite_passes_in_a_real_invokeai():
    summary = pytest_in("invokeai", os.path.join(ROOT, "tests", "invokeai"), timeout=1200)
    assert " skipped" not in summary, f"InvokeAI tests were skipped: {summary}"
