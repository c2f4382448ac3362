"""The contract for the InvokeAI host runs in InvokeAI's environment (.invokeai, made by
tools/install_invokeai.sh), which this suite's Python does not have: this test runs it there."""

import importlib.util
import os

import pytest
from helpers import ROOT, pytest_in

HAVE_INVOKEAI = importlib.util.find_spec("invokeai.invocation_api") is not None


@pytest.mark.invokeai
@pytest.mark.slow
@pytest.mark.skipif(HAVE_INVOKEAI, reason="this Python is InvokeAI's environment: the contract runs here directly")
def test_invokeai_host_passes_the_contract_in_a_real_invokeai():
    contract = os.path.join(ROOT, "tests", "contract", "test_contract.py")
    summary = pytest_in("invokeai", contract, "-k", "invokeai", "-rs", timeout=3600)
    assert " failed" not in summary, summary
