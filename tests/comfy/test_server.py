"""The real ComfyUI server with this repository in custom_nodes: /object_info lists the node,
an API-format workflow (tiny checkpoint -> HiDiffusion -> KSampler -> VAEDecode -> SaveImage)
at 2x native gives a PNG of the right size with the workflow embedded, bad inputs get node
errors carrying hidiff's message, and the server still runs a good prompt after them."""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.patch_api

REPO = Path(__file__).resolve().parents[2]
TESTKIT = Path(__file__).resolve().parent / "testkit"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str):
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


def _post(url: str, payload: dict):
    req = urllib.request.Request(url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


@pytest.fixture(scope="module")
def server(comfy_server):
    return comfy_server


def workflow(width=1024, height=1024, layout="sd15", seed=0, steps=2, **hidiff):
    options = dict(
        raunet=True,
        window_attn=True,
        preset="auto",
        t1_ratio=-1.0,
        t2_ratio=-1.0,
        aggressive="auto",
        aggressive_step_ratio=0.16,
        window_shift="seeded",
        window_seed=-1,
        kv_downsample="1",
        kv_levels="1",
        at_native="skip",
    )
    options.update(hidiff)
    return {
        "1": {"class_type": "HiDiffTestCheckpoint", "inputs": {"layout": layout, "seed": 0}},
        "2": {"class_type": "HiDiffusion", "inputs": {"model": ["1", 0], **options}},
        "3": {"class_type": "EmptyLatentImage", "inputs": {"width": width, "height": height, "batch_size": 1}},
        "4": {
            "class_type": "KSampler",
            "inputs": {
                "model": ["2", 0],
                "positive": ["1", 1],
                "negative": ["1", 2],
                "latent_image": ["3", 0],
                "seed": seed,
                "steps": steps,
                "cfg": 1.0,
                "sampler_name": "euler",
                "scheduler": "normal",
                "denoise": 1.0,
            },
        },
        "5": {"class_type": "VAEDecode", "inputs": {"samples": ["4", 0], "vae": ["1", 3]}},
        "6": {"class_type": "SaveImage", "inputs": {"images": ["5", 0], "filename_prefix": "hidiff"}},
    }


def run_prompt(server, prompt, timeout=300):
    status, body = _post(
        server["url"] + "/prompt", {"prompt": prompt, "extra_data": {"extra_pnginfo": {"workflow": {"hidiff": "test"}}}}
    )
    assert status == 200, body
    pid = body["prompt_id"]
    deadline = time.time() + timeout
    while time.time() < deadline:
        history = _get(f"{server['url']}/history/{pid}")
        if pid in history and history[pid].get("status", {}).get("completed") is not None:
            entry = history[pid]
            if entry["status"].get("status_str") in ("success", "error"):
                return entry
        time.sleep(0.5)
    pytest.fail(f"prompt {pid} did not finish in {timeout} s")


def error_message(entry) -> str:
    for kind, data in entry["status"].get("messages", []):
        if kind == "execution_error":
            return f"{data.get('node_type')} | {data.get('exception_message')}"
    return ""


def test_object_info_lists_the_node_with_its_inputs(server):
    """Registered through comfy_entrypoint (V3), in the menus where this ComfyUI keeps its own
    U-Net patches and samplers, with the inputs saved workflows use, in their order."""
    info = _get(server["url"] + "/object_info/HiDiffusion")["HiDiffusion"]
    freeu = _get(server["url"] + "/object_info/FreeU_V2")["FreeU_V2"]
    select = _get(server["url"] + "/object_info/KSamplerSelect")["KSamplerSelect"]
    sampler = _get(server["url"] + "/object_info/HiDiffSamplerDDIMCFGpp")["HiDiffSamplerDDIMCFGpp"]
    assert info["category"] == freeu["category"] and info["output"] == ["MODEL"]
    assert sampler["category"] == select["category"] and sampler["output"] == ["SAMPLER"]
    assert info.get("python_module", "").startswith("custom_nodes.")
    required = info["input"]["required"]
    assert list(required) == [
        "model",
        "raunet",
        "window_attn",
        "preset",
        "t1_ratio",
        "t2_ratio",
        "aggressive",
        "aggressive_step_ratio",
        "window_shift",
        "window_seed",
        "kv_downsample",
        "kv_levels",
        "at_native",
    ]
    assert all(spec[1].get("tooltip") for spec in required.values())
    assert required["raunet"][1]["default"] is True and required["window_seed"][1]["default"] == -1


def test_workflow_at_2x_native_saves_the_image_and_errors_carry_our_message(server):
    from PIL import Image

    entry = run_prompt(server, workflow())
    assert entry["status"]["status_str"] == "success", error_message(entry)
    (image,) = entry["outputs"]["6"]["images"]
    path = server["base"] / "output" / image.get("subfolder", "") / image["filename"]
    with Image.open(path) as im:
        assert im.size == (1024, 1024)
        assert json.loads(im.info["workflow"]) == {"hidiff": "test"}
        assert "HiDiffusion" in im.info["prompt"]

    bad_model = run_prompt(server, workflow(layout="unsupported", width=512, height=512))
    assert bad_model["status"]["status_str"] == "error"
    message = error_message(bad_model)
    assert (
        message.startswith("HiDiffusion | HiDiffusion: ")
        and "2 down stages with cross-attention at stages [0]" in message
    )

    bad_option = run_prompt(server, workflow(width=512, height=512, t1_ratio=0.2, t2_ratio=0.5))
    assert bad_option["status"]["status_str"] == "error"
    assert error_message(bad_option).startswith("HiDiffusion | HiDiffusion: ")
    assert "T2 must not be larger than T1" in error_message(bad_option)

    # A widget value outside its range is refused by ComfyUI's validation, before running.
    status, body = _post(server["url"] + "/prompt", {"prompt": workflow(window_seed=-5)})
    assert status == 400 and "2" in body.get("node_errors", {})

    again = run_prompt(server, workflow(width=512, height=640, seed=1, steps=1))
    assert again["status"]["status_str"] == "success", error_message(again)


def test_example_api_workflows_validate_except_for_the_model_files(server):
    """The shipped API workflows name real nodes and widgets: the server refuses them only for
    the model / image files this test server does not have."""
    from hidiff.app import comfy_workflows as workflows

    files_inputs = {"ckpt_name", "control_net_name", "image"}
    for name in workflows.EXAMPLES:
        prompt = json.loads((workflows.FOLDER / f"{name}.api.json").read_text())
        status, body = _post(server["url"] + "/prompt", {"prompt": prompt})
        assert status == 400, (name, body)
        errors = body.get("node_errors", {})
        assert errors, body
        for node_id, err in errors.items():
            for e in err["errors"]:
                assert e["type"] in ("value_not_in_list", "custom_validation_failed"), (name, node_id, e)
                assert e["extra_info"]["input_name"] in files_inputs, (name, node_id, e)


def _pixels(server, entry):
    import numpy as np
    from PIL import Image

    (image,) = entry["outputs"]["6"]["images"]
    path = server["base"] / "output" / image.get("subfolder", "") / image["filename"]
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")).copy()


def test_removing_the_node_leaves_the_served_model_stock(server):
    """Stock, then with HiDiffusion, then stock again on the server's cached checkpoint: the
    last image is bitwise the first (the node's patches lived on its clone only)."""
    stock = workflow(width=640, height=640, seed=5, steps=2)
    stock["4"]["inputs"]["model"] = ["1", 0]
    del stock["2"]
    first = run_prompt(server, stock)
    assert first["status"]["status_str"] == "success", error_message(first)
    patched = run_prompt(server, workflow(width=640, height=640, seed=5, steps=2))
    assert patched["status"]["status_str"] == "success", error_message(patched)
    again = run_prompt(server, stock)  # KSampler's cached output is now the patched one: it runs again
    assert again["status"]["status_str"] == "success", error_message(again)
    cached = [
        n for kind, data in again["status"].get("messages", []) if kind == "execution_cached" for n in data["nodes"]
    ]
    assert "4" not in cached and "1" in cached  # the sampler ran again, on the loader's cached model
    a, b, c = (_pixels(server, e) for e in (first, patched, again))
    assert (a == c).all()
    assert (a != b).any()  # HiDiffusion did act at 640 px
