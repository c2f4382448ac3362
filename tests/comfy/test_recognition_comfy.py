"""Recognition matches a family's whole structure in the ComfyUI host too (issue 27, fault 3):
ComfyUI's own SD x4 upscaler and an SD-layout model with class labels are refused before
anything is patched; the families are still recognised (tests/comfy/test_structure.py)."""

from __future__ import annotations

import copy

import pytest
import torch

from hidiff.comfy.testing import TINY, accepted, seed_weights, unet_config
from hidiff.core.architecture import UnsupportedModelError


def patcher(supported_class, config):
    import comfy.model_patcher

    supported = supported_class(accepted(copy.deepcopy(config)))
    supported.set_inference_dtype(torch.float32, None)
    cpu = torch.device("cpu")
    model = supported.get_model({}, "", device=cpu)
    seed_weights(model.diffusion_model, 0)
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


def test_comfyuis_x4_upscaler_is_refused():
    import comfy.supported_models as sm

    from hidiff.comfy.structure import describe

    # ComfyUI's SD_X4Upscaler: attention from stage 1 down to the deepest, the first three
    # cross-only (disable_self_attentions), 7 input channels, the noise level as a class label
    config = unet_config(
        "sd15",
        in_channels=7,
        context_dim=TINY["context_dim"],
        transformer_depth=[0, 0, 1, 1, 1, 1, 1, 1],
        transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
        use_linear_in_transformer=True,
        disable_self_attentions=[True, True, True, False],
        num_classes=1000,
    )
    with pytest.raises(UnsupportedModelError) as info:
        describe(patcher(sm.SD_X4Upscaler, config))
    # ComfyUI's cross-only blocks count as no text cross-attention: only stage 3 is left
    assert str(info.value).startswith(
        "SD_X4Upscaler has 4 down stages with cross-attention at stages [3], a layout HiDiffusion has no record for"
    )
    assert str(info.value).endswith("or run this model without HiDiffusion.")


def test_an_sd_layout_with_class_labels_is_refused_naming_them():
    import comfy.supported_models as sm

    from hidiff.comfy.structure import describe

    with pytest.raises(UnsupportedModelError, match="its time embedding takes class labels"):
        describe(patcher(sm.SD15, unet_config("sd15", num_classes=10)))
