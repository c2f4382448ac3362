"""Which network a ComfyUI model is, read from ComfyUI's own objects (any ComfyUI version)."""

from __future__ import annotations

import pytest
from comfytest import build


@pytest.mark.parametrize(
    "family,overrides,model_type,want",
    [
        ("sd15", {"context_dim": 768}, None, ("sd1", (64, 64))),
        ("sd2", {}, "EPS", ("sd2", (64, 64))),
        ("sd2", {}, "V_PREDICTION", ("sd2", (96, 96))),
        ("sdxl", {}, None, ("sdxl", (128, 128))),
        ("sd15", {"in_channels": 9}, None, ("sd", (64, 64))),
        ("sdxl-refiner", {}, None, ("sdxl-refiner", (128, 128))),
    ],
    ids=["sd1", "sd2-eps", "sd2-v", "sdxl", "sd-inpainting", "sdxl-refiner"],
)
def test_family_and_native_size_from_structure(family, overrides, model_type, want):
    from hidiff.comfy.structure import describe

    patcher, _ = build(family, model_type=model_type, **overrides)
    net = describe(patcher)
    assert (net.architecture.family, net.architecture.native) == want
    assert net.architecture.inpainting == (overrides.get("in_channels") == 9)
    b = net.blocks
    if want[0] == "sdxl-refiner":
        assert (b.conv_block, b.pool_block, b.unpool_block) == (6, 4, 8)
        assert [w[1] for w in b.windowed] == [4, 5, 6, 7, 8]
    elif family == "sdxl":
        assert (b.conv_block, b.pool_block, b.unpool_block) == (6, 4, 5)
        assert b.windowed == (("input", 4, 0), ("input", 5, 0), ("output", 3, 0), ("output", 4, 0), ("output", 5, 0))
    else:
        assert (b.conv_block, b.pool_block, b.unpool_block) == (3, 4, 8)
        assert [w[1] for w in b.windowed] == [1, 2, 9, 10, 11]
