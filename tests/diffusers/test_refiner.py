"""The SDXL refiner, the family added by one registry record (docs/architecture.md): read
from a diffusers U-Net, patched at SDXL's places, removed exactly."""

from __future__ import annotations

import torch
from helpers import assert_untouched, snapshot

import hidiff
from hidiff.diffusers.patch import changes
from hidiff.diffusers.testing import make_unet, tiny_pipeline, tiny_unet_config


def test_refiner_is_its_own_family():
    unet = make_unet(tiny_unet_config("sdxl-refiner"))
    arch = hidiff.detect_layout(unet)
    assert (arch.family, arch.kind, arch.num_stages) == ("sdxl-refiner", "sdxl", 4)
    assert (arch.conv_stage, arch.pool_stage, arch.window_stage) == (1, 1, 1)
    names = changes(unet)
    assert "down_blocks.1.downsamplers.0" in names and "up_blocks.2.attentions.1" in names
    assert all(".attn1" not in n or n.startswith(("down_blocks.1.", "up_blocks.2.")) for n in names)


def _run(pipe, image, records=None):
    def keep(p, i, t, kwargs):
        if records is not None:
            records.append(hidiff.last_call(p))
        return kwargs

    generator = torch.Generator().manual_seed(0)
    return pipe(
        "a lighthouse",
        image=image,
        strength=1.0,
        num_inference_steps=10,  # the conv phase is int(0.16 x steps) long: one step of 10
        generator=generator,
        output_type="latent",
        callback_on_step_end=keep,
    ).images


def test_refiner_img2img_at_2x_and_removal():
    pipe = tiny_pipeline("sdxl-refiner", "img2img", sample_size=8)
    image = torch.rand(1, 3, 136, 128, generator=torch.Generator().manual_seed(1))  # latent 17x16: odd
    before = snapshot(pipe.unet)
    stock = _run(pipe, image)
    hidiff.apply_hidiffusion(pipe)
    records = []
    patched = _run(pipe, image, records)
    assert {r.preset for r in records} == {"sdxl-2048"}
    assert records[0].conv and records[0].skip_sizes[2] == (3, 2)  # stride 4 at stage 1: 9x8 -> 3x2
    assert any(r.pool for r in records) and records[-1].conv is False and records[-1].pool is False
    # windows at stage 1 (9x8); while pooling, the maps after the pool are 5x4
    assert all(
        r.window_calls == 5 and set(r.window_maps) == ({(9, 8), (5, 4)} if r.pool else {(9, 8)}) for r in records
    )
    assert not torch.allclose(stock, patched)
    hidiff.remove_hidiffusion(pipe)
    assert_untouched(pipe.unet, before)
    assert torch.equal(_run(pipe, image), stock)
