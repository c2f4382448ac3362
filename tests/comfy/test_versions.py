"""Feature detection: the node runs where ComfyUI has its patch APIs and refuses clearly where not."""

import pytest
from comfytest import build, patch_api


def test_node_on_this_comfyui():
    from hidiff.comfy.nodes import HiDiffusion, widget_defaults
    from hidiff.comfy.patch import ComfyVersionError, check_comfy_api

    patcher, _ = build("sd15")
    if patch_api():
        check_comfy_api(patcher)
        (out,) = HiDiffusion().apply(patcher, **widget_defaults())
        assert out is not patcher
    else:
        with pytest.raises(ComfyVersionError, match=r"this ComfyUI lacks: add_wrapper_with_key.*Update ComfyUI"):
            HiDiffusion().apply(patcher, **widget_defaults())
