"""Tests of the ComfyUI nodes, run in the ComfyUI venv made by tools/install_comfy.sh:

    .comfy/bin/python -m pytest tests/comfy

or against any ComfyUI installation with ``tools/test_comfy.sh`` (``HIDIFF_COMFY_ROOT``, its root,
and ``HIDIFF_COMFY_PYTHON``, its Python). The ComfyUI root is ``$HIDIFF_COMFY_ROOT`` (older name
``$HIDIFF_COMFYUI``) or ``<venv>/ComfyUI``; without one (any other Python) the whole folder is
skipped at collection.
"""

import os
import sys

import pytest
from comfytest import COMFY_ROOT, HAVE_COMFY, start_comfy

if not HAVE_COMFY:
    collect_ignore_glob = ["test_*.py"]
else:
    start_comfy()

    from comfy.model_patcher import ModelPatcher

    #: Whether this ComfyUI has the APIs the node patches through (0.3.x from December 2024 on).
    PATCH_API = all(
        hasattr(ModelPatcher, n) for n in ("add_wrapper_with_key", "set_model_forward_timestep_embed_patch")
    )


def pytest_collection_modifyitems(config, items):
    if not HAVE_COMFY or PATCH_API:
        return
    skip = pytest.mark.skip(
        reason="this ComfyUI lacks the wrapper / forward_timestep_embed_patch APIs: "
        "the node refuses it (test_versions.py checks the message)"
    )
    for item in items:
        if item.get_closest_marker("patch_api"):
            item.add_marker(skip)


def pytest_configure(config):
    config.addinivalue_line("markers", "patch_api: needs a ComfyUI with the node's patch APIs")


@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory):
    """A real ComfyUI server on 127.0.0.1 with this repository (and the test kit) in custom_nodes."""
    import json
    import signal
    import socket
    import subprocess
    import time
    import urllib.error
    import urllib.request
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    testkit = Path(__file__).resolve().parent / "testkit"

    def get(url):
        with urllib.request.urlopen(url, timeout=30) as r:
            return json.loads(r.read())

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = tmp_path_factory.mktemp("comfy-base")
    (base / "custom_nodes").mkdir()
    # Any folder name works: ComfyUI imports the pack under a name of its own.
    os.symlink(repo, base / "custom_nodes" / "HiDiffusion-for.ComfyUI")
    os.symlink(testkit, base / "custom_nodes" / "hidiff_testkit")
    (base / "user" / "default").mkdir(parents=True)
    (base / "user" / "default" / "comfy.settings.json").write_text('{"Comfy.TutorialCompleted": true}')
    log = open(base / "server.log", "w")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("PYTHONPATH", None)
    proc = subprocess.Popen(
        [
            sys.executable,
            os.path.join(COMFY_ROOT, "main.py"),
            "--cpu",
            "--listen",
            "127.0.0.1",
            "--port",
            str(port),
            "--base-directory",
            str(base),
            "--database-url",
            "sqlite:///:memory:",
            "--disable-auto-launch",
            "--use-pytorch-cross-attention",
        ],
        cwd=str(base),
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"ComfyUI exited with {proc.returncode}:\n{(base / 'server.log').read_text()[-3000:]}")
            try:
                get(url + "/system_stats")
                break
            except (urllib.error.URLError, ConnectionError, OSError):
                if time.time() > deadline:
                    pytest.fail("ComfyUI did not come up in 120 s:\n" + (base / "server.log").read_text()[-3000:])
                time.sleep(0.5)
        yield {"url": url, "base": base, "proc": proc}
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture(autouse=True)
def _one_thread():
    import torch

    torch.set_num_threads(1)
    yield
