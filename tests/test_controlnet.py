"""ControlNet and T2I-Adapter pipelines work under hidiff: residuals fit RAU-Net's features."""

import pytest
import torch

import diffusers
import hidiff
from hidiff.testing import tiny_components

STEPS = 10


def _controlnet(unet, seed):
    torch.manual_seed(seed)
    return diffusers.ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16, 16, 16)).eval()


def _pipe(family, n_controlnets=1, cls_name=None):
    components = tiny_components(family)
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

    out = pipe("one red circle", image=images, height=side, width=side, num_inference_steps=STEPS,
               guidance_scale=1.0, generator=torch.Generator().manual_seed(0), output_type="latent",
               callback_on_step_end=keep, **extra)
    return out.images, records


def _control_image(side, n=1):
    g = torch.Generator().manual_seed(1)
    images = [torch.rand(1, 3, side, side, generator=g) for _ in range(n)]
    return images[0] if n == 1 else images


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
    assert hidiff.get_patch(pipe)._controlnet_mode() == "resize"
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


def test_sdxl_text2img_controlnet_runs_native_then_stops():
    pipe = _pipe("sdxl")
    side = 1536  # latent 192, native 128
    hidiff.apply_hidiffusion(pipe)
    probe = Probe(pipe)
    ours, records = _run(pipe, side, _control_image(side))
    assert ours.shape == (1, 4, 192, 192) and torch.isfinite(ours).all()
    assert records[0].preset == "sdxl-2048-controlnet"
    assert hidiff.get_patch(pipe)._controlnet_mode() == "native"
    # native size: 192 / 1.5 = 128, a multiple of 8
    assert set(probe.controlnet_sizes) == {(128, 128)}
    active = int(STEPS * 0.6)
    used = [sizes is not None for sizes in probe.unet_residual_sizes]
    assert used == [i < active for i in range(STEPS)]
    patch = hidiff.get_patch(pipe)
    for rec, sizes in zip(records[:active], probe.unet_residual_sizes[:active]):
        assert sizes == patch.feature_sizes(rec.latent, rec.conv, rec.pool)[0]


def test_controlnet_mode_can_be_forced():
    pipe = _pipe("sdxl")
    hidiff.apply_hidiffusion(pipe, controlnet="resize")
    probe = Probe(pipe)
    _run(pipe, 1536, _control_image(1536))
    assert set(probe.controlnet_sizes) == {(192, 192)}
    assert all(sizes is not None for sizes in probe.unet_residual_sizes)


@pytest.mark.parametrize("task", ["img2img", "inpaint"])
def test_sd_controlnet_img2img_and_inpaint(task):
    from PIL import Image
    import numpy as np

    cls = {"img2img": "StableDiffusionControlNetImg2ImgPipeline",
           "inpaint": "StableDiffusionControlNetInpaintPipeline"}[task]
    pipe = _pipe("sd15", cls_name=cls)
    side = 640
    rng = np.random.default_rng(0)
    init = Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8))
    extra = dict(control_image=_control_image(side), strength=0.6)
    if task == "inpaint":
        mask = np.zeros((side, side), dtype=np.uint8)
        mask[100:400, 100:400] = 255
        extra["mask_image"] = Image.fromarray(mask)
    hidiff.apply_hidiffusion(pipe)
    probe = Probe(pipe)
    out, records = _run(pipe, side, init, **extra)
    assert out.shape == (1, 4, 80, 80) and torch.isfinite(out).all()
    assert [r.step for r in records] == list(range(6)) and records[0].conv
    patch = hidiff.get_patch(pipe)
    for rec, sizes in zip(records, probe.unet_residual_sizes):
        assert sizes == patch.feature_sizes(rec.latent, rec.conv, rec.pool)[0]


def test_t2i_adapter_residuals_follow_rau_net():
    components = tiny_components("sd15")
    for key in ("safety_checker", "feature_extractor"):
        components.pop(key)
    torch.manual_seed(0)
    adapter = diffusers.T2IAdapter(in_channels=3, channels=[32, 64, 64, 64], num_res_blocks=1,
                                   downscale_factor=8, adapter_type="full_adapter")
    pipe = diffusers.StableDiffusionAdapterPipeline(adapter=adapter, safety_checker=None,
                                                    feature_extractor=None, **components)
    pipe.set_progress_bar_config(disable=True)
    seen = []
    pipe.unet.register_forward_pre_hook(
        lambda m, a, kw: seen.append([tuple(r.shape[-2:]) for r in kw["down_intrablock_additional_residuals"]]),
        with_kwargs=True,
    )
    hidiff.apply_hidiffusion(pipe)
    # hidiff's pre-hook was registered after the probe: probe the blocks for what they get
    got = []
    block = pipe.unet.down_blocks[1]
    block.register_forward_pre_hook(
        lambda m, a, kw: got.append(tuple(kw["additional_residuals"].shape[-2:])), with_kwargs=True
    )
    out = pipe("one red circle", image=_control_image(640), height=640, width=640, num_inference_steps=STEPS,
               guidance_scale=1.0, output_type="latent").images
    assert out.shape == (1, 4, 80, 80) and torch.isfinite(out).all()
    assert seen[0][1] == (40, 40)  # computed at full size by the adapter
    # stage 1 shrank to ceil(80 / 4) = 20 while the conv path was active (steps < 4)
    assert got[:4] == [(20, 20)] * 4 and got[4:] == [(40, 40)] * (STEPS - 4)
