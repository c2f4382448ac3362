"""Tests of the InvokeAI host, run in InvokeAI's environment made by tools/install_invokeai.sh:

    .invokeai/bin/python -m pytest tests/invokeai

(the project's test command runs them so, from tests/invokeai_suite). In any Python without
InvokeAI the whole folder is skipped at collection.
"""

import importlib.util
import sys
from pathlib import Path

import pytest

# Not find_spec("invokeai"): with tests/ on sys.path, this folder is a namespace package of that name.
HAVE_INVOKEAI = (Path(sys.prefix) / "bin" / "invokeai-web").exists() and importlib.util.find_spec(
    "invokeai.invocation_api"
) is not None

if not HAVE_INVOKEAI:
    collect_ignore_glob = ["test_*.py"]
else:
    sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture(scope="session", autouse=True)
def _torch_sdp_attention():
    """In-process runs use the attention the tests' server is started with (INVOKEAI_ATTENTION_TYPE):
    on the CPU InvokeAI's "auto" switches the U-Net to sliced attention."""
    from invokeai.app.services.config.config_default import get_config

    get_config().attention_type = "torch-sdp"


@pytest.fixture(autouse=True)
def _one_thread():
    import torch

    torch.set_num_threads(1)
    yield


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from invoketest import make_tiny_sd15

    return make_tiny_sd15(tmp_path_factory.mktemp("models") / "tiny-sd15")


@pytest.fixture(scope="session")
def server(tmp_path_factory, tiny_model_dir):
    """A real InvokeAI on 127.0.0.1 with the node pack and the tiny model installed; stopped by its pid."""
    from invoketest import InvokeAIServer

    server = InvokeAIServer(tmp_path_factory.mktemp("invokeai-root"))
    try:
        server.wait_up()
        server.model = server.install_model(tiny_model_dir)
        yield server
    finally:
        server.stop()
