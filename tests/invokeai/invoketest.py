"""What the InvokeAI tests share: a tiny random-weight SD 1.5-layout model saved as a diffusers
folder, a real InvokeAI server on 127.0.0.1 with the node pack in its nodes/ folder, and the
graphs the Invoke UI builds. Runs in InvokeAI's environment (.invokeai, made by
tools/install_invokeai.sh)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[2]
NODE_PACK = ROOT / "invokeai_nodes" / "hidiff_hidiffusion"
TESTKIT = Path(__file__).resolve().parent / "testkit" / "hidiff_invokeai_testkit"

#: The tiny model's native latent side: 128 px images (InvokeAI's SD 1.x base is recognised from
#: the 768-wide cross-attention, which the tiny model keeps). 2x native is 256 px.
NATIVE_LATENT = 16
NATIVE_PX = 8 * NATIVE_LATENT


def make_tiny_sd15(path: Path, seed: int = 0) -> Path:
    """A random-weight SD 1.5-layout pipeline saved as a diffusers folder InvokeAI installs as SD 1.x."""
    from diffusers import StableDiffusionPipeline

    from hidiff.diffusers.testing import tiny_components, tiny_text_encoder

    components = tiny_components("sd15", seed=seed, cross_attention_dim=768, sample_size=NATIVE_LATENT)
    components["text_encoder"] = tiny_text_encoder(seed, hidden_size=768)
    pipe = StableDiffusionPipeline(**components, requires_safety_checker=False)
    pipe.save_pretrained(str(path), safe_serialization=True)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class HTTPError(Exception):
    def __init__(self, status: int, body: Any):
        super().__init__(f"HTTP {status}: {body}")
        self.status = status
        self.body = body


class InvokeAIServer:
    """``invokeai-web`` of this Python's environment, started on a free port of 127.0.0.1 with a
    fresh root (in-memory database) whose nodes/ links the node pack and the test kit. Stopped
    by its pid (:meth:`stop`)."""

    def __init__(self, root: Path):
        self.root = root
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        nodes = root / "nodes"
        nodes.mkdir(parents=True, exist_ok=True)
        for pack in (NODE_PACK, TESTKIT):
            link = nodes / pack.name
            if not link.exists():
                os.symlink(pack, link)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "INVOKEAI_"))}
        env.update(
            OMP_NUM_THREADS="1",
            MKL_NUM_THREADS="1",
            HF_HUB_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
            DO_NOT_TRACK="1",
            INVOKEAI_HOST="127.0.0.1",
            INVOKEAI_PORT=str(self.port),
            INVOKEAI_DEVICE="cpu",
            INVOKEAI_PRECISION="float32",
            INVOKEAI_ATTENTION_TYPE="torch-sdp",
            INVOKEAI_USE_MEMORY_DB="true",
            INVOKEAI_HASHING_ALGORITHM="random",
            INVOKEAI_LOG_FORMAT="plain",
        )
        env.pop("USE_MODULAR_DENOISE", None)
        self.log_path = root / "server.log"
        self._log = open(self.log_path, "w")
        web = Path(sys.prefix) / "bin" / "invokeai-web"
        self.proc = subprocess.Popen(
            [str(web), "--root", str(root)], cwd=str(root), stdout=self._log, stderr=subprocess.STDOUT, env=env
        )

    def log(self, tail: int = 4000) -> str:
        return self.log_path.read_text()[-tail:]

    def wait_up(self, timeout: float = 120) -> None:
        deadline = time.time() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"invokeai-web exited with {self.proc.returncode}:\n{self.log()}")
            try:
                self.call("GET", "/api/v1/app/version")
                return
            except (urllib.error.URLError, ConnectionError, OSError):
                if time.time() > deadline:
                    raise RuntimeError(f"InvokeAI did not come up in {timeout:.0f} s:\n{self.log()}") from None
                time.sleep(0.5)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()

    # ------------------------------------------------------------------ HTTP
    def call(self, method: str, path: str, body: Any = None, raw: bool = False, timeout: float = 60) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(
            self.url + path, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                payload = response.read()
        except urllib.error.HTTPError as e:
            text = e.read().decode(errors="replace")
            try:
                parsed: Any = json.loads(text)
            except ValueError:
                parsed = text
            raise HTTPError(e.code, parsed) from None
        return payload if raw else json.loads(payload)

    def install_model(self, path: Path, timeout: float = 300) -> dict:
        """Install a local diffusers folder in place through the model API; its config record."""
        query = urllib.parse.urlencode({"source": str(path), "inplace": "true"})
        job = self.call("POST", f"/api/v2/models/install?{query}", {})
        deadline = time.time() + timeout
        while job["status"] not in ("completed", "error", "cancelled"):
            if time.time() > deadline:
                raise RuntimeError(f"model install still {job['status']} after {timeout:.0f} s")
            time.sleep(0.3)
            job = self.call("GET", f"/api/v2/models/install/{job['id']}")
        if job["status"] != "completed":
            raise RuntimeError(f"model install {job['status']}: {job.get('error')} {job.get('error_reason')}")
        return job["config_out"]

    def enqueue(self, graph: dict, data: Optional[list] = None) -> list[int]:
        batch: dict[str, Any] = {"graph": graph, "runs": 1}
        if data:
            batch["data"] = data
        return self.call("POST", "/api/v1/queue/default/enqueue_batch", {"batch": batch})["item_ids"]

    def item(self, item_id: int) -> dict:
        return self.call("GET", f"/api/v1/queue/default/i/{item_id}")

    def wait(self, item_id: int, timeout: float = 300) -> dict:
        deadline = time.time() + timeout
        while True:
            item = self.item(item_id)
            if item["status"] in ("completed", "failed", "canceled"):
                return item
            if time.time() > deadline:
                raise RuntimeError(f"queue item {item_id} still {item['status']} after {timeout:.0f} s")
            time.sleep(0.2)

    def cancel(self, item_id: int) -> None:
        self.call("PUT", f"/api/v1/queue/default/i/{item_id}/cancel")

    def run(self, graph: dict) -> dict:
        """Enqueue one graph, wait for it, fail with InvokeAI's error where it failed."""
        (item_id,) = self.enqueue(graph)
        item = self.wait(item_id)
        if item["status"] != "completed":
            raise RuntimeError(f"{item['status']}: {item.get('error_type')}: {item.get('error_message')}")
        return item

    def output(self, item: dict, node_id: str) -> dict:
        """The output of node ``node_id`` in a completed queue item."""
        session = item["session"]
        (exec_id,) = session["source_prepared_mapping"][node_id]
        return session["results"][exec_id]

    def image(self, item: dict, node_id: str = "l2i") -> tuple[Any, dict]:
        """(pixels as a uint8 tensor HxWx3, metadata) of the image node ``node_id`` saved."""
        import io

        import numpy as np
        import torch
        from PIL import Image

        name = self.output(item, node_id)["image"]["image_name"]
        png = self.call("GET", f"/api/v1/images/i/{name}/full", raw=True)
        pixels = torch.from_numpy(np.array(Image.open(io.BytesIO(png)).convert("RGB")))
        metadata = self.call("GET", f"/api/v1/images/i/{name}/metadata")
        return pixels, metadata


# ---------------------------------------------------------------------- graphs
def identifier(model: dict) -> dict:
    return {k: model[k] for k in ("key", "hash", "name", "base", "type")}


def edge(source: str, source_field: str, destination: str, destination_field: str) -> dict:
    return {
        "source": {"node_id": source, "field": source_field},
        "destination": {"node_id": destination, "field": destination_field},
    }


def txt2img_graph(
    model: dict,
    size: int,
    seed: int = 1,
    steps: int = 4,
    denoise: str = "hidiff_denoise_latents",
    fields: Optional[dict] = None,
    prompt: str = "one red circle",
    cfg: float = 5.0,
    scheduler: str = "euler",
    img2img_start: Optional[float] = None,
    digest: bool = True,
) -> dict:
    """The Invoke UI's SD 1.x text-to-image graph (loader -> prompts -> noise -> denoise -> l2i, with
    core_metadata into the denoise's metadata), the denoise node of type ``denoise``. With
    ``img2img_start`` the denoise starts there from the latents of a plain text-to-image denoise
    (InvokeAI's image-to-image: latents + noise + denoising_start). With ``digest`` the test kit's
    digest node reports the cached U-Net's state after the image is made."""
    ident = identifier(model)
    metadata_fields = {
        "generation_mode": "txt2img",
        "positive_prompt": prompt,
        "negative_prompt": "",
        "width": size,
        "height": size,
        "seed": seed,
        "steps": steps,
        "cfg_scale": cfg,
        "scheduler": scheduler,
        "model": ident,
    }
    nodes: dict[str, dict] = {
        "loader": {"type": "main_model_loader", "model": ident},
        "pos": {"type": "compel", "prompt": prompt},
        "neg": {"type": "compel", "prompt": ""},
        "noise": {"type": "noise", "seed": seed, "width": size, "height": size, "use_cpu": True},
        "denoise": {
            "type": denoise,
            "steps": steps,
            "cfg_scale": cfg,
            "scheduler": scheduler,
            "denoising_start": img2img_start or 0.0,
            "denoising_end": 1.0,
            **(fields or {}),
        },
        "l2i": {"type": "l2i", "fp32": True, "is_intermediate": False},
        "core_metadata": {"type": "core_metadata", **metadata_fields},
    }
    edges = [
        edge("loader", "clip", "pos", "clip"),
        edge("loader", "clip", "neg", "clip"),
        edge("loader", "unet", "denoise", "unet"),
        edge("pos", "conditioning", "denoise", "positive_conditioning"),
        edge("neg", "conditioning", "denoise", "negative_conditioning"),
        edge("noise", "noise", "denoise", "noise"),
        edge("denoise", "latents", "l2i", "latents"),
        edge("loader", "vae", "l2i", "vae"),
    ]
    if denoise == "denoise_latents":
        edges.append(edge("core_metadata", "metadata", "l2i", "metadata"))
    else:
        # the denoise + metadata nodes add their settings to the metadata they pass on
        edges += [
            edge("core_metadata", "metadata", "denoise", "metadata"),
            edge("denoise", "metadata", "l2i", "metadata"),
        ]
    if img2img_start is not None:
        nodes["first"] = {"type": "denoise_latents", "steps": steps, "cfg_scale": cfg, "scheduler": scheduler}
        edges += [
            edge("loader", "unet", "first", "unet"),
            edge("pos", "conditioning", "first", "positive_conditioning"),
            edge("neg", "conditioning", "first", "negative_conditioning"),
            edge("noise", "noise", "first", "noise"),
            edge("first", "latents", "denoise", "latents"),
        ]
    if digest:
        nodes["digest"] = {"type": "hidiff_test_unet_digest"}
        edges += [edge("loader", "unet", "digest", "unet"), edge("l2i", "image", "digest", "after")]
    for node_id, node in nodes.items():
        node.update(id=node_id, use_cache=False)
    return {"id": "hidiff-test", "nodes": nodes, "edges": edges}
