"""Family detection from the U-Net's structure (never its name), where HiDiffusion acts,
which preset a call gets, and the models HiDiffusion must refuse without touching them.

Pipeline tests use tiny random-weight models whose native size is made small through
``sample_size`` (the native size is read from the config), so that "above native" and
"4x native" calls stay cheap on a CPU.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from helpers import assert_untouched, run_recorded, snapshot, unet2d_model
from torch import nn

import hidiff
from hidiff import UnsupportedModelError, apply_hidiffusion, detect_layout, is_patched
from hidiff.diffusers.patch import changes
from hidiff.diffusers.testing import make_unet, tiny_components, tiny_pipeline, tiny_unet_config

SD_NATIVE = 8  # latent side of the tiny SD pipelines (64 px)
XL_NATIVE = 16  # latent side of the tiny SDXL pipelines (128 px)


# --------------------------------------------------------------------------- helpers
def expected_phases(preset: str, n: int) -> list[tuple[bool, bool]]:
    """(conv active, pool active) per step, written from the schedule table of REFERENCE.md."""
    ratios = {
        "sd-1024": (0.4, 0.0),
        "sd-2048": (0.7, 0.3),
        "sdxl-2048": (0.4, 0.0),
        "sdxl-2048-gentle": (0.4, 0.0),
        "sdxl-4096": (0.7, 0.3),
        "sdxl-turbo": (0.5, 0.0),
    }[preset]
    t1, t2 = int(n * ratios[0]), int(n * ratios[1])
    a = int(8 / 50 * n)
    rule = {
        "sd-1024": lambda i: (i < t1, i < t2),
        "sd-2048": lambda i: (i < t1, i < t2),
        "sdxl-2048": lambda i: (i < a, a <= i < t1),
        "sdxl-2048-gentle": lambda i: (i < t2, i < t1),
        "sdxl-4096": lambda i: (i < t2, i < t1),
        "sdxl-turbo": lambda i: (False, i < t1),
    }[preset]
    return [rule(i) for i in range(n)]


class Probe:
    """Watches the real feature sizes of each U-Net call, independently of hidiff's records.

    Registered after hidiff's hooks, so it sees what they did: whether the conv stage's
    downsampler shrank 4x instead of 2x, whether the pool stage's first attention output
    was halved, and whether the windowed self-attentions got 4x the batch.
    """

    def __init__(self, unet: nn.Module, layout: hidiff.Layout) -> None:
        self.calls: list[dict] = []
        self._handles = []
        down, up = unet.down_blocks, unet.up_blocks
        conv = down[layout.conv_stage].downsamplers[0]
        pool = down[layout.pool_stage].attentions[0]
        self._handles.append(unet.register_forward_pre_hook(self._on_unet, with_kwargs=True))
        self._handles.append(conv.register_forward_pre_hook(self._size_in("conv")))
        self._handles.append(conv.register_forward_hook(self._size_out("conv")))
        self._handles.append(pool.register_forward_pre_hook(self._size_in("pool")))
        self._handles.append(pool.register_forward_hook(self._size_out("pool")))
        self.windowed_attn1 = []
        for block in (down[layout.window_stage], up[layout.up_index(layout.window_stage)]):
            for name, m in block.named_modules():
                if name.endswith("attn1"):
                    self.windowed_attn1.append(m)
                    self._handles.append(m.register_forward_pre_hook(self._on_attn1))

    def _on_unet(self, module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        self.calls.append({"batch": sample.shape[0], "attn1_batches": []})

    def _size_in(self, key):
        def hook(module, args):
            self.calls[-1][key + "_in"] = tuple(args[0].shape[-2:])

        return hook

    def _size_out(self, key):
        def hook(module, args, output):
            x = (
                output
                if isinstance(output, torch.Tensor)
                else output[0]
                if isinstance(output, tuple)
                else output.sample
            )
            self.calls[-1][key + "_out"] = tuple(x.shape[-2:])

        return hook

    def _on_attn1(self, module, args):
        self.calls[-1]["attn1_batches"].append(args[0].shape[0])

    def phases(self) -> list[tuple[bool, bool, bool]]:
        """(conv, pool, windows) per call, read off the feature sizes."""
        out = []
        for c in self.calls:
            (h, w), (ch, cw) = c["conv_in"], c["conv_out"]
            assert min(h, w) > 2, "sizes too small to tell stride 2 from stride 4"
            conv = (ch, cw) == (math.ceil(h / 4), math.ceil(w / 4))
            assert conv or (ch, cw) == (math.ceil(h / 2), math.ceil(w / 2)), c
            (ph, pw), (qh, qw) = c["pool_in"], c["pool_out"]
            pool = (qh, qw) == (math.ceil(ph / 2), math.ceil(pw / 2))
            assert pool or (qh, qw) == (ph, pw), c
            batches = set(c["attn1_batches"])
            assert len(c["attn1_batches"]) == len(self.windowed_attn1)
            assert batches in ({c["batch"]}, {4 * c["batch"]}), c
            out.append((conv, pool, batches == {4 * c["batch"]}))
        return out

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def run(pipe, height, width, steps, seed=0, **kwargs):
    return run_recorded(pipe, height, width, steps, seed, **kwargs)


def run_probed(pipe, height, width, steps, **kwargs):
    """``run`` with a :class:`Probe` on the U-Net: latents, records, observed (conv, pool, windows)."""
    probe = Probe(pipe.unet, detect_layout(pipe.unet))
    try:
        latents, records = run(pipe, height, width, steps, **kwargs)
    finally:
        probe.remove()
    return latents, records, probe.phases()


def windowed_attn1_count(config) -> int:
    """Self-attentions of the highest-resolution attention stage, down and up, from the config."""
    down_types = list(config.down_block_types)
    stage = next(k for k, t in enumerate(down_types) if "CrossAttn" in t)
    n = len(down_types)
    per_block = config.transformer_layers_per_block
    per_block = [per_block] * n if isinstance(per_block, int) else list(per_block)
    layers = config.layers_per_block
    layers = [layers] * n if isinstance(layers, int) else list(layers)
    down = layers[stage] * per_block[stage]
    up_index = n - 1 - stage
    reverse = config.reverse_transformer_layers_per_block
    if reverse is not None:
        up = sum(reverse[up_index])
    else:
        up = (list(reversed(layers))[up_index] + 1) * list(reversed(per_block))[up_index]
    return down + up


# --------------------------------------------------------------------------- detection
SD_GEOMETRY = dict(kind="sd", num_stages=4, conv_stage=0, pool_stage=1, window_stage=0)
XL_GEOMETRY = dict(kind="sdxl", num_stages=3, conv_stage=1, pool_stage=1, window_stage=1)

DETECTION_CASES = {
    "sd1": ("sd15", dict(cross_attention_dim=768), dict(SD_GEOMETRY, family="sd1", native=(64, 64), inpainting=False)),
    "sd2": ("sd21", dict(cross_attention_dim=1024), dict(SD_GEOMETRY, family="sd2", native=(64, 64), inpainting=False)),
    "sd2-768": (
        "sd21-768",
        dict(cross_attention_dim=1024),
        dict(SD_GEOMETRY, family="sd2", native=(96, 96), inpainting=False),
    ),
    "sd-other-width": ("sd15", {}, dict(SD_GEOMETRY, family="sd", native=(64, 64), inpainting=False)),
    "sd1-inpainting": (
        "sd15",
        dict(cross_attention_dim=768, in_channels=9),
        dict(SD_GEOMETRY, family="sd1", native=(64, 64), inpainting=True),
    ),
    "sdxl": ("sdxl", {}, dict(XL_GEOMETRY, family="sdxl", native=(128, 128), inpainting=False)),
    "sdxl-inpainting": (
        "sdxl",
        dict(in_channels=9),
        dict(XL_GEOMETRY, family="sdxl", native=(128, 128), inpainting=True),
    ),
    "ssd1b-like": (
        "sdxl",
        dict(transformer_layers_per_block=(1, 1, 2)),
        dict(XL_GEOMETRY, family="sdxl", native=(128, 128), inpainting=False),
    ),
    "vega-like": (
        "sdxl",
        dict(transformer_layers_per_block=(0, 1, 1)),
        dict(XL_GEOMETRY, family="sdxl", native=(128, 128), inpainting=False),
    ),
    "distilled-uneven-up": (
        "sdxl",
        dict(
            transformer_layers_per_block=(1, 2, 2),
            reverse_transformer_layers_per_block=((2, 2, 2), (1, 1, 1), (1, 1, 1)),
        ),
        dict(XL_GEOMETRY, family="sdxl", native=(128, 128), inpainting=False),
    ),
    "sdxl-other-native": (
        "sdxl",
        dict(sample_size=96),
        dict(XL_GEOMETRY, family="sdxl", native=(96, 96), inpainting=False),
    ),
}


@pytest.mark.parametrize("case", list(DETECTION_CASES))
def test_detect_layout(case):
    family, overrides, expected = DETECTION_CASES[case]
    unet = make_unet(tiny_unet_config(family, **overrides))
    layout = detect_layout(unet)
    assert isinstance(layout, hidiff.Layout)
    for key, value in expected.items():
        assert getattr(layout, key) == value, (key, getattr(layout, key), value)


def test_sd21_768_tiny_config_is_v_prediction_with_native_96():
    components = tiny_components("sd21-768")
    assert components["scheduler"].config.prediction_type == "v_prediction"
    assert tiny_components("sd21")["scheduler"].config.prediction_type == "epsilon"
    unet768 = make_unet(tiny_unet_config("sd21-768", cross_attention_dim=1024))
    unet512 = make_unet(tiny_unet_config("sd21", cross_attention_dim=1024))
    assert detect_layout(unet768).native == (96, 96)
    # The native size drives the decisions: 80x80 is above SD 2.1-base's native 64 but
    # below 768-v's 96, and 4x native is 256 vs 384.
    apply_hidiffusion(unet768)
    apply_hidiffusion(unet512)
    plan768, plan512 = hidiff.get_patch(unet768).plan, hidiff.get_patch(unet512).plan
    assert plan768((80, 80), 0, 10).preset is None
    assert plan512((80, 80), 0, 10).preset == "sd-1024"
    assert plan768((97, 97), 0, 10).preset == "sd-1024"
    assert plan768((256, 256), 0, 10).preset == "sd-1024"
    assert plan512((256, 256), 0, 10).preset == "sd-2048"
    assert plan768((384, 384), 0, 10).preset == "sd-2048"


def test_misleading_name_is_ignored():
    unet = make_unet(tiny_unet_config("sdxl"))
    unet.register_to_config(_name_or_path="runwayml/stable-diffusion-v1-5")
    assert unet.config._name_or_path == "runwayml/stable-diffusion-v1-5"
    layout = detect_layout(unet)
    assert (layout.family, layout.kind, layout.native) == ("sdxl", "sdxl", (128, 128))
    # And the other way round: an SD-shaped U-Net that claims to be SDXL.
    sd = make_unet(tiny_unet_config("sd15", cross_attention_dim=768))
    sd.register_to_config(_name_or_path="stabilityai/stable-diffusion-xl-base-1.0")
    assert detect_layout(sd).family == "sd1"


def test_renamed_class_is_detected_from_structure():
    from diffusers import UNet2DConditionModel

    class MergedCheckpointNet(UNet2DConditionModel):
        pass

    torch.manual_seed(0)
    unet = MergedCheckpointNet(**tiny_unet_config("sdxl", transformer_layers_per_block=(1, 1, 2)))
    layout = detect_layout(unet)
    assert (layout.family, layout.conv_stage, layout.pool_stage, layout.window_stage) == ("sdxl", 1, 1, 1)


# --------------------------------------------------------------------------- module names
@pytest.mark.parametrize("case", ["sd1", "sd2-768", "sdxl", "ssd1b-like", "vega-like", "distilled-uneven-up"])
def test_module_names_exist_and_match_hooks(case):
    family, overrides, _ = DETECTION_CASES[case]
    unet = make_unet(tiny_unet_config(family, **overrides))
    layout = detect_layout(unet)
    names = changes(unet)
    assert names
    for name in names:
        module = unet.get_submodule(name)  # raises if it does not exist
        if name.endswith("downsamplers.0"):
            assert type(module).__name__ == "Downsample2D"
        elif name.endswith("upsamplers.0"):
            assert type(module).__name__ == "Upsample2D"
        elif name.endswith("attn1"):
            assert type(module).__name__ == "Attention"
            assert module.is_cross_attention is False
        else:
            assert type(module).__name__ == "Transformer2DModel", name

    attn1 = [n for n in names if n.endswith(".attn1")]
    assert len(attn1) == windowed_attn1_count(unet.config)
    up = layout.up_index(layout.window_stage)
    assert all(n.startswith((f"down_blocks.{layout.window_stage}.", f"up_blocks.{up}.")) for n in attn1)
    assert f"down_blocks.{layout.conv_stage}.downsamplers.0" in names

    # The switches select the parts: without RAU-Net only the windowed stages are named.
    raunet_only = changes(unet, window_attn=False)
    windows_only = changes(unet, raunet=False)
    assert not [n for n in raunet_only if "attn1" in n]
    assert set(attn1) <= set(windows_only)
    assert all(n.startswith((f"down_blocks.{layout.window_stage}.", f"up_blocks.{up}.")) for n in windows_only)
    assert set(raunet_only) | set(windows_only) == set(names)

    # Exactly the modules the layout names get hooks once applied (besides the U-Net
    # itself), and nothing is left after removal.
    before = snapshot(unet)
    apply_hidiffusion(unet)
    hooked = {n for n, m in unet.named_modules() if m._forward_hooks or m._forward_pre_hooks}
    assert hooked - {""} == set(names)
    hidiff.remove_hidiffusion(unet)
    assert_untouched(unet, before)
    apply_hidiffusion(unet, raunet=False)
    hooked = {n for n, m in unet.named_modules() if m._forward_hooks or m._forward_pre_hooks}
    assert hooked - {""} == set(windows_only)
    hidiff.remove_hidiffusion(unet)
    assert_untouched(unet, before)


# --------------------------------------------------------------------------- pipelines
PRESET_CASES = {
    # family, sample_size, pixel side, steps, expected preset
    "sd-1024": ("sd15", SD_NATIVE, 96, 5, "sd-1024"),
    "sd-2048": ("sd15", SD_NATIVE, 32 * 8, 5, "sd-2048"),
    "sdxl-2048": ("sdxl", XL_NATIVE, 192, 7, "sdxl-2048"),
    "sdxl-4096": ("sdxl", XL_NATIVE, 64 * 8, 5, "sdxl-4096"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(PRESET_CASES))
def test_above_native_follows_preset(case):
    family, native, side, steps, preset = PRESET_CASES[case]
    pipe = tiny_pipeline(family, sample_size=native)
    assert apply_hidiffusion(pipe) is pipe
    assert is_patched(pipe) and is_patched(pipe.unet)
    latents, records, observed = run_probed(pipe, side, side, steps)
    expected = expected_phases(preset, steps)
    # The chosen step counts exercise both states of some path, or the test proves little.
    assert any(c for c, _ in expected) and not all(c for c, _ in expected)

    assert latents.shape == (1, 4, side // 8, side // 8)
    assert torch.isfinite(latents).all()
    assert [r.step for r in records] == list(range(steps))
    assert all(r.total == steps and r.preset == preset and r.latent == (side // 8, side // 8) for r in records)
    assert [(r.conv, r.pool) for r in records] == expected
    assert all(r.windows for r in records)
    assert all(r.window_calls == windowed_attn1_count(pipe.unet.config) for r in records)
    # The features really had those sizes.
    assert observed == [(c, p, True) for c, p in expected]


def test_apply_to_pipeline_or_to_its_unet_is_the_same():
    side, steps = 96, 5
    by_pipe = tiny_pipeline("sd15", sample_size=SD_NATIVE)
    by_unet = tiny_pipeline("sd15", sample_size=SD_NATIVE)
    assert apply_hidiffusion(by_pipe) is by_pipe
    assert apply_hidiffusion(by_unet.unet, scheduler=by_unet.scheduler) is by_unet.unet
    assert is_patched(by_unet) and is_patched(by_unet.unet)
    a, rec_a = run(by_pipe, side, side, steps)
    b, rec_b = run(by_unet, side, side, steps)
    key = lambda r: (r.step, r.total, r.preset, r.conv, r.pool, r.windows, r.window_calls, r.shifts)  # noqa: E731
    assert [key(r) for r in rec_a] == [key(r) for r in rec_b]
    assert any(r.conv for r in rec_a)
    assert torch.equal(a, b)


def test_apply_to_bare_unet_without_scheduler_still_acts():
    pipe = tiny_pipeline("sd15", sample_size=SD_NATIVE)
    stock, _ = run(pipe, 96, 96, 2)
    apply_hidiffusion(pipe.unet)
    latents, records = run(pipe, 96, 96, 2)
    assert latents.shape == stock.shape
    assert all(r.preset == "sd-1024" and r.windows for r in records)
    assert not torch.equal(latents, stock)


@pytest.mark.slow
@pytest.mark.parametrize(
    "family,native,side",
    [("sd15", SD_NATIVE, SD_NATIVE * 8), ("sd15", SD_NATIVE, 48), ("sdxl", XL_NATIVE, XL_NATIVE * 8)],
)
def test_at_or_below_native_nothing_changes_unless_asked(family, native, side):
    pipe = tiny_pipeline(family, sample_size=native)
    stock, _ = run(pipe, side, side, 2)

    apply_hidiffusion(pipe)
    probe = Probe(pipe.unet, detect_layout(pipe.unet))
    try:
        latents, records = run(pipe, side, side, 2)
        probe_calls = list(probe.calls)
    finally:
        probe.remove()
    assert torch.equal(latents, stock)
    assert records and all(
        (r.preset, r.conv, r.pool, r.windows, r.window_calls) == (None, False, False, False, 0) for r in records
    )
    assert all(set(c["attn1_batches"]) == {c["batch"]} for c in probe_calls)

    apply_hidiffusion(pipe, at_native="apply")
    forced, records = run(pipe, side, side, 2)
    assert forced.shape == stock.shape
    assert not torch.equal(forced, stock)
    assert all(r.preset is not None and r.windows and r.window_calls > 0 for r in records)

    hidiff.remove_hidiffusion(pipe)
    again, _ = run(pipe, side, side, 2)
    assert torch.equal(again, stock)


@pytest.mark.slow
@pytest.mark.parametrize("scheduler_name", ["EDMEulerScheduler", "EDMDPMSolverMultistepScheduler"])
def test_playground_style_edm_scheduler_gets_gentle_preset(scheduler_name):
    import diffusers

    steps = 5  # the fewest that is not a few-step (Turbo) run
    pipe = tiny_pipeline("sdxl", sample_size=XL_NATIVE)
    apply_hidiffusion(pipe)
    # Swapped in after apply: the pipeline's current scheduler is the one that counts.
    pipe.scheduler = getattr(diffusers, scheduler_name)()
    latents, records, observed = run_probed(pipe, 192, 192, steps)
    assert latents.shape == (1, 4, 24, 24)
    assert [r.step for r in records] == list(range(steps))
    assert all(r.preset == "sdxl-2048-gentle" and r.total == steps for r in records)
    expected = expected_phases("sdxl-2048-gentle", steps)
    assert any(p for _, p in expected)
    assert [(r.conv, r.pool) for r in records] == expected
    assert observed == [(c, p, True) for c, p in expected]


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_sdxl_few_steps_gets_turbo_preset(steps):
    pipe = tiny_pipeline("sdxl", sample_size=XL_NATIVE)
    apply_hidiffusion(pipe)
    latents, records, observed = run_probed(pipe, 192, 192, steps, guidance_scale=0.0)
    assert latents.shape == (1, 4, 24, 24)
    assert len(records) == steps
    assert all(r.preset == "sdxl-turbo" and r.total == steps for r in records)
    expected = expected_phases("sdxl-turbo", steps)
    assert [(r.conv, r.pool) for r in records] == expected
    assert observed == [(c, p, True) for c, p in expected]


def test_sdxl_five_steps_is_not_turbo():
    pipe = tiny_pipeline("sdxl", sample_size=XL_NATIVE)
    apply_hidiffusion(pipe)
    _, records = run(pipe, 192, 192, 5, guidance_scale=0.0)
    assert {r.preset for r in records} == {"sdxl-2048"}


@pytest.mark.slow
def test_sdxl_inpaint_pipeline_gets_gentle_preset():
    steps, side = 6, 192
    pipe = tiny_pipeline("sdxl", "inpaint", sample_size=XL_NATIVE)
    assert detect_layout(pipe.unet).inpainting is False  # 4-channel U-Net: the pipeline makes it inpainting
    apply_hidiffusion(pipe)
    g = torch.Generator().manual_seed(1)
    image = torch.rand(1, 3, side, side, generator=g)
    mask = torch.zeros(1, 1, side, side)
    mask[..., side // 4 : 3 * side // 4, side // 4 : 3 * side // 4] = 1.0
    latents, records, observed = run_probed(pipe, side, side, steps, image=image, mask_image=mask, strength=1.0)
    assert latents.shape == (1, 4, side // 8, side // 8)
    assert [r.step for r in records] == list(range(steps))
    assert all(r.preset == "sdxl-2048-gentle" and r.total == steps for r in records)
    expected = expected_phases("sdxl-2048-gentle", steps)
    assert [(r.conv, r.pool) for r in records] == expected
    assert observed == [(c, p, True) for c, p in expected]


# --------------------------------------------------------------------------- refusals


def _unconditional_default():
    return unet2d_model(
        ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    )


def _unconditional_sd_shaped():
    # Self-attention blocks exactly where SD has its cross-attention transformers.
    return unet2d_model(
        ("AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        ("UpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D"),
    )


def _unconditional_sdxl_shaped():
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=16,
        block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=16,
    ).eval()


def _no_attention():
    return make_unet(tiny_unet_config("sd15", down_block_types=("DownBlock2D",) * 4, up_block_types=("UpBlock2D",) * 4))


def _five_stages():
    return make_unet(
        tiny_unet_config(
            "sd15",
            block_out_channels=(32, 32, 64, 64, 64),
            down_block_types=("CrossAttnDownBlock2D",) * 4 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 4,
        )
    )


MODULE_REFUSALS = {
    # builder, patterns the message must contain (what was found)
    "unet2d-unconditional": (_unconditional_default, [r"UNet2DModel"]),
    "unet2d-unconditional-sd-shaped": (_unconditional_sd_shaped, [r"UNet2DModel"]),
    "unet2d-unconditional-sdxl-shaped": (_unconditional_sdxl_shaped, [r"UNet2DModel"]),
    "no-attention": (_no_attention, [r"UNet2DConditionModel", r"\b4\b", r"attention"]),
    "five-stages": (_five_stages, [r"UNet2DConditionModel", r"\b5\b"]),
    "linear": (lambda: nn.Linear(4, 4), [r"Linear"]),
}


@pytest.mark.parametrize("case", list(MODULE_REFUSALS))
def test_unsupported_modules_are_refused_untouched(case):
    build, patterns = MODULE_REFUSALS[case]
    model = build()
    before = snapshot(model)
    with pytest.raises(UnsupportedModelError) as info:
        apply_hidiffusion(model)
    assert isinstance(info.value, TypeError)
    for pattern in patterns:
        assert re.search(pattern, str(info.value)), (pattern, str(info.value))
    assert_untouched(model, before)
    with pytest.raises(UnsupportedModelError):
        detect_layout(model)


@pytest.mark.parametrize("build", [_unconditional_default, _unconditional_sd_shaped], ids=["default", "sd-shaped"])
def test_unconditional_pipeline_is_refused_untouched(build):
    from diffusers import DDPMPipeline, DDPMScheduler

    pipe = DDPMPipeline(unet=build(), scheduler=DDPMScheduler())
    before = snapshot(pipe.unet)
    with pytest.raises(UnsupportedModelError, match="UNet2DModel"):
        apply_hidiffusion(pipe)
    assert_untouched(pipe.unet, before)
    assert is_patched(pipe) is False


@pytest.mark.parametrize("obj", ["runwayml/stable-diffusion-v1-5", {"unet": "x"}, 42, None])
def test_non_modules_are_refused(obj):
    copy = dict(obj) if isinstance(obj, dict) else obj
    with pytest.raises(UnsupportedModelError) as info:
        apply_hidiffusion(obj)
    assert isinstance(info.value, TypeError)
    assert type(obj).__name__ in str(info.value)
    assert obj == copy


class TransformerPipeline:
    """Stands in for a DiT pipeline (PixArt, SD3, Flux): a transformer, no U-Net."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.transformer = nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 8))
        self.unet = None


def test_transformer_pipeline_is_refused_untouched():
    pipe = TransformerPipeline()
    before = snapshot(pipe.transformer)
    with pytest.raises(UnsupportedModelError) as info:
        apply_hidiffusion(pipe)
    message = str(info.value)
    assert "transformer" in message.lower()
    assert "TransformerPipeline" in message
    assert_untouched(pipe.transformer, before)
    assert pipe.unet is None
