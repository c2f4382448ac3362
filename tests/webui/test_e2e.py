"""End to end in a real Stable Diffusion WebUI (AUTOMATIC1111 v1.10, Forge or reForge), by hand.

No WebUI is on a package registry, so CI has none and these tests skip, saying why. Point
them at an installation and run them in ``.comfy`` (ComfyUI's ldm classes build the test's
checkpoint; aiohttp drives Chromium):

    HIDIFF_WEBUI_ROOT=/path/to/stable-diffusion-webui      # the WebUI's tree (launch.py)
    HIDIFF_WEBUI_PYTHON=/path/to/its/venv/bin/python        # a Python that runs it
    .comfy/bin/python -m pytest tests/webui/test_e2e.py -s

Optional:

- ``HIDIFF_WEBUI_CHECKPOINT``: an SD 1.5 checkpoint to use instead of the one the test makes
  (``tests/webui/checkpoint.py``: random weights, full width, original key layout, fp16, about
  2 min and 2.1 GB in the test's temporary folder).
- ``HIDIFF_WEBUI_HF_HOME``: a Hugging Face cache holding ``openai/clip-vit-large-patch14``'s
  tokenizer and config, which AUTOMATIC1111 loads from the hub (no network here). Without it
  the test writes one from ComfyUI's copy of that tokenizer (``checkpoint.make_clip_hub_cache``);
  Forge and reForge carry their tokenizers.
- ``HIDIFF_WEBUI_SIZE`` (default 1024, 2x SD 1.5's native): the square size of the runs; a
  smaller one above 512 still runs HiDiffusion.

The test makes a data folder (``--data-dir``) with this repository as the extension
``extensions/hidiffusion`` (a link to a folder holding links to ``hidiff/`` and
``scripts/hidiffusion.py``) and the checkpoint, starts the WebUI's server on 127.0.0.1 on
CPU (the server's log is kept beside it), and checks: the script is listed for txt2img and
img2img with its arguments; a txt2img at 2x native (1024 px, 2 Euler steps) with HiDiffusion
gives an image whose infotext holds the settings and whose run hidiff recorded (the step-0 call
strided the conv, windows ran); the same request without HiDiffusion, before and after, gives
bitwise the same image; a bad option is answered with an error naming it, and the server still
serves; the server is stopped by its pid. A second test opens the page in headless Chromium:
the accordion renders, its line reads the loaded model, and the page logs no console error.
A third runs the hires fix (512 px, then 2x: 4 hires steps at denoising strength 0.5) and an
img2img (4 steps at strength 0.5) with HiDiffusion: each is a run of its own, planned over the
steps it really samples at its size (4 and 3).
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from browser import CHROMIUM, NO_CHROMIUM, chromium, free_port, open_page
from comfytest import HAVE_COMFY

ROOT = os.environ.get("HIDIFF_WEBUI_ROOT")
PYTHON = os.environ.get("HIDIFF_WEBUI_PYTHON")
CHECKPOINT = os.environ.get("HIDIFF_WEBUI_CHECKPOINT")
HF_HOME = os.environ.get("HIDIFF_WEBUI_HF_HOME")
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HERE = os.path.dirname(os.path.abspath(__file__))
SIZE = int(os.environ.get("HIDIFF_WEBUI_SIZE", "1024"))

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (ROOT and PYTHON),
        reason="no WebUI given: set HIDIFF_WEBUI_ROOT and HIDIFF_WEBUI_PYTHON (see this file's docstring); "
        "no WebUI is on a package registry, so CI has none",
    ),
    pytest.mark.skipif(
        not HAVE_COMFY and not (CHECKPOINT and HF_HOME),
        reason="the test makes its checkpoint and A1111's tokenizer cache with ComfyUI's classes and files: "
        "run it in .comfy, or give HIDIFF_WEBUI_CHECKPOINT and HIDIFF_WEBUI_HF_HOME",
    ),
]


def flavour(root: str) -> str:
    if os.path.isdir(os.path.join(root, "backend", "patcher")):
        return "forge"
    if os.path.isdir(os.path.join(root, "ldm_patched")):
        return "reforge"
    return "a1111"


def call(port: int, method: str, path: str, body=None, timeout: float = 1800):
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        method=method,
        data=json.dumps(body).encode() if body is not None else None,
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def made_inputs(base: str) -> tuple[str, str]:
    """(checkpoint, HF_HOME): the given ones, else made under ``base`` by checkpoint.py in a child
    process (its 4 GB peak is given back before the WebUI starts)."""
    checkpoint = CHECKPOINT and os.path.abspath(CHECKPOINT)
    hf_home = HF_HOME and os.path.abspath(HF_HOME)
    if checkpoint and hf_home:
        return checkpoint, hf_home
    made = os.path.join(base, "sd15-random.safetensors")
    command = [sys.executable, os.path.join(HERE, "checkpoint.py")] + ([] if checkpoint else [made])
    if not hf_home:
        hf_home = os.path.join(base, "hf")
        command += ["--hf-home", hf_home]
    t0 = time.time()
    subprocess.run(command, check=True, env=dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1")))
    print(f"made {'the tokenizer cache' if checkpoint else 'the checkpoint'} in {time.time() - t0:.0f} s")
    return checkpoint or made, hf_home


def make_data_dir(base: str, checkpoint: str) -> str:
    data = os.path.join(base, "data")
    ext = os.path.join(base, "extension")
    os.makedirs(os.path.join(ext, "scripts"))
    os.symlink(os.path.join(REPO, "hidiff"), os.path.join(ext, "hidiff"))
    os.symlink(os.path.join(REPO, "scripts", "hidiffusion.py"), os.path.join(ext, "scripts", "hidiffusion.py"))
    os.makedirs(os.path.join(data, "extensions"))
    os.symlink(ext, os.path.join(data, "extensions", "hidiffusion"))
    models = os.path.join(data, "models", "Stable-diffusion")
    os.makedirs(models)
    os.symlink(checkpoint, os.path.join(models, "model.safetensors"))
    # No live previews: A1111/reForge would try to download a preview model on the first txt2img.
    with open(os.path.join(data, "config.json"), "w") as f:
        json.dump({"live_previews_enable": False, "samples_save": False, "grid_save": False}, f)
    return data


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = str(tmp_path_factory.mktemp("webui"))
    checkpoint, hf_home = made_inputs(base)
    data = make_data_dir(base, checkpoint)
    record = os.path.join(base, "records.jsonl")
    port = free_port()
    kind = flavour(ROOT)
    args = [
        PYTHON,
        "launch.py",
        "--skip-prepare-environment",
        "--skip-install",
        "--skip-torch-cuda-test",
        "--skip-python-version-check",
        "--api",
        "--server-name",
        "127.0.0.1",
        "--port",
        str(port),
        "--data-dir",
        data,
        "--ckpt",
        os.path.join(data, "models", "Stable-diffusion", "model.safetensors"),
        "--no-download-sd-model",
    ]
    if kind == "forge":
        # Forge lets Gradio serve files only from the data folder (its default is the tree): with
        # --data-dir elsewhere, the page's own javascript/ and style files would answer 403.
        args += ["--always-cpu", "--attention-pytorch", "--gradio-allowed-path", ROOT]
    elif kind == "reforge":
        args += ["--always-cpu", "--attention-pytorch", "--no-half", "--precision", "full"]
    else:
        args += ["--use-cpu", "all", "--no-half", "--precision", "full", "--opt-sdp-attention"]
    env = dict(os.environ, HIDIFF_WEBUI_RECORD=record, HF_HOME=hf_home, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    log_path = os.path.join(base, "server.log")
    log = open(log_path, "w")
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 900
        while time.time() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"the WebUI exited ({proc.returncode}); log {log_path}:\n" + open(log_path).read()[-3000:])
            try:
                # Ready when the scripts' controls are built: until then the WebUIs' API sizes its
                # script arguments without them (Forge keeps that size: a request with this
                # extension's arguments then fails with an IndexError in its init_script_args).
                status, info = call(port, "GET", "/sdapi/v1/script-info", timeout=10)
                if status == 200 and any(s.get("name") == "hidiffusion" and s.get("args") for s in info):
                    break
            except (urllib.error.URLError, ConnectionError, socket.timeout):
                pass
            time.sleep(3)
        else:
            pytest.fail(f"the WebUI did not answer within 900 s; log {log_path}")
        yield {"port": port, "record": record, "log": log_path, "kind": kind, "pid": proc.pid}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(60)
        log.close()
        print(f"[{kind}] server log: {log_path}")


def request(**changes) -> dict:
    """The tests' generation request: a 2-step Euler txt2img at SIZE, CFG 1, seed 7, with ``changes``."""
    body = {
        "prompt": "a photo of a cat",
        "negative_prompt": "",
        "steps": 2,
        "cfg_scale": 1.0,
        "width": SIZE,
        "height": SIZE,
        "seed": 7,
        "sampler_name": "Euler",
        "scheduler": "Automatic",
        "batch_size": 1,
        "n_iter": 1,
        "send_images": True,
        "save_images": False,
    }
    return {**body, **changes}


def txt2img(port: int, alwayson=None):
    body = request() if alwayson is None else request(alwayson_scripts=alwayson)
    return call(port, "POST", "/sdapi/v1/txt2img", body)


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def recorded_runs(server) -> list:
    if not os.path.exists(server["record"]):  # written at the first HiDiffusion sampling
        return []
    with open(server["record"]) as f:
        return [json.loads(line)["run"] for line in f]


def test_webui_end_to_end(server):
    sys.path.insert(0, REPO)
    from hidiff.webui.options import api_args

    port, kind = server["port"], server["kind"]
    status, listed = call(port, "GET", "/sdapi/v1/scripts")
    assert status == 200 and "hidiffusion" in listed["txt2img"] and "hidiffusion" in listed["img2img"], listed
    status, info = call(port, "GET", "/sdapi/v1/script-info")
    ours = [s for s in info if s["name"] == "hidiffusion" and not s["is_img2img"]]
    assert ours and [a["label"] for a in ours[0]["args"]][:3] == ["Enable HiDiffusion", "raunet", "window_attn"]

    t0 = time.time()
    status, plain = txt2img(port)
    t_plain = time.time() - t0
    assert status == 200, plain
    t0 = time.time()
    # t1_ratio 0.5: of 2 steps, the strided conv runs on the first (the default 0.4 gives it none)
    status, hidiff_run = txt2img(port, {"HiDiffusion": {"args": api_args(True, window_seed=5, t1_ratio=0.5)}})
    t_hidiff = time.time() - t0
    assert status == 200, hidiff_run
    status, plain_after = txt2img(port)
    assert status == 200, plain_after
    print(f"[{kind}] {SIZE}px 2 steps: plain {t_plain:.0f} s, HiDiffusion {t_hidiff:.0f} s")

    image = base64.b64decode(hidiff_run["images"][0])
    assert png_size(image) == (SIZE, SIZE)
    stock = base64.b64decode(plain["images"][0])
    assert image != stock  # HiDiffusion changed the image...
    assert base64.b64decode(plain_after["images"][0]) == stock  # ... and left nothing behind
    infotext = json.loads(hidiff_run["info"])["infotexts"][0]
    assert "HiDiffusion: True" in infotext and "HiDiffusion window_seed: 5" in infotext, infotext
    assert "HiDiffusion t1_ratio: 0.5" in infotext, infotext
    assert "HiDiffusion" not in json.loads(plain_after["info"])["infotexts"][0]

    runs = recorded_runs(server)
    assert len(runs) == 1, runs  # one sampling ran with HiDiffusion, the plain ones not
    calls = runs[0]
    print(f"[{kind}] recorded run: {json.dumps(calls)}")
    assert calls[0]["family"] == "sd1" and calls[0]["latent"] == [SIZE // 8, SIZE // 8]
    assert [c["step"] for c in calls] == [0, 1] and all(c["total"] == 2 for c in calls)
    assert calls[0]["preset"] == "sd-1024" and calls[0]["conv"] and calls[0]["conv_out"] == [SIZE // 32, SIZE // 32]
    assert not calls[1]["conv"]
    assert all(c["windows"] > 0 for c in calls)

    status, bad = txt2img(port, {"HiDiffusion": {"args": api_args(True)[:3] + ["sd-9000"]}})
    assert status >= 400, bad
    message = json.dumps(bad)
    assert "HiDiffusion option preset" in message and "sd-2048" in message, message
    assert call(port, "GET", "/sdapi/v1/scripts")[0] == 200  # still serving


def test_hires_fix_and_img2img_run_hidiffusion_on_the_steps_that_really_run(server):
    """The hires-fix second pass and img2img are sampling runs of their own: HiDiffusion plans
    each over the steps it really samples, at its size."""
    sys.path.insert(0, REPO)
    from hidiff.webui.options import api_args

    port, kind = server["port"], server["kind"]
    native = SIZE // 2
    hidiffusion = {"HiDiffusion": {"args": api_args(True, window_seed=5, t1_ratio=0.5)}}
    before = len(recorded_runs(server))
    hires = request(
        width=native,
        height=native,
        enable_hr=True,
        hr_scale=2,
        hr_upscaler="Latent",
        hr_second_pass_steps=4,
        denoising_strength=0.5,
        alwayson_scripts=hidiffusion,
    )
    if kind == "forge":  # Forge's hires pass reads its module choices and has no default for them
        hires["hr_additional_modules"] = ["Use same choices"]
    status, answer = call(port, "POST", "/sdapi/v1/txt2img", hires)
    assert status == 200, answer
    image = answer["images"][0]
    assert png_size(base64.b64decode(image)) == (SIZE, SIZE)
    runs = recorded_runs(server)[before:]
    print(f"[{kind}] hires fix, recorded runs: {json.dumps(runs)}")
    # The first pass at native size: nothing to do. The second at 2x: the WebUIs sample the
    # hires steps asked for (4) as the last 4 of a schedule of int(4 / 0.5) = 8, and HiDiffusion
    # plans over those 4 (t1_ratio 0.5: the strided conv on the first 2).
    assert len(runs) == 2 and runs[0] == []
    second = runs[1]
    assert all(c["latent"] == [SIZE // 8, SIZE // 8] and c["total"] == 4 for c in second)
    assert [c["step"] for c in second] == [0, 1, 2, 3]
    assert [c["conv"] for c in second] == [True, True, False, False]

    body = request(init_images=[image], steps=4, denoising_strength=0.5, alwayson_scripts=hidiffusion)
    before = len(recorded_runs(server))
    status, answer = call(port, "POST", "/sdapi/v1/img2img", body)
    assert status == 200, answer
    assert png_size(base64.b64decode(answer["images"][0])) == (SIZE, SIZE)
    assert "HiDiffusion: True" in json.loads(answer["info"])["infotexts"][0]
    runs = recorded_runs(server)[before:]
    print(f"[{kind}] img2img, recorded runs: {json.dumps(runs)}")
    # The WebUIs' img2img samples int(strength x steps) + 1 = 3 of its 4 steps' sigmas (t_enc + 1):
    # HiDiffusion plans over those 3 (t1_ratio 0.5: the strided conv on the first, int(1.5) = 1).
    assert len(runs) == 1 and [c["step"] for c in runs[0]] == [0, 1, 2] and all(c["total"] == 3 for c in runs[0])
    assert [c["conv"] for c in runs[0]] == [True, False, False] and runs[0][0]["conv_out"] == [SIZE // 32, SIZE // 32]


async def _look(debug_port: int, url: str):
    import asyncio

    async with open_page(debug_port) as page:
        await page.enable_error_reports()
        await page.call("Page.navigate", url=url)
        deadline = time.time() + 240
        while not await page.evaluate(
            "!!document.querySelector('gradio-app') && !!(document.querySelector('gradio-app').shadowRoot || document).querySelector('#hidiffusion_txt2img')"
        ):
            if time.time() > deadline:
                raise TimeoutError("the WebUI page did not show the HiDiffusion accordion")
            await asyncio.sleep(2)
        root = "(document.querySelector('gradio-app').shadowRoot || document)"
        await asyncio.sleep(5)
        await page.evaluate(f"{root}.querySelector('#hidiffusion_txt2img .label-wrap').click()")
        await asyncio.sleep(2)
        await page.evaluate(f"{root}.querySelector('#hidiffusion_txt2img_enable input').click()")
        await asyncio.sleep(6)
        state = await page.evaluate(
            f"""(() => {{
                const r = {root};
                const acc = r.querySelector('#hidiffusion_txt2img');
                acc.scrollIntoView();
                window.scrollBy(0, -60);
                const ids = [...acc.querySelectorAll('[id^=hidiffusion_txt2img_]')].map(e => e.id);
                const titles = [...acc.querySelectorAll('[title]')].map(e => e.title).filter(t => t);
                return {{ids, titles, line: (r.querySelector('#hidiffusion_txt2img_line') || {{}}).innerText || '',
                         text: acc.innerText.slice(0, 3000)}};
            }})()"""
        )
        await asyncio.sleep(1)
        return state, await page.screenshot(), page.errors


@pytest.mark.skipif(CHROMIUM is None, reason=NO_CHROMIUM)
def test_accordion_renders_in_the_browser(server, tmp_path):
    import asyncio

    pytest.importorskip("aiohttp", reason="the browser check talks to Chromium with aiohttp (in .comfy)")
    # Forge loads the checkpoint at the first generation (before it, the line says no model is
    # loaded): one tiny generation, so the line has a model to read also when this test runs alone.
    status, answer = call(
        server["port"], "POST", "/sdapi/v1/txt2img", {"prompt": "a cat", "steps": 1, "width": 64, "height": 64}
    )
    assert status == 200, answer
    with chromium(str(tmp_path / "profile"), window="1400,1000") as debug_port:
        state, png, errors = asyncio.run(_look(debug_port, f"http://127.0.0.1:{server['port']}/"))
    (tmp_path / "webui-accordion.png").write_bytes(png)
    if os.environ.get("HIDIFF_SCREENSHOT"):
        with open(os.environ["HIDIFF_SCREENSHOT"], "wb") as f:
            f.write(png)
    print(f"[{server['kind']}] accordion line: {state['line']!r}; console errors: {errors}")
    ours = [e for e in errors if "hidiff" in e.lower()]
    assert not ours, ours
    # No error at all, except resources the WebUI's page fetches from other hosts (fonts, ...):
    # this machine resolves no other host.
    offline = "net::ERR_NAME_NOT_RESOLVED"
    assert not [e for e in errors if offline not in e], errors
    for name in ("enable", "raunet", "window_attn", "preset", "t1_ratio", "window_seed", "line"):
        assert any(i.startswith(f"hidiffusion_txt2img_{name}") for i in state["ids"]), (name, state["ids"])
    # The line reads the loaded model and the tab's default size (512x512 in A1111 and reForge: native)
    assert state["line"].startswith("At ") and "(sd1, native 512x512)" in state["line"], state
