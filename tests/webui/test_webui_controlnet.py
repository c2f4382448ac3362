"""ControlNet as each WebUI runs it, with the WebUI backend installed, on ComfyUI's ldm U-Net.

* Forge and reForge hand the residuals (made at the stock sizes) to the U-Net as its
  ``control`` argument (ControlNets: ``output`` / ``middle``; T2I-Adapters: ``input``), and
  their U-Nets add each one after the block it belongs to, dropping one whose size differs
  ("control could not be applied", Forge and ComfyUI) or resizing it (reForge). Under RAU-Net
  the U-Net pre-hook resizes each to the feature it meets.
* AUTOMATIC1111's sd-webui-controlnet does not hand residuals to the U-Net: it replaces the
  U-Net module's ``forward`` on the instance with its own loop over ``input_blocks`` /
  ``middle_block`` / ``output_blocks`` (each block called as ``block(h, emb, context)``) and
  adds each residual itself, resizing one whose size differs from the feature (nearest).
  HiDiffusion's hooks sit on the layers inside the blocks (and on the U-Net module, whose hooks
  run whatever ``forward`` is), so they act under that loop too.
* SDXL text-to-image with a ControlNet gets the published ``sdxl-2048-controlnet`` preset.
"""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch
import torch.nn.functional as F
from comfytest import HAVE_COMFY, NATIVE, conds

needs_comfy = pytest.mark.skipif(not HAVE_COMFY, reason="needs the ComfyUI venv (.comfy) for an ldm-layout U-Net")

NOT_APPLIED = "control could not be applied"


class Bench:
    """A twin-model U-Net of ``family`` at 2x its (test) native size, and one U-Net call at the
    first sigma of a 3-step run with the WebUI backend installed for that call only."""

    def __init__(self, family: str, seed: int):
        from test_cross_host import scheduler, twin_models

        from hidiff.webui.structure import describe

        _, patcher = twin_models(family)
        self.model = patcher.model
        self.unet = self.model.diffusion_model
        self.x = torch.randn(1, 4, 2 * NATIVE, 2 * NATIVE, generator=torch.Generator().manual_seed(seed))
        positive, _ = conds(family, 16 * NATIVE, 16 * NATIVE)
        self.conditioning = {"c_crossattn": positive[0][0]}
        if family == "sdxl":
            self.conditioning["y"] = self.model.encode_adm(**positive[0][1])
        network = describe(self.unet)
        self.network = dataclasses.replace(
            network, architecture=dataclasses.replace(network.architecture, native=(NATIVE, NATIVE))
        )
        self.sigmas = [float(s) for s in scheduler(3).sigmas]

    def stock_sizes(self, blocks) -> list:
        """The output shape of each of ``blocks`` in a stock call (where a ControlNet makes its residuals).
        Hooked on each block's last layer: ComfyUI's forward runs a block's layers one by one."""
        sizes = []
        hooks = [b[-1].register_forward_hook(lambda m, a, out: sizes.append(out.shape)) for b in blocks]
        try:
            with torch.no_grad():
                self.model.apply_model(self.x, torch.tensor([self.sigmas[0]]), **self.conditioning)
        finally:
            for h in hooks:
                h.remove()
        return sizes

    def call(self, control=None, forward=None, sigmas=None, **run_options):
        """(U-Net output, the call's record) with HiDiffusion; ``forward``: put on the U-Net
        instance for the call and taken off again, as another extension does."""
        from hidiff.core.config import HiDiffusionConfig
        from hidiff.core.ops import image_seeds
        from hidiff.webui.patch import SamplingRun

        sigmas = sigmas or self.sigmas
        records = []
        run = SamplingRun(
            self.unet,
            self.network,
            HiDiffusionConfig(window_seed=1),
            sigmas,
            image_seeds(self.x),
            recorder=records.append,
            **run_options,
        )
        if forward is not None:
            self.unet.forward = forward.__get__(self.unet)
        run.install()
        try:
            run.level = sigmas[0]
            kwargs = dict(self.conditioning)
            if control is not None:
                kwargs["control"] = control
            with torch.no_grad():
                out = self.model.apply_model(self.x, torch.tensor([sigmas[0]]), **kwargs)
        finally:
            run.remove()
            self.unet.__dict__.pop("forward", None)
        return out, records[0]

    def left_stock(self) -> bool:
        modules = list(self.unet.modules())
        return not any("forward" in m.__dict__ or m._forward_hooks or m._forward_pre_hooks for m in modules)


def residuals_like(sizes, seed: int) -> list:
    g = torch.Generator().manual_seed(seed)
    return [0.5 * torch.randn(s, generator=g) for s in sizes]


@needs_comfy
def test_controlnet_residuals_are_resized_to_the_features(caplog):
    """Forge / reForge: ``control["output"]`` / ``["middle"]`` resized to the call's features, all applied."""
    bench = Bench("sd15", seed=4)
    *skips, middle = residuals_like(bench.stock_sizes([*bench.unet.input_blocks, bench.unet.middle_block]), 9)

    def control(scale):
        return {"output": [scale * r for r in skips], "middle": [scale * middle]}

    with caplog.at_level(logging.WARNING):
        with_control, record = bench.call(control(1.0))
        without, _ = bench.call(control(0.0))
    assert record.conv  # RAU-Net shrank a stage in this call
    assert record.residual_sizes["output"] == list(record.plan.skip_sizes)
    assert record.residual_sizes["middle"] == [record.plan.mid_size]
    assert not [r for r in caplog.records if NOT_APPLIED in r.getMessage()]
    assert float((with_control - without).abs().max()) > 1e-3
    assert bench.left_stock()


@needs_comfy
def test_t2i_adapter_residuals_are_resized_to_the_blocks_they_meet(caplog):
    """Forge / reForge T2I-Adapters: ``control["input"]`` is popped from the end after each input
    block (the last entry meets block 0); each is resized to the output of the block it meets."""
    bench = Bench("sd15", seed=7)
    sizes = bench.stock_sizes(bench.unet.input_blocks)
    # An adapter gives residuals for some blocks only (None for the others), last entry first block.
    made = residuals_like(sizes, 10)
    residuals = [r if i % 3 == 2 else None for i, r in enumerate(made)][::-1]

    def control(scale):
        return {"input": [None if r is None else scale * r for r in residuals]}

    with caplog.at_level(logging.WARNING):
        with_adapter, record = bench.call(control(1.0))
        without, _ = bench.call(control(0.0))
    assert record.conv
    want = [size if r is not None else None for size, r in zip(list(record.plan.skip_sizes)[::-1], residuals)]
    assert record.residual_sizes["input"] == want
    assert any(w != tuple(r.shape[-2:]) for w, r in zip(want, residuals) if r is not None)  # some were resized
    assert not [r for r in caplog.records if NOT_APPLIED in r.getMessage()]
    assert float((with_adapter - without).abs().max()) > 1e-3


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


@needs_comfy
def test_a_forward_replaced_by_another_extension_still_gets_hidiffusion():
    """A1111's sd-webui-controlnet: its own forward adds the residuals; HiDiffusion acts under it."""
    bench = Bench("sd15", seed=5)
    residuals = residuals_like(bench.stock_sizes([*bench.unet.input_blocks, bench.unet.middle_block]), 9)

    stock_forward, stock_record = bench.call()
    zero, zero_record = bench.call(forward=block_driving_forward([torch.zeros_like(r) for r in residuals], []))
    added = []
    controlled, record = bench.call(forward=block_driving_forward(residuals, added))

    # HiDiffusion acted under the replaced forward as under the stock one ...
    assert record.conv and record.conv_out == stock_record.conv_out
    assert zero_record.window_calls == stock_record.window_calls == 5
    torch.testing.assert_close(zero, stock_forward, rtol=0, atol=1e-5)
    # ... every residual met a feature at the size RAU-Net gave it (the shrunk stages included) ...
    assert len(added) == len(residuals)
    shrunk = [(feature, made) for feature, made in added if feature != made]
    assert shrunk, "no residual met a shrunk feature: RAU-Net did not act"
    assert sorted(f for f, _ in added[1:]) == sorted(record.plan.skip_sizes)
    assert added[0][0] == record.plan.mid_size
    # ... and the residuals changed the result.
    assert float((controlled - zero).abs().max()) > 1e-3
    assert bench.left_stock()


@needs_comfy
def test_sdxl_with_a_controlnet_gets_the_published_controlnet_preset():
    """The published schedule has its own preset for SDXL text-to-image with a ControlNet
    (``sdxl-2048-controlnet``), as the diffusers and ComfyUI hosts choose it: Forge and reForge
    say per call (the U-Net's ``control`` argument), A1111's host per run (``controlnet=True``);
    img2img keeps the plain preset."""
    from test_cross_host import scheduler

    bench = Bench("sdxl", seed=6)
    sigmas = [float(s) for s in scheduler(8).sigmas]  # more steps than the few-step (Turbo) preset's

    def preset(control, **run_options):
        return bench.call(control, sigmas=sigmas, **run_options)[1].preset

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
