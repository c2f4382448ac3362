"""The repository as a ComfyUI node pack: the root __init__.py and the node's inputs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_root_package_loads_like_comfyui_loads_it_without_diffusers(tmp_path):
    """ComfyUI imports a pack folder under its path (dots replaced) as module name; any folder
    name must work, and loading the nodes must import neither diffusers nor a top-level hidiff."""
    folder = tmp_path / "custom_nodes" / "HiDiffusion.main"
    folder.parent.mkdir()
    folder.symlink_to(REPO)
    code = f"""
import importlib.util, json, sys
path = {str(folder)!r}
name = path.replace(".", "_x_")
spec = importlib.util.spec_from_file_location(name, path + "/__init__.py")
module = importlib.util.module_from_spec(spec)
sys.modules[name] = module
spec.loader.exec_module(module)
node = module.NODE_CLASS_MAPPINGS["HiDiffusion"]
print(json.dumps({{
    "names": sorted(module.NODE_CLASS_MAPPINGS), "display": module.NODE_DISPLAY_NAME_MAPPINGS,
    "heavy": sorted(m for m in ("diffusers", "transformers", "accelerate", "hidiff", "comfy") if m in sys.modules),
    "category": node.CATEGORY,
}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(tmp_path), check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["names"] == ["HiDiffSamplerDDIMCFGpp", "HiDiffusion"] and result["category"] == "model_patches"
    assert result["heavy"] == []
    assert result["display"]["HiDiffusion"].startswith("HiDiffusion")


def test_node_defaults_are_the_library_defaults_and_every_input_has_a_tooltip():
    from hidiff.comfy.nodes import HiDiffusion, config_from_widgets
    from hidiff.core.config import HiDiffusionConfig

    required = HiDiffusion.INPUT_TYPES()["required"]
    assert all(spec[1].get("tooltip") for spec in required.values())
    defaults = {name: spec[1]["default"] for name, spec in required.items() if name != "model"}
    assert config_from_widgets(**defaults) == HiDiffusionConfig()
    # every library option a ComfyUI user can set is a widget (ControlNet runs in ComfyUI's own nodes)
    library = {f for f in HiDiffusionConfig.__dataclass_fields__ if not f.startswith("controlnet")}
    assert set(defaults) == library


def test_widget_values_map_onto_the_library_config():
    from hidiff.comfy.nodes import config_from_widgets

    cfg = config_from_widgets(
        preset="sdxl-4096",
        t1_ratio=0.6,
        t2_ratio=0.2,
        aggressive="off",
        window_seed=7,
        window_shift="reference",
        at_native="apply",
        raunet=False,
    )
    assert (cfg.preset, cfg.t1_ratio, cfg.t2_ratio, cfg.aggressive, cfg.window_seed) == (
        "sdxl-4096",
        0.6,
        0.2,
        False,
        7,
    )
    assert (cfg.window_shift, cfg.at_native, cfg.raunet) == ("reference", "apply", False)


@pytest.mark.patch_api
def test_node_returns_a_clone_and_leaves_the_input_model_alone():
    from comfytest import build

    from hidiff.comfy.nodes import HiDiffusion

    patcher, _ = build("sd15")
    before = repr(patcher.model_options)
    required = HiDiffusion.INPUT_TYPES()["required"]
    (out,) = HiDiffusion().apply(patcher, **{k: v[1]["default"] for k, v in required.items() if k != "model"})
    assert out is not patcher and out.model is patcher.model
    assert repr(patcher.model_options) == before and not getattr(patcher, "wrappers", {}).get("diffusion_model")
    assert out.wrappers["diffusion_model"]
