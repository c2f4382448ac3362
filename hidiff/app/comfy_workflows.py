"""Example workflows with the HiDiffusion node, in ComfyUI's UI format (drag onto the canvas)
and API format (POST /prompt), generated from one description so the two always agree.

    python -m hidiff.app.comfy_workflows [FOLDER]   # writes hidiff/comfy/example_workflows/*.json

Model file names are the usual ones (v1-5-pruned-emaonly, sd_xl_base_1.0, the lllyasviel /
diffusers canny ControlNets); pick yours in the loader nodes after loading a workflow.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

FOLDER = Path(__file__).resolve().parents[1] / "comfy" / "example_workflows"


@dataclass
class Node:
    id: int
    type: str
    widgets: dict[str, Any]  # in the node's widget order
    inputs: dict[str, tuple[int, int]] = field(default_factory=dict)  # name -> (node id, output slot)
    outputs: tuple[tuple[str, str], ...] = ()  # (name, type)
    pos: tuple[int, int] = (0, 0)
    title: Optional[str] = None


def hidiffusion_widgets() -> dict[str, Any]:
    """The node's widgets at their defaults (the library's defaults)."""
    from ..comfy.nodes import widget_defaults

    return widget_defaults()


# Input types of the stock nodes used here (for the UI format's link types).
_TYPES = {
    "model": "MODEL",
    "clip": "CLIP",
    "vae": "VAE",
    "positive": "CONDITIONING",
    "negative": "CONDITIONING",
    "latent_image": "LATENT",
    "samples": "LATENT",
    "images": "IMAGE",
    "image": "IMAGE",
    "control_net": "CONTROL_NET",
}


def graph(family: str, size: int, controlnet: bool) -> list[Node]:
    ckpt = "v1-5-pruned-emaonly.safetensors" if family == "sd15" else "sd_xl_base_1.0.safetensors"
    steps, cfg = (30, 7.5) if family == "sd15" else (30, 6.0)
    prompt = "a cozy cabin in a snowy forest at dusk, warm light in the windows, highly detailed photograph"
    nodes = [
        Node(
            1,
            "CheckpointLoaderSimple",
            {"ckpt_name": ckpt},
            outputs=(("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")),
            pos=(40, 200),
        ),
        Node(2, "HiDiffusion", hidiffusion_widgets(), {"model": (1, 0)}, (("MODEL", "MODEL"),), pos=(420, 40)),
        Node(
            3,
            "CLIPTextEncode",
            {"text": prompt},
            {"clip": (1, 1)},
            (("CONDITIONING", "CONDITIONING"),),
            pos=(420, 560),
            title="positive",
        ),
        Node(
            4,
            "CLIPTextEncode",
            {"text": "blurry, lowres, watermark"},
            {"clip": (1, 1)},
            (("CONDITIONING", "CONDITIONING"),),
            pos=(420, 800),
            title="negative",
        ),
        Node(
            5,
            "EmptyLatentImage",
            {"width": size, "height": size, "batch_size": 1},
            outputs=(("LATENT", "LATENT"),),
            pos=(420, 1040),
        ),
    ]
    positive, negative = (3, 0), (4, 0)
    if controlnet:
        cnet = "control_v11p_sd15_canny.pth" if family == "sd15" else "diffusers_xl_canny_full.safetensors"
        nodes += [
            Node(
                8,
                "ControlNetLoader",
                {"control_net_name": cnet},
                outputs=(("CONTROL_NET", "CONTROL_NET"),),
                pos=(820, 620),
            ),
            Node(
                9,
                "LoadImage",
                {"image": "example.png", "upload": "image"},
                outputs=(("IMAGE", "IMAGE"), ("MASK", "MASK")),
                pos=(820, 760),
            ),
            Node(
                10,
                "ControlNetApplyAdvanced",
                {"strength": 1.0, "start_percent": 0.0, "end_percent": 1.0},
                {"positive": (3, 0), "negative": (4, 0), "control_net": (8, 0), "image": (9, 0)},
                (("positive", "CONDITIONING"), ("negative", "CONDITIONING")),
                pos=(1180, 620),
            ),
        ]
        positive, negative = (10, 0), (10, 1)
    nodes += [
        Node(
            6,
            "KSampler",
            {
                "seed": 1,
                "control_after_generate": "fixed",
                "steps": steps,
                "cfg": cfg,
                "sampler_name": "dpmpp_2m",
                "scheduler": "karras",
                "denoise": 1.0,
            },
            {"model": (2, 0), "positive": positive, "negative": negative, "latent_image": (5, 0)},
            (("LATENT", "LATENT"),),
            pos=(1540, 200),
        ),
        Node(7, "VAEDecode", {}, {"samples": (6, 0), "vae": (1, 2)}, (("IMAGE", "IMAGE"),), pos=(1900, 200)),
        Node(11, "SaveImage", {"filename_prefix": f"hidiffusion-{family}-{size}"}, {"images": (7, 0)}, pos=(2140, 200)),
    ]
    return nodes


def api_format(nodes: list[Node]) -> dict:
    out = {}
    for n in nodes:
        inputs = {k: v for k, v in n.widgets.items() if k not in ("control_after_generate", "upload")}
        inputs.update({k: [str(src), slot] for k, (src, slot) in n.inputs.items()})
        out[str(n.id)] = {"class_type": n.type, "inputs": inputs, "_meta": {"title": n.title or n.type}}
    return out


def ui_format(nodes: list[Node]) -> dict:
    links, ui_nodes = [], []
    by_id = {n.id: n for n in nodes}
    link_of: dict[tuple[int, str], int] = {}
    for n in nodes:
        for name, (src, slot) in n.inputs.items():
            link_id = len(links) + 1
            links.append([link_id, src, slot, n.id, list(n.inputs).index(name), by_id[src].outputs[slot][1]])
            link_of[(n.id, name)] = link_id
    for order, n in enumerate(nodes):
        outputs = []
        for slot, (name, typ) in enumerate(n.outputs):
            outgoing = [link[0] for link in links if link[1] == n.id and link[2] == slot]
            outputs.append({"name": name, "type": typ, "links": outgoing, "slot_index": slot})
        node = {
            "id": n.id,
            "type": n.type,
            "pos": list(n.pos),
            "size": [340, 60 + 28 * len(n.widgets)],
            "flags": {},
            "order": order,
            "mode": 0,
            "inputs": [{"name": name, "type": _TYPES[name], "link": link_of[(n.id, name)]} for name in n.inputs],
            "outputs": outputs,
            "properties": {"Node name for S&R": n.type},
            "widgets_values": list(n.widgets.values()),
        }
        if n.title:
            node["title"] = n.title
        ui_nodes.append(node)
    return {
        "last_node_id": max(n.id for n in nodes),
        "last_link_id": len(links),
        "nodes": ui_nodes,
        "links": links,
        "groups": [],
        "config": {},
        "extra": {},
        "version": 0.4,
    }


EXAMPLES = {
    "hidiffusion-sd15-1024": ("sd15", 1024, False),
    "hidiffusion-sd15-1024-controlnet": ("sd15", 1024, True),
    "hidiffusion-sdxl-2048": ("sdxl", 2048, False),
    "hidiffusion-sdxl-2048-controlnet": ("sdxl", 2048, True),
}


def files() -> dict[str, dict]:
    """File name -> workflow JSON: ``NAME.json`` (UI format) and ``NAME.api.json`` (API format)."""
    out = {}
    for name, args in EXAMPLES.items():
        nodes = graph(*args)
        out[f"{name}.json"] = ui_format(nodes)
        out[f"{name}.api.json"] = api_format(nodes)
    return out


def write(folder: Path = FOLDER) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, data in files().items():
        path = folder / name
        path.write_text(json.dumps(data, indent=2) + "\n")
        written.append(path)
    return written


if __name__ == "__main__":  # pragma: no cover
    for p in write(Path(sys.argv[1]) if len(sys.argv) > 1 else FOLDER):
        print(p)
