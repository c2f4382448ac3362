"""Other model patches ComfyUI ships, before or after the HiDiffusion node: both act, nothing breaks."""

from __future__ import annotations

import pytest
import torch
from comfytest import NATIVE, Recorder, build, sample

pytestmark = pytest.mark.patch_api


def hidiffusion(model, rec):
    from hidiff.comfy.patch import apply_hidiffusion

    return apply_hidiffusion(model, recorder=rec, native=(NATIVE, NATIVE))


def freeu(model):
    from comfy_extras.nodes_freelunch import FreeU_V2

    return FreeU_V2().patch(model, 1.3, 1.4, 0.9, 0.2)[0]


def deep_shrink(model):
    from comfy_extras.nodes_model_downscale import PatchModelAddDownscale

    out = PatchModelAddDownscale.execute(model, 3, 2.0, 0.0, 0.35, True, "bicubic", "bicubic")
    return out.result[0] if hasattr(out, "result") else out[0]


def sag(model):
    from comfy_extras.nodes_sag import SelfAttentionGuidance

    out = (
        SelfAttentionGuidance.execute(model, 0.5, 2.0)
        if hasattr(SelfAttentionGuidance, "execute")
        else SelfAttentionGuidance().patch(model, 0.5, 2.0)
    )
    return out.result[0] if hasattr(out, "result") else out[0]


OTHERS = {"freeu_v2": freeu, "deep_shrink": deep_shrink, "sag": sag}


@pytest.mark.parametrize("order", ["other-first", "hidiff-first"])
@pytest.mark.parametrize("other", list(OTHERS))
def test_other_patch_composes(other, order):
    patcher, _ = build("sd15")
    cfg = 2.0  # SAG acts through guidance
    rec = Recorder()
    alone = sample(hidiffusion(patcher, Recorder()), "sd15", (64, 64), steps=3, cfg=cfg)
    patch = OTHERS[other]
    model = hidiffusion(patch(patcher), rec) if order == "other-first" else patch(hidiffusion(patcher, rec))
    out = sample(model, "sd15", (64, 64), steps=3, cfg=cfg)
    assert torch.isfinite(out).all() and out.shape == alone.shape
    assert rec and rec[0].plan.conv and len(rec[0].windows) == 5  # HiDiffusion still acted
    assert float((out - alone).abs().max()) > 1e-4  # ... and so did the other patch
