"""ComfyUI node pack entry: ``git clone`` this repository into ``ComfyUI/custom_nodes/``.

ComfyUI imports this file as a package under a name of its own choosing (the folder's
path), so the hidiff package is loaded relative to this file, under this package's name:
``hidiff/__init__.py`` (the diffusers library API) is not run, and nothing heavier than
torch is imported. An installed ``hidiff`` library, if any, is not touched.

ComfyUI with the V3 node API (0.3.4x and newer) gets ``comfy_entrypoint`` (hidiff/comfy/v3.py);
an older one gets the V1 ``NODE_CLASS_MAPPINGS`` (hidiff/comfy/nodes.py). Same node ids and
inputs either way.
"""

import importlib.machinery
import importlib.util
import os
import sys
import types

_name = f"{__name__}.hidiff"
if _name not in sys.modules:
    # The hidiff folder as a bare package (no __init__ run): its submodules import each
    # other relatively (hidiff.comfy -> hidiff.core), which is all the nodes need.
    _path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hidiff")
    _package = types.ModuleType(_name, "hidiff, loaded for ComfyUI without its diffusers API")
    _package.__path__ = [_path]
    _package.__spec__ = importlib.machinery.ModuleSpec(_name, None, is_package=True)
    _package.__spec__.submodule_search_locations = [_path]
    sys.modules[_name] = _package


def _has_v3_api() -> bool:
    """Whether this ComfyUI has the V3 node API (``comfy_api.latest``), looked up without importing it."""
    try:
        spec = importlib.util.find_spec("comfy_api")
    except (ImportError, ValueError):
        return False
    roots = list(spec.submodule_search_locations or []) if spec is not None else []
    return any(os.path.isfile(os.path.join(root, "latest", "_io.py")) for root in roots)


if _has_v3_api():
    # V3: ComfyUI reads comfy_entrypoint only when a pack has no NODE_CLASS_MAPPINGS.

    async def comfy_entrypoint():
        from .hidiff.comfy.v3 import comfy_entrypoint as entrypoint

        return await entrypoint()

    __all__ = ["comfy_entrypoint"]
else:
    # An older ComfyUI (before the V3 API): the same nodes in the V1 form.
    from .hidiff.comfy.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: F401

    __all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
