"""The WebUI backend beside other extensions that patch the same U-Net layers.

AUTOMATIC1111's built-in HyperTile wraps every attention's ``forward`` on the instance and
leaves its wrappers on the model (it toggles them by a flag), and its token merging (ToMe)
merges tokens inside the transformer blocks before self-attention. HiDiffusion must run
beside both classes of patch: a layer's own instance wrapper keeps running wherever
HiDiffusion does not change the call and is put back afterwards; tokens that are not the
feature map's grid are left to the layer as it was, said once per layer. ComfyUI's ldm
U-Net stands in for the WebUIs' (same layout and layer names).
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch
from comfytest import HAVE_COMFY, NATIVE, conds

pytestmark = pytest.mark.skipif(not HAVE_COMFY, reason="needs the ComfyUI venv (.comfy) for an ldm-layout U-Net")


def setup(seed=3):
    from test_cross_host import scheduler, twin_models

    _, patcher = twin_models("sd15")
    noise = torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(seed))
    positive, _ = conds("sd15", 512, 512)
    return patcher, noise, positive, [float(s) for s in scheduler(3).sigmas]


def run(patcher, noise, positive, sigmas, **options):
    """Euler over ``sigmas`` with a SamplingRun installed; (final latent, records, warnings)."""
    from hidiff.core.config import HiDiffusionConfig
    from hidiff.core.ops import image_seeds
    from hidiff.webui.patch import SamplingRun
    from hidiff.webui.structure import describe

    model = patcher.model
    unet = model.diffusion_model
    network = describe(unet)
    network = dataclasses.replace(
        network, architecture=dataclasses.replace(network.architecture, native=(NATIVE, NATIVE))
    )
    records, said = [], []
    sampling = SamplingRun(
        unet,
        network,
        HiDiffusionConfig(window_seed=5, **options),
        sigmas,
        image_seeds(noise),
        recorder=records.append,
        warn=said.append,
    )
    denoise = sampling.denoiser(lambda x, s: model.apply_model(x, s, c_crossattn=positive[0][0]))
    x = noise * sigmas[0]
    sampling.install()
    try:
        with torch.no_grad():
            for i in range(len(sigmas) - 1):
                d = (x - denoise(x, torch.full((1,), sigmas[i]))) / sigmas[i]
                x = x + d * (sigmas[i + 1] - sigmas[i])
    finally:
        sampling.remove()
    return x, records, said


def attention_layers(unet):
    return [m for name, m in unet.named_modules() if name.endswith("attn1")]


def test_an_instance_wrapper_on_the_layers_keeps_running_where_hidiffusion_does_not_act_and_is_put_back():
    patcher, noise, positive, sigmas = setup()
    unet = patcher.model.diffusion_model
    expected, want_records, _ = run(patcher, noise, positive, sigmas)
    # HyperTile's way: a pass-through wrapper set on each attention instance and on the
    # conv stage's downsampler, counting its calls.
    calls = {"attn": 0, "down": 0}

    def wrap(module, kind):
        bound = module.forward

        def wrapper(*args, **kwargs):
            calls[kind] += 1
            return bound(*args, **kwargs)

        module.forward = wrapper
        return wrapper

    layers = attention_layers(unet)
    downsampler = unet.input_blocks[3][0]
    wrappers = [wrap(m, "attn") for m in layers] + [wrap(downsampler, "down")]
    try:
        got, records, said = run(patcher, noise, positive, sigmas)
        # The same result as without the wrappers (they pass through), HiDiffusion acted as before...
        assert torch.equal(got, expected)
        assert [(r.conv, r.window_calls) for r in records] == [(r.conv, r.window_calls) for r in want_records]
        assert records[0].conv and all(r.window_calls == 5 for r in records) and not said
        # ... the wrappers ran on every call HiDiffusion left alone: the 16 attentions outside the
        # window stage on each of the 3 calls, and the downsampler on the 2 calls without the strided conv.
        assert calls == {"attn": (len(layers) - 5) * 3, "down": 2}
        # ... and each layer has its own wrapper back, not ours.
        assert [m.__dict__.get("forward") for m in layers + [downsampler]] == wrappers
    finally:
        for m in layers + [downsampler]:
            m.__dict__.pop("forward", None)


def test_tokens_merged_before_self_attention_leave_the_layer_as_it_was_and_say_so_once():
    patcher, noise, positive, sigmas = setup()
    unet = patcher.model.diffusion_model
    stock, _, _ = run(patcher, noise, positive, sigmas, raunet=False, window_attn=False)
    blocks = [m for m in unet.modules() if type(m).__name__ == "BasicTransformerBlock"]

    def merging(block):
        # ToMe's way, simplified: pairs of neighbouring tokens averaged before the block, spread back after.
        def forward(x, *args, **kwargs):
            merged = x.reshape(x.shape[0], x.shape[1] // 2, 2, x.shape[2]).mean(2)
            out = type(block).forward(block, merged, *args, **kwargs)
            return out.repeat_interleave(2, dim=1)

        return forward

    for b in blocks:
        b.forward = merging(b)
    try:
        got, records, said = run(patcher, noise, positive, sigmas)
    finally:
        for b in blocks:
            b.__dict__.pop("forward", None)
    assert torch.isfinite(got).all()
    assert records[0].conv  # RAU-Net still ran
    assert all(r.window_calls == 0 for r in records)  # no window over tokens that are not the map
    assert len(said) == 5, said  # once per windowed layer, not once per call
    assert all("merges or tiles tokens" in s and "feature map" in s for s in said)
    assert not torch.equal(got, stock)


def test_a_run_left_installed_is_named_and_the_second_install_changes_nothing():
    from hidiff.core.config import HiDiffusionConfig
    from hidiff.core.ops import image_seeds
    from hidiff.webui.patch import SamplingRun
    from hidiff.webui.structure import describe

    patcher, noise, _, sigmas = setup()
    unet = patcher.model.diffusion_model
    network = describe(unet)
    first = SamplingRun(unet, network, HiDiffusionConfig(), sigmas, image_seeds(noise))
    first.install()
    try:
        replaced = {id(m): m.__dict__.get("forward") for m in unet.modules()}
        hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in unet.modules())
        second = SamplingRun(unet, network, HiDiffusionConfig(), sigmas, image_seeds(noise))
        with pytest.raises(RuntimeError, match="another HiDiffusion run that was not removed"):
            second.install()
        assert {id(m): m.__dict__.get("forward") for m in unet.modules()} == replaced
        assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in unet.modules()) == hooks
    finally:
        first.remove()
    assert not any("forward" in m.__dict__ for m in unet.modules())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in unet.modules())


# ---------------------------------------------------------------- refused, naming both, before the U-Net runs


def forge_generation(model_options=None, **p_fields):
    """A Forge/reForge-like generation on the tiny ldm U-Net: the patcher holds the U-Net and its model options."""
    from comfytest import build
    from test_host import euler

    patcher, _ = build("sd15", seed=2)
    unet = patcher.model.diffusion_model
    positive, _ = conds("sd15", 512, 512)
    calls = []

    def denoiser(x, sigma):
        calls.append(float(sigma.max()))
        return patcher.model.apply_model(x, sigma, c_crossattn=positive[0][0].expand(x.shape[0], -1, -1))

    forge_unet = SimpleNamespace(model=SimpleNamespace(diffusion_model=unet), model_options=model_options or {})
    p = SimpleNamespace(
        sd_model=SimpleNamespace(forge_objects=SimpleNamespace(unet=forge_unet)),
        sampler=SimpleNamespace(func=euler),
        extra_generation_params={},
        **p_fields,
    )
    return p, denoiser, calls, unet


def sample_with(p, denoiser, opts=None, **options_given):
    from hidiff.webui import host, options

    # The tiny U-Net's native latent is 64x64: at_native "apply" makes HiDiffusion act on it.
    settings = options.read_args(options.api_args(True, **{"at_native": "apply", **options_given}))
    assert host.prepare_sampling(p, settings, None, print, opts=opts)
    sigmas = torch.tensor([14.6, 4.0, 1.5, 0.0])
    noise = torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return p.sampler.func(denoiser, noise * sigmas[0], sigmas=sigmas, extra_args={})


def kohya_input_block_patch(h, transformer_options):
    return h


def stock(unet):
    return not any("forward" in m.__dict__ or m._forward_hooks or m._forward_pre_hooks for m in unet.modules())


def test_a_feature_resizer_in_the_patcher_is_refused_with_raunet_naming_it_before_any_unet_call():
    from hidiff.core.compose import CompositionError

    patches = {"transformer_options": {"patches": {"input_block_patch_after_skip": [kohya_input_block_patch]}}}
    p, denoiser, calls, unet = forge_generation(patches)
    with pytest.raises(CompositionError) as refused:
        sample_with(p, denoiser)
    message = str(refused.value)
    assert "RAU-Net and test_other_patches.kohya_input_block_patch both resize" in message
    assert "turn raunet off in the HiDiffusion accordion" in message
    assert calls == [] and stock(unet)
    # With raunet off the two compose (the windows act on whatever map the other patch leaves).
    p, denoiser, calls, unet = forge_generation(patches)
    assert torch.isfinite(sample_with(p, denoiser, raunet=False)).all()
    assert len(calls) == 3 and stock(unet)


@pytest.mark.parametrize("source", ["token merging", "HyperTile"])
def test_token_merging_and_hypertile_are_refused_with_the_windows_naming_the_setting(source):
    from hidiff.core.compose import CompositionError

    fields, opts = {}, None
    if source == "token merging":
        fields["get_token_merging_ratio"] = lambda for_hr=False: 0.0 if for_hr else 0.3
    else:
        opts = SimpleNamespace(hypertile_enable_unet=True, hypertile_enable_unet_secondpass=False)
    p, denoiser, calls, unet = forge_generation(**fields)
    with pytest.raises(CompositionError, match=rf"windowed attention \(MSW-MSA\) and {source}.*in the HiDiffusion"):
        sample_with(p, denoiser, opts=opts)
    assert calls == [] and stock(unet)
    # RAU-Net alone composes with it.
    p, denoiser, calls, unet = forge_generation(**fields)
    assert torch.isfinite(sample_with(p, denoiser, opts=opts, window_attn=False, kv_downsample=1)).all()
    if opts is None:  # token merging's hires-fix ratio is 0 here: that pass runs with the windows
        p, denoiser, calls, unet = forge_generation(is_hr_pass=True, **fields)
        assert torch.isfinite(sample_with(p, denoiser)).all() and len(calls) == 3 and stock(unet)
    else:  # HyperTile's second-pass setting tiles only the hires-fix pass
        opts = SimpleNamespace(hypertile_enable_unet=False, hypertile_enable_unet_secondpass=True)
        p, denoiser, calls, unet = forge_generation(**fields)
        assert torch.isfinite(sample_with(p, denoiser, opts=opts)).all()
        p, denoiser, calls, unet = forge_generation(is_hr_pass=True, **fields)
        with pytest.raises(CompositionError, match="HyperTile"):
            sample_with(p, denoiser, opts=opts)


def test_a_resizer_outside_any_patcher_is_caught_when_it_acts_and_the_model_is_left_stock():
    """An extension that resizes features its own way (a hook, a replaced forward): the size the
    next downsampler meets is not the planned one, so RAU-Net refuses at that call."""
    from hidiff.core.compose import CompositionError
    from hidiff.webui.structure import describe

    p, denoiser, calls, unet = forge_generation()
    block, stage = describe(unet).downsample_blocks[1]
    # (on the block's last layer: ComfyUI's U-Net runs a block's layers one by one, never the block itself)
    shrink = unet.input_blocks[block - 1][-1].register_forward_hook(
        lambda module, args, out: torch.nn.functional.interpolate(out, scale_factor=0.5, mode="bicubic")
    )
    try:
        with pytest.raises(CompositionError, match=rf"stage {stage}'s downsampler met a \d+x\d+ map where the U-Net"):
            sample_with(p, denoiser)
    finally:
        shrink.remove()
    assert len(calls) == 1 and stock(unet)
