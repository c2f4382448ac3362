"""The repository as a ComfyUI node pack: the root __init__.py, the V3 nodes and their inputs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from comfytest import COMFY_ROOT

REPO = Path(__file__).resolve().parents[2]

#: Loads the pack as ComfyUI's load_custom_node does (module name = the folder's path), then
#: reports what it exports; with ComfyUI's root on sys.path it runs comfy_entrypoint too.
_LOADER = """
import asyncio, importlib.util, json, sys
path, comfy_root = sys.argv[1], sys.argv[2]
if comfy_root:
    sys.path.insert(0, comfy_root)
name = path.replace(".", "_x_")
spec = importlib.util.spec_from_file_location(name, path + "/__init__.py")
module = importlib.util.module_from_spec(spec)
sys.modules[name] = module
spec.loader.exec_module(module)
heavy_at_load = sorted(m for m in ("diffusers", "transformers", "accelerate", "hidiff", "comfy") if m in sys.modules)
result = {"heavy_at_load": heavy_at_load, "v1": hasattr(module, "NODE_CLASS_MAPPINGS"),
          "v3": hasattr(module, "comfy_entrypoint")}
if result["v1"]:
    result["names"] = sorted(module.NODE_CLASS_MAPPINGS)
    result["display"] = module.NODE_DISPLAY_NAME_MAPPINGS
    result["categories"] = {k: v.CATEGORY for k, v in module.NODE_CLASS_MAPPINGS.items()}
if result["v3"]:
    import comfy.options
    comfy.options.enable_args_parsing()
    sys.argv = [sys.argv[0], "--cpu"]
    from comfy_api.latest import ComfyExtension
    extension = asyncio.run(module.comfy_entrypoint())
    schemas = [n.GET_SCHEMA() for n in asyncio.run(extension.get_node_list())]
    from comfy_extras.nodes_freelunch import FreeU_V2
    from comfy_extras.nodes_custom_sampler import KSamplerSelect
    core = [c.GET_SCHEMA().category if hasattr(c, "GET_SCHEMA") else c.CATEGORY for c in (FreeU_V2, KSamplerSelect)]
    result.update(extension=isinstance(extension, ComfyExtension), names=sorted(s.node_id for s in schemas),
                  display={s.node_id: s.display_name for s in schemas},
                  categories={s.node_id: s.category for s in schemas}, core_categories=core)
# after the entrypoint ComfyUI's own modules are in (transformers among them): only ours are checked
result["heavy"] = sorted(m for m in ("diffusers", "hidiff") if m in sys.modules)
print(json.dumps(result))
"""


def _load_pack(tmp_path, comfy_root: str) -> dict:
    folder = tmp_path / "custom_nodes" / "HiDiffusion.main"
    folder.parent.mkdir(exist_ok=True)
    if not folder.exists():
        folder.symlink_to(REPO)
    out = subprocess.run(
        [sys.executable, "-c", _LOADER, str(folder), comfy_root],
        capture_output=True,
        text=True,
        cwd=str(tmp_path),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_pack_registers_v3_nodes_through_comfy_entrypoint_in_comfyuis_own_categories(tmp_path):
    """With ComfyUI's V3 API present the pack exports comfy_entrypoint only (ComfyUI reads it only
    when NODE_CLASS_MAPPINGS is absent); any folder name works; loading imports neither diffusers
    nor a top-level hidiff; the categories are the ones ComfyUI gives its own FreeU / KSamplerSelect."""
    result = _load_pack(tmp_path, COMFY_ROOT)
    assert result["v3"] and not result["v1"] and result["extension"]
    assert result["heavy_at_load"] == [] and result["heavy"] == []
    assert result["names"] == ["HiDiffSamplerDDIMCFGpp", "HiDiffusion"]
    assert result["display"]["HiDiffusion"].startswith("HiDiffusion")
    patches, samplers = result["core_categories"]
    assert result["categories"] == {"HiDiffusion": patches, "HiDiffSamplerDDIMCFGpp": samplers}
    assert patches in ("model_patches/unet", "model/patch/unet")  # 0.3.75, 0.33


def test_pack_falls_back_to_v1_nodes_without_the_v3_api(tmp_path):
    """A ComfyUI without comfy_api (before V3) gets the same node ids as V1 classes."""
    result = _load_pack(tmp_path, "")
    assert result["v1"] and not result["v3"]
    assert result["names"] == ["HiDiffSamplerDDIMCFGpp", "HiDiffusion"] and result["heavy"] == []
    assert result["categories"]["HiDiffusion"] == "model_patches/unet"


def _v3_inputs():
    from hidiff.comfy.v3 import HiDiffusion

    schema = HiDiffusion.GET_SCHEMA()
    return {i.id: i for i in schema.inputs}


def test_v3_inputs_are_the_saved_workflow_inputs_with_library_defaults_and_tooltips():
    from hidiff.comfy.nodes import WIDGET_ORDER, config_from_widgets, widget_defaults
    from hidiff.comfy.v3 import HiDiffusion as V3
    from hidiff.core.config import HiDiffusionConfig, option_specs

    inputs = _v3_inputs()
    # saved UI workflows store widget values by position: the old inputs keep their names and order
    assert list(inputs)[: 1 + len(WIDGET_ORDER)] == ["model", *WIDGET_ORDER]
    assert all(i.tooltip for i in inputs.values())
    defaults = {name: i.default for name, i in inputs.items() if name != "model"}
    assert defaults == widget_defaults()
    assert config_from_widgets(**defaults) == HiDiffusionConfig()
    # every library option a ComfyUI user can set is an input (ControlNet runs in ComfyUI's own nodes)
    assert set(defaults) == {s.name for s in option_specs() if not s.name.startswith("controlnet")}
    # tooltips are the specs' help texts
    assert all(inputs[s.name].tooltip.startswith(s.help) for s in option_specs() if s.name in inputs)
    # V1 view of the V3 node (what /object_info serves): the same names and defaults
    required = V3.INPUT_TYPES()["required"]
    assert list(required) == list(inputs)
    assert {k: v[1]["default"] for k, v in required.items() if k != "model"} == defaults


def test_advanced_options_are_grouped_where_this_comfyui_supports_it():
    from comfy_api.latest import io

    from hidiff.comfy.v3 import takes_advanced
    from hidiff.core.config import option_specs

    inputs = _v3_inputs()
    flagged = {name for name, i in inputs.items() if i.as_dict().get("advanced")}
    if takes_advanced(io.Float.Input):  # ComfyUI 0.33 and newer
        assert flagged == {s.name for s in option_specs() if s.advanced and s.name in inputs}
        assert "raunet" not in flagged and "t1_ratio" in flagged
    else:  # 0.3.75: no such flag; every input stays a plain widget
        assert flagged == set()


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
        kv_downsample="2",
        kv_levels="2",
    )
    assert (cfg.preset, cfg.t1_ratio, cfg.t2_ratio, cfg.aggressive, cfg.window_seed) == (
        "sdxl-4096",
        0.6,
        0.2,
        False,
        7,
    )
    assert (cfg.window_shift, cfg.at_native, cfg.raunet) == ("reference", "apply", False)
    assert (cfg.kv_downsample, cfg.kv_levels) == (2, 2)
    with pytest.raises(TypeError, match="unknown HiDiffusion input.*bogus"):
        config_from_widgets(bogus=1)


@pytest.mark.patch_api
def test_v3_node_returns_a_clone_and_leaves_the_input_model_alone():
    from comfytest import build

    from hidiff.comfy.nodes import widget_defaults
    from hidiff.comfy.v3 import HiDiffusion

    patcher, _ = build("sd15")
    before = repr(patcher.model_options)
    result = HiDiffusion.execute(patcher, **widget_defaults())
    (out,) = result.result
    assert out is not patcher and out.model is patcher.model
    assert repr(patcher.model_options) == before and not getattr(patcher, "wrappers", {}).get("diffusion_model")
    assert out.wrappers["diffusion_model"]
