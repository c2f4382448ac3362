"""ControlNet as AUTOMATIC1111's sd-webui-controlnet runs it, with the WebUI backend installed.

sd-webui-controlnet does not hand residuals to the U-Net: it replaces the U-Net module's
``forward`` on the instance with its own loop over ``input_blocks`` / ``middle_block`` /
``output_blocks`` (each block called as ``block(h, emb, context)``) and adds each residual
itself, resizing one whose size differs from the feature it meets (nearest). HiDiffusion's
hooks sit on the layers inside the blocks (and on the U-Net module, whose hooks run
whatever ``forward`` is), so they act under that loop too. Shown here on ComfyUI's ldm
U-Net (the layout A1111 runs) with a forward written the way such an extension drives the
blocks: with zero residuals it gives what the stock forward gives with HiDiffusion; with
residuals every one of them is added to the shrunk features and changes the result.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from comfytest import HAVE_COMFY, NATIVE, conds

pytestmark = pytest.mark.skipif(not HAVE_COMFY, reason="needs the ComfyUI venv (.comfy) for an ldm-layout U-Net")


def block_driving_forward(residuals: list, added: list):
    """A U-Net ``forward`` that runs the blocks itself and adds ``residuals`` (one per skip, in
    input-block order, then the middle one), resized to the feature they meet when it differs."""
    from comfy.ldm.modules.diffusionmodules.util import timestep_embedding

    def add(feature: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        added.append((tuple(feature.shape[-2:]), tuple(residual.shape[-2:])))
        if residual.shape[-2:] != feature.shape[-2:]:
            residual = F.interpolate(residual, size=feature.shape[-2:], mode="nearest")
        return feature + residual

    def forward(self, x, timesteps=None, context=None, y=None, **kwargs):
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels, repeat_only=False).to(x.dtype))
        if y is not None:
            emb = emb + self.label_emb(y)
        skips, h = [], x
        for block in self.input_blocks:
            h = block(h, emb, context)
            skips.append(h)
        h = add(self.middle_block(h, emb, context), residuals[-1])
        for block in self.output_blocks:
            skip = add(skips.pop(), residuals[len(skips)])
            h = block(torch.cat([h, skip], dim=1), emb, context)
        return self.out(h.type(x.dtype))

    return forward


def test_a_forward_replaced_by_another_extension_still_gets_hidiffusion():
    from test_cross_host import scheduler, twin_models

    from hidiff.core.config import HiDiffusionConfig
    from hidiff.core.ops import image_seeds
    from hidiff.webui.patch import SamplingRun
    from hidiff.webui.structure import describe

    _, patcher = twin_models("sd15")
    model = patcher.model
    unet = model.diffusion_model
    x = torch.randn(1, 4, 2 * NATIVE, 2 * NATIVE, generator=torch.Generator().manual_seed(5))
    context = conds("sd15", 16 * NATIVE, 16 * NATIVE)[0][0][0]
    sigmas = [float(s) for s in scheduler(3).sigmas]

    # The stock sizes of the skips and the middle feature, where a ControlNet makes its residuals.
    # (On each block's last layer: ComfyUI's forward runs a block's layers one by one.)
    sizes = []
    blocks = [*unet.input_blocks, unet.middle_block]
    hooks = [b[-1].register_forward_hook(lambda m, a, out: sizes.append(out.shape)) for b in blocks]
    with torch.no_grad():
        model.apply_model(x, torch.tensor([sigmas[0]]), c_crossattn=context)
    for h in hooks:
        h.remove()
    g = torch.Generator().manual_seed(9)
    stock_residuals = [0.5 * torch.randn(s, generator=g) for s in sizes]
    network = describe(unet)
    network = dataclasses.replace(
        network, architecture=dataclasses.replace(network.architecture, native=(NATIVE, NATIVE))
    )

    def call(residuals=None):
        """One U-Net call at the first sigma with HiDiffusion installed; ``residuals``: through the
        replaced forward (put on the instance and taken off again, as the extension does)."""
        records, added = [], []
        run = SamplingRun(
            unet, network, HiDiffusionConfig(window_seed=1), sigmas, image_seeds(x), recorder=records.append
        )
        if residuals is not None:
            unet.forward = block_driving_forward(residuals, added).__get__(unet)
        run.install()
        try:
            run.level = sigmas[0]
            with torch.no_grad():
                out = model.apply_model(x, torch.tensor([sigmas[0]]), c_crossattn=context)
        finally:
            run.remove()
            unet.__dict__.pop("forward", None)
        return out, records[0], added

    stock_forward, stock_record, _ = call()
    zero, zero_record, _ = call([torch.zeros_like(r) for r in stock_residuals])
    controlled, record, added = call(stock_residuals)

    # HiDiffusion acted under the replaced forward as under the stock one ...
    assert record.conv and record.conv_out == stock_record.conv_out
    assert zero_record.window_calls == stock_record.window_calls == 5
    torch.testing.assert_close(zero, stock_forward, rtol=0, atol=1e-5)
    # ... every residual met a feature at the size RAU-Net gave it (the shrunk stages included) ...
    assert len(added) == len(stock_residuals)
    shrunk = [(feature, made) for feature, made in added if feature != made]
    assert shrunk, "no residual met a shrunk feature: RAU-Net did not act"
    assert sorted(f for f, _ in added[1:]) == sorted(record.plan.skip_sizes)
    assert added[0][0] == record.plan.mid_size
    # ... and the residuals changed the result.
    assert float((controlled - zero).abs().max()) > 1e-3
    # Nothing left on the model.
    assert not any("forward" in m.__dict__ for m in unet.modules())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in unet.modules())


def test_sdxl_with_a_controlnet_gets_the_published_controlnet_preset():
    """The published schedule has its own preset for SDXL text-to-image with a ControlNet
    (``sdxl-2048-controlnet``), as the diffusers and ComfyUI hosts choose it: Forge and reForge
    say per call (the U-Net's ``control`` argument), A1111's host per run (``controlnet=True``);
    img2img keeps the plain preset."""
    from test_cross_host import scheduler, twin_models

    from hidiff.core.config import HiDiffusionConfig
    from hidiff.core.ops import image_seeds
    from hidiff.webui.patch import SamplingRun
    from hidiff.webui.structure import describe

    _, patcher = twin_models("sdxl")
    model = patcher.model
    unet = model.diffusion_model
    x = torch.randn(1, 4, 2 * NATIVE, 2 * NATIVE, generator=torch.Generator().manual_seed(6))
    positive, _ = conds("sdxl", 16 * NATIVE, 16 * NATIVE)
    y = model.encode_adm(**positive[0][1])
    network = describe(unet)
    network = dataclasses.replace(
        network, architecture=dataclasses.replace(network.architecture, native=(NATIVE, NATIVE))
    )
    sigmas = [float(s) for s in scheduler(8).sigmas]  # more steps than the few-step (Turbo) preset's

    def preset(control, **run_options):
        records = []
        run = SamplingRun(
            unet, network, HiDiffusionConfig(), sigmas, image_seeds(x), recorder=records.append, **run_options
        )
        run.install()
        try:
            run.level = sigmas[0]
            kwargs = {"c_crossattn": positive[0][0], "y": y}
            if control is not None:
                kwargs["control"] = control
            with torch.no_grad():
                model.apply_model(x, torch.tensor([sigmas[0]]), **kwargs)
        finally:
            run.remove()
        return records[0].preset

    control = {"input": [], "middle": [], "output": []}  # a ControlNet's residual lists (here empty)
    assert preset(None) == "sdxl-2048"
    assert preset(control) == "sdxl-2048-controlnet"  # Forge / reForge
    assert preset(None, controlnet=True) == "sdxl-2048-controlnet"  # A1111 + sd-webui-controlnet
    assert preset(control, controlnet=False) == "sdxl-2048"
    assert preset(control, img2img=True) == "sdxl-2048"


def test_a1111_controlnet_units_are_read_from_the_script_arguments():
    from types import SimpleNamespace

    from hidiff.webui.host import a1111_controlnet

    class Script:
        def __init__(self, title, args_from, args_to):
            self._title, self.args_from, self.args_to = title, args_from, args_to

        def title(self):
            return self._title

    def p(units, title="ControlNet"):
        scripts = [Script("HiDiffusion", 0, 2), Script(title, 2, 2 + len(units))]
        return SimpleNamespace(scripts=SimpleNamespace(alwayson_scripts=scripts), script_args=[True, True, *units])

    model = "control_sd15_canny [fef5e48e]"
    assert a1111_controlnet(p([{"enabled": True, "model": model}]))  # from the API: dicts
    assert a1111_controlnet(p([{"enabled": False, "model": model}, SimpleNamespace(enabled=True, model=model)]))
    assert not a1111_controlnet(p([{"enabled": True, "model": "None"}]))  # a unit without a model
    assert not a1111_controlnet(p([{"model": model}]))  # the extension's units default to disabled
    assert not a1111_controlnet(p([{"enabled": True, "model": model}], title="Other"))
    assert not a1111_controlnet(SimpleNamespace())  # no scripts at all
