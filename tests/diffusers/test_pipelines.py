"""Text-to-image, img2img and inpainting of each family work under hidiff, at every size."""

import numpy as np
import pytest
import torch
from helpers import latents_of, small_native
from PIL import Image

import hidiff
from hidiff.diffusers.testing import tiny_pipeline


def _image(size, seed=0, mask=False):
    rng = np.random.default_rng(seed)
    h, w = size
    if mask:
        array = np.zeros((h, w), dtype=np.uint8)
        array[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = 255
        return Image.fromarray(array)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


def _records(pipe, **call):
    records = []

    def keep(p, i, t, kwargs):
        records.append(hidiff.last_call(p))
        return kwargs

    out = pipe(
        prompt="one red circle",
        generator=torch.Generator().manual_seed(0),
        output_type="latent",
        callback_on_step_end=keep,
        **call,
    )
    return out.images, records


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd15", "sdxl"])
@pytest.mark.parametrize("task", ["text2img", "img2img", "inpaint"])
def test_task_acts_and_keeps_shape(family, task):
    pipe = tiny_pipeline(family, task, **small_native(family))
    side = int(8 * pipe.unet.config.sample_size * 1.25)  # 640 px, above native
    call = dict(height=side, width=side, num_inference_steps=10, guidance_scale=1.0)
    if task != "text2img":
        call.update(image=_image((side, side)), strength=0.6)
    if task == "inpaint":
        call.update(mask_image=_image((side, side), mask=True))
    stock, _ = _records(pipe, **call)
    hidiff.apply_hidiffusion(pipe)
    ours, records = _records(pipe, **call)
    assert ours.shape == stock.shape == (1, 4, side // 8, side // 8)
    assert torch.isfinite(ours).all()
    run = 10 if task == "text2img" else 6  # strength 0.6 of 10 steps
    assert [r.step for r in records] == list(range(run))
    assert {r.total for r in records} == {run}
    expected_windows = 5 if family == "sd15" else 10  # attn1 layers of the windowed stages
    assert all(r.window_calls == expected_windows for r in records)
    preset = hidiff.PRESETS[records[0].preset]
    t1 = int(run * preset.t1_ratio)
    if family == "sd15":
        assert preset.name == "sd-1024"
        assert [r.conv for r in records] == [i < t1 for i in range(run)]
    else:
        # inpainting pipelines take the gentle SDXL schedule (pool from step 0), as published
        assert preset.name == ("sdxl-2048-gentle" if task == "inpaint" else "sdxl-2048")
        start = 0 if task == "inpaint" else int(run * 8 / 50)
        assert [r.pool for r in records] == [start <= i < t1 for i in range(run)]
    assert not torch.equal(ours, stock)
    hidiff.remove_hidiffusion(pipe)
    back, _ = _records(pipe, **call)
    assert torch.equal(back, stock)


SD_SIZES = [(1024, 1024), (1536, 1024), (1344, 768), (1080, 1920), (2048, 1152), (2040, 2040)]
SDXL_SIZES = [(2048, 2048), (1536, 2560), (2040, 1024)]


def _unet_call(unet, height, width, text_dim, added=None):
    torch.manual_seed(0)
    sample = torch.randn(1, 4, height // 8, width // 8)
    context = torch.randn(1, 77, text_dim)
    with torch.no_grad():
        return unet(sample, 500, encoder_hidden_states=context, added_cond_kwargs=added).sample


@pytest.mark.slow
@pytest.mark.parametrize("family,sizes", [("sd15", SD_SIZES), ("sdxl", SDXL_SIZES)])
def test_every_size_with_both_rau_paths_and_windows(family, sizes):
    """Both RAU-Net paths at once (the deepest shrink) and windows on odd maps, at every listed size."""
    pipe = tiny_pipeline(family)
    unet = pipe.unet
    preset = "sd-2048" if family == "sd15" else "sdxl-4096"
    hidiff.apply_hidiffusion(unet, preset=preset, t1_ratio=1.0, t2_ratio=1.0)
    added = None
    if family == "sdxl":
        added = {"text_embeds": torch.randn(1, 32), "time_ids": torch.tensor([[2048.0, 2048, 0, 0, 2048, 2048]])}
    up = lambda n, d: -(-n // d)  # noqa: E731  (ceil division)
    for height, width in sizes:
        out = _unet_call(unet, height, width, unet.config.cross_attention_dim, added)
        rec = hidiff.last_call(unet)
        h, w = height // 8, width // 8
        assert out.shape == (1, 4, h, w), (height, width)
        assert torch.isfinite(out).all()
        assert rec.conv and rec.pool and rec.windows, (height, width)
        # windowed maps are the stages' true sizes, odd or even (nothing resized)
        if family == "sd15":
            # stage 0 windows at full size; the strided conv quarters stage 1, then it is pooled
            assert set(rec.window_maps) == {(h, w)}
            assert rec.skip_sizes[1] == (up(up(h, 4), 2), up(up(w, 4), 2))
        else:
            # stage 1 windows at half size, and at its pooled size after the first pair,
            # which is what its (strided) downsampler then receives
            s1 = (up(h, 2), up(w, 2))
            pooled = (up(s1[0], 2), up(s1[1], 2))
            assert set(rec.window_maps) == {s1, pooled}
            assert rec.pooled_from == s1 and rec.skip_sizes[1] == pooled


def test_odd_window_map_is_handled_without_resize(sd_pipe):
    """1080 px gives a 135-row latent: windows of 68 and 67 rows, padded and masked."""
    hidiff.apply_hidiffusion(sd_pipe, raunet=False)
    out = latents_of(sd_pipe, 1080, 520, steps=1, guidance_scale=1.0)
    rec = hidiff.last_call(sd_pipe)
    assert out.shape == (1, 4, 135, 65)
    assert set(rec.window_maps) == {(135, 65)} and rec.window_calls == 5
    assert torch.isfinite(out).all()


@pytest.mark.slow
def test_saved_model_loads_and_patches(tmp_path):
    """The real loading code: a pipeline saved to a folder and loaded with from_pretrained."""
    from diffusers import StableDiffusionPipeline

    tiny_pipeline("sd15").save_pretrained(tmp_path / "model")
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "model", safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    hidiff.apply_hidiffusion(pipe)
    out = latents_of(pipe, 768, 768, steps=3)
    assert out.shape == (1, 4, 96, 96)
    assert hidiff.last_call(pipe).window_calls == 5
