"""ComfyUI node pack entry: ``git clone`` this repository into ``ComfyUI/custom_nodes/``.

ComfyUI imports this file as a package under a name of its own choosing (the folder's
path), so the hidiff package is loaded relative to this file, under this package's name:
``hidiff/__init__.py`` (the diffusers library API) is not run, and nothing heavier than
torch is imported. An installed ``hidiff`` library, if any, is not touched.
"""

import importlib.machinery
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

from .hidiff.comfy.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
