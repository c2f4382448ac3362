"""ControlNet and T2I-Adapter pipelines work under hidiff: residuals fit RAU-Net's features."""

import diffusers
import pytest
import torch
from helpers import small_native

import hidiff
from hidiff.diffusers.testing import tiny_components

STEPS = 10


def _controlnet(unet, seed):
    torch.manual_seed(seed)
    return diffusers.ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16, 16, 16)).eval()


def _pipe(family, n_controlnets=1, cls_name=None):
    components = tiny_components(family, **small_native(family))  # SDXL: native 512
    nets = [_controlnet(components["unet"], seed) for seed in range(n_controlnets)]
    components["controlnet"] = nets[0] if n_controlnets == 1 else nets
    if cls_name is None:
        cls_name = "StableDiffusionXLControlNetPipeline" if family == "sdxl" else "StableDiffusionControlNetPipeline"
    pipe = getattr(diffusers, cls_name)(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


class Probe:
    """Registered after hidiff's hooks, so it sees what the modules really receive."""

    def __init__(self, pipe):
        self.unet_residual_sizes, self.controlnet_sizes = [], []
        pipe.unet.register_forward_pre_hook(self.on_unet, with_kwargs=True)
        nets = pipe.controlnet.nets if hasattr(pipe.controlnet, "nets") else [pipe.controlnet]
        for net in nets:
            net.register_forward_pre_hook(self.on_controlnet, with_kwargs=True)

    def on_unet(self, module, args, kwargs):
        res = kwargs.get("down_block_additional_residuals")
        self.unet_residual_sizes.append(None if res is None else [tuple(r.shape[-2:]) for r in res])

    def on_controlnet(self, module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        self.controlnet_sizes.append(tuple(sample.shape[-2:]))


def _run(pipe, side, images, **extra):
    records = []

    def keep(p, i, t, kwargs):
        records.append(hidiff.last_call(p))
        return kwargs

    out = pipe(
        "one red circle",
        image=images,
        height=side,
        width=side,
        num_inference_steps=STEPS,
        guidance_scale=1.0,
        generator=torch.Generator().manual_seed(0),
        output_type="latent",
        callback_on_step_end=keep,
        **extra,
    )
    return out.images, records


def _control_image(side, n=1):
    g = torch.Generator().manual_seed(1)
    images = [torch.rand(1, 3, side, side, generator=g) for _ in range(n)]
    return images[0] if n == 1 else images


@pytest.mark.slow
@pytest.mark.parametrize("n_controlnets", [1, 2])
def test_sd_controlnet_residuals_follow_rau_net(n_controlnets):
    pipe = _pipe("sd15", n_controlnets)
    side = 640  # latent 80 > native 64
    stock, _ = _run(pipe, side, _control_image(side, n_controlnets))
    hidiff.apply_hidiffusion(pipe)
    probe = Probe(pipe)
    ours, records = _run(pipe, side, _control_image(side, n_controlnets))
    assert ours.shape == stock.shape == (1, 4, 80, 80)
    assert torch.isfinite(ours).all() and not torch.equal(ours, stock)
    assert hidiff.get_patch(pipe).controlnet_mode == "resize"
    patch = hidiff.get_patch(pipe)
    for rec, sizes in zip(records, probe.unet_residual_sizes):
        expected, _, _ = patch.feature_sizes(rec.latent, rec.conv, rec.pool)
        assert sizes == expected
    # the strided conv really shrank stage 1 in the early steps (ceil(80 / 4) = 20)
    assert records[0].conv and probe.unet_residual_sizes[0][3] == (20, 20)
    assert probe.unet_residual_sizes[-1][3] == (40, 40)
    # "resize" runs the ControlNet at full size
    assert set(probe.controlnet_sizes) == {(80, 80)}
    hidiff.remove_hidiffusion(pipe)
    back, _ = _run(pipe, side, _control_image(side, n_controlnets))
    assert torch.equal(back, stock)


@pytest.mark.slow
def test_sdxl_text2img_controlnet_runs_native_then_stops():
    pipe = _pipe("sdxl")
    side = 768  # latent 96, native 64
    stock, _ = _run(pipe, side, _control_image(side))
    hidiff.apply_hidiffusion(pipe)
    probe = Probe(pipe)
    ours, records = _run(pipe, side, _control_image(side))
    assert not torch.equal(ours, stock)
    assert ours.shape == (1, 4, 96, 96) and torch.isfinite(ours).all()
    assert records[0].preset == "sdxl-2048-controlnet"
    assert hidiff.get_patch(pipe).controlnet_mode == "native"
    active = int(STEPS * 0.6)
    # native size: 96 / 1.5 = 64, a multiple of 8; after the ControlNet phase its call is
    # made nearly free (the smallest map its two downsamplers take), and its residuals unused
    assert probe.controlnet_sizes == [(64, 64)] * active + [(4, 4)] * (STEPS - active)
    used = [sizes is not None for sizes in probe.unet_residual_sizes]
    assert used == [i < active for i in range(STEPS)]
    patch = hidiff.get_patch(pipe)
    for rec, sizes in zip(records[:active], probe.unet_residual_sizes[:active]):
        assert sizes == patch.feature_sizes(rec.latent, rec.conv, rec.pool)[0]
    hidiff.remove_hidiffusion(pipe)
    back, _ = _run(pipe, side, _control_image(side))
    assert torch.equal(back, stock)


@pytest.mark.slow
def test_controlnet_mode_can_be_forced():
    pipe = _pipe("sdxl")
    hidiff.apply_hidiffusion(pipe, controlnet="resize")
    probe = Probe(pipe)
    _run(pipe, 768, _control_image(768))
    assert set(probe.controlnet_sizes) == {(96, 96)}
    assert all(sizes is not None for sizes in probe.unet_residual_sizes)


_CONTROLNET_TASK_PIPELINES = {
    ("sd15", "img2img"): "StableDiffusionControlNetImg2ImgPipeline",
    ("sd15", "inpaint"): "StableDiffusionControlNetInpaintPipeline",
    ("sdxl", "img2img"): "StableDiffusionXLControlNetImg2ImgPipeline",
    ("sdxl", "inpaint"): "StableDiffusionXLControlNetInpaintPipeline",
}


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd15", "sdxl"])
@pytest.mark.parametrize("task", ["img2img", "inpaint"])
def test_controlnet_img2img_and_inpaint(family, task):
    import numpy as np
    from PIL import Image

    pipe = _pipe(family, cls_name=_CONTROLNET_TASK_PIPELINES[(family, task)])
    if family == "sdxl":
        pipe.register_to_config(requires_aesthetics_score=False)
    side = 640  # 1.25x native (SD: 512, SDXL here: 512)
    rng = np.random.default_rng(0)
    init = Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8))
    extra = dict(control_image=_control_image(side), strength=0.6)
    if task == "inpaint":
        mask = np.zeros((side, side), dtype=np.uint8)
        mask[side // 6 : side // 2, side // 6 : side // 2] = 255
        extra["mask_image"] = Image.fromarray(mask)
    stock, _ = _run(pipe, side, init, **extra)
    hidiff.apply_hidiffusion(pipe)
    probe = Probe(pipe)
    out, records = _run(pipe, side, init, **extra)
    assert out.shape == stock.shape == (1, 4, side // 8, side // 8) and torch.isfinite(out).all()
    assert not torch.equal(out, stock)
    assert [r.step for r in records] == list(range(6))  # strength 0.6 of 10 steps
    # SD: the strided conv acts first; SDXL (6 steps: no conv phase): the pool does
    assert records[0].conv if family == "sd15" else records[0].pool
    assert hidiff.get_patch(pipe).controlnet_mode == "resize"
    assert set(probe.controlnet_sizes) == {(side // 8, side // 8)}
    patch = hidiff.get_patch(pipe)
    for rec, sizes in zip(records, probe.unet_residual_sizes):
        assert sizes == patch.feature_sizes(rec.latent, rec.conv, rec.pool)[0]
    windows = 5 if family == "sd15" else 10
    assert all(r.window_calls == windows for r in records)
    hidiff.remove_hidiffusion(pipe)
    back, _ = _run(pipe, side, init, **extra)
    assert torch.equal(back, stock)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_t2i_adapter_residuals_follow_rau_net(family):
    components = tiny_components(family, **small_native(family))
    torch.manual_seed(0)
    if family == "sdxl":
        adapter = diffusers.T2IAdapter(
            in_channels=3,
            channels=[32, 64, 64, 64],
            num_res_blocks=1,
            downscale_factor=16,
            adapter_type="full_adapter_xl",
        )
        pipe = diffusers.StableDiffusionXLAdapterPipeline(adapter=adapter, **components)
        side = 640  # latent 80 > native 64
    else:
        for key in ("safety_checker", "feature_extractor"):
            components.pop(key)
        adapter = diffusers.T2IAdapter(
            in_channels=3, channels=[32, 64, 64, 64], num_res_blocks=1, downscale_factor=8, adapter_type="full_adapter"
        )
        pipe = diffusers.StableDiffusionAdapterPipeline(
            adapter=adapter, safety_checker=None, feature_extractor=None, **components
        )
        side = 640  # latent 80 > native 64
    pipe.set_progress_bar_config(disable=True)
    control = _control_image(side)

    def run():  # the adapter pipelines take no callback_on_step_end
        return pipe(
            "one red circle",
            image=control,
            height=side,
            width=side,
            num_inference_steps=5,
            guidance_scale=1.0,
            generator=torch.Generator().manual_seed(0),
            output_type="latent",
        ).images

    computed = []  # what the adapter made (registered before hidiff's hook: sees the input)
    pipe.unet.register_forward_pre_hook(
        lambda m, a, kw: computed.append([tuple(r.shape[-2:]) for r in kw["down_intrablock_additional_residuals"]]),
        with_kwargs=True,
    )
    stock = run()
    hidiff.apply_hidiffusion(pipe)
    given, records = [], []  # registered after hidiff's hook: sees what the U-Net really gets

    def probe(module, args, kwargs):
        given.append([tuple(r.shape[-2:]) for r in kwargs["down_intrablock_additional_residuals"]])
        records.append(hidiff.last_call(pipe))

    pipe.unet.register_forward_pre_hook(probe, with_kwargs=True)
    ours = run()
    assert ours.shape == stock.shape == (1, 4, side // 8, side // 8) and torch.isfinite(ours).all()
    assert not torch.equal(ours, stock)
    patch = hidiff.get_patch(pipe)
    shrunk = [r.conv or r.pool for r in records]
    assert shrunk[0] and not shrunk[-1]  # RAU-Net acted early and not late
    for rec, sizes, made in zip(records, given, computed[len(records) :]):
        expected = patch.feature_sizes(rec.latent, rec.conv, rec.pool)[2]
        assert sizes == expected[: len(made)]
    # the adapter computes at full size; the U-Net got a shrunk stage while RAU-Net acted
    assert computed[len(records)] == computed[0] and given[0] != computed[0] and given[-1] == computed[0]
    hidiff.remove_hidiffusion(pipe)
    assert torch.equal(run(), stock)
