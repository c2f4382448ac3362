"""The same tiny U-Net in diffusers (hidiff applied) and in ComfyUI (the node's patch applied)
gives the same final latents with HiDiffusion on.

Which loop is mirrored: ComfyUI samples with its own ``euler`` sampler on the sigmas of the
diffusers ``EulerDiscreteScheduler`` (trailing spacing, so every sigma is the sigma of an
integer timestep and ComfyUI's sigma-to-timestep map lands on the same t); the diffusers
side is the plain scheduler loop (``scale_model_input``, U-Net, ``step``). diffusers starts
from noise x its scheduler's scale, ComfyUI from its model's noise
scaling: sqrt(1 + sigma_max^2) at full noise, where diffusers 0.42's Euler with trailing spacing
uses sigma_max (its ``init_noise_sigma``), so the diffusers side starts from ComfyUI's value;
noise x sigma + latent for img2img on both sides, as diffusers' ``add_noise``). ComfyUI returns latents divided by the latent format's scale factor; they
are multiplied back. Window shifts come from the same ``window_seed`` on both sides.
Random-weight U-Nets do not denoise (final latents stay at noise scale), so the tolerance
is relative to max|x|.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers", reason="the cross-host comparison needs diffusers in this ComfyUI's Python")
from comfytest import CONTEXT, NATIVE, Recorder, build, conds

pytestmark = pytest.mark.patch_api

TOLERANCE = 1e-4  # relative to max |latent|, fp32


def diffusers_config(family: str) -> dict:
    if family == "sd15":
        return dict(
            sample_size=NATIVE,
            in_channels=4,
            out_channels=4,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            block_out_channels=(32, 64, 64, 64),
            layers_per_block=2,
            cross_attention_dim=CONTEXT,
            attention_head_dim=8,
            norm_num_groups=32,
        )
    return dict(
        sample_size=NATIVE,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64, 64),
        layers_per_block=2,
        transformer_layers_per_block=(1, 1, 1),
        cross_attention_dim=CONTEXT,
        attention_head_dim=(1, 1, 1),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
        norm_num_groups=32,
    )


def twin_models(family: str, seed: int = 0):
    """(diffusers U-Net, ComfyUI ModelPatcher) holding the same weights."""
    import comfy.utils
    from comfytest import seed_weights
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(**diffusers_config(family)).eval()
    seed_weights(unet, seed)  # diffusers zero-inits some layers: reseed them all
    patcher, unet_config = build(family, seed=seed + 1)
    mapping = comfy.utils.unet_to_diffusers(unet_config)
    diff_sd = unet.state_dict()
    comfy_sd = {comfy_key: diff_sd[diff_key] for diff_key, comfy_key in mapping.items() if diff_key in diff_sd}
    target = patcher.model.diffusion_model
    missing, unexpected = target.load_state_dict(comfy_sd, strict=False)
    assert not unexpected and not missing, (missing[:5], unexpected[:5])
    assert len(comfy_sd) == len(diff_sd)
    return unet, patcher


def scheduler(steps: int):
    from diffusers import EulerDiscreteScheduler

    s = EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        timestep_spacing="trailing",
    )
    s.set_timesteps(steps)
    return s


def run_diffusers(unet, family, noise, steps, start, positive, latent_in, hw_px, cfg=1.0, negative=None, **options):
    import hidiff

    sched = scheduler(steps)
    branches = [positive] if cfg == 1.0 else [negative, positive]
    context = torch.cat([b[0][0] for b in branches])
    added = None
    if family == "sdxl":
        h, w = hw_px
        added = {
            "text_embeds": torch.cat([b[0][1]["pooled_output"] for b in branches]),
            "time_ids": torch.tensor([[h, w, 0, 0, h, w]] * len(branches), dtype=torch.float32),
        }
    timesteps = sched.timesteps[start:]
    sigma0 = float(sched.sigmas[start])
    # ComfyUI starts a full-noise run at noise x sqrt(1 + sigma_max^2) (its max_denoise); diffusers
    # 0.42's Euler with trailing spacing at noise x sigma_max (its init_noise_sigma): mirror ComfyUI.
    x = noise * (1 + sigma0**2) ** 0.5 if start == 0 else latent_in + noise * sigma0
    sched.set_begin_index(start)
    hidiff.apply_hidiffusion(unet, scheduler=sched, **options)
    try:
        with torch.no_grad():
            for t in timesteps:
                inp = sched.scale_model_input(x, t).repeat(len(branches), 1, 1, 1)
                eps = unet(inp, t, encoder_hidden_states=context, added_cond_kwargs=added).sample
                if cfg != 1.0:
                    uncond, cond = eps.chunk(2)
                    eps = uncond + cfg * (cond - uncond)
                x = sched.step(eps, t, x).prev_sample
    finally:
        hidiff.remove_hidiffusion(unet)
    return x, sched.sigmas[start:]


def run_comfy(patcher, noise, sigmas, positive, negative, latent_image, recorder=None, cfg=1.0, **options):
    import comfy.sample
    import comfy.samplers

    from hidiff.comfy.patch import apply_hidiffusion

    model = apply_hidiffusion(patcher, recorder=recorder, native=(NATIVE, NATIVE), **options)
    sampler = comfy.samplers.ksampler("euler")
    out = comfy.sample.sample_custom(
        model,
        noise,
        cfg,
        sampler,
        torch.as_tensor(sigmas, dtype=torch.float32),
        positive,
        negative,
        latent_image,
        disable_pbar=True,
        seed=0,
    )
    return out * patcher.model.latent_format.scale_factor


CASES = [
    # family, latent (h, w), steps, img2img start step, guidance
    ("sd15", (64, 64), 5, 0, 1.0),  # 2x
    ("sd15", (37, 53), 5, 0, 1.0),  # odd sides at every level, odd windows
    ("sd15", (64, 64), 6, 2, 1.0),  # img2img (denoise 2/3)
    ("sd15", (64, 64), 4, 0, 3.0),  # classifier-free guidance: ComfyUI batches or splits cond/uncond
    ("sdxl", (64, 64), 5, 0, 1.0),
    ("sdxl", (37, 53), 5, 0, 1.0),
    ("sdxl", (128, 128), 4, 0, 1.0),  # 4x, the few-step preset
]
#: ToDo-style key/value downsampling inside the windows, on the same weights (option, value).
KV_CASES = [
    ("sd15", (64, 64), 2, True, 1),
    ("sd15", (37, 53), 4, True, 1),  # odd windows: padded keys masked after shrinking
    ("sdxl", (37, 53), 2, False, 1),  # no windows: the whole map shrinks
    ("sd15", (64, 64), 4, False, 1),
    ("sd15", (37, 53), 2, True, 2),  # kv_levels 2: the next stage's whole (odd) map shrinks too
    ("sdxl", (64, 64), 2, True, 2),
]


@pytest.mark.parametrize(
    "family,hw,steps,start,cfg",
    CASES,
    ids=[f"{c[0]}-{c[1][0]}x{c[1][1]}-{c[2]}steps-from{c[3]}-cfg{c[4]:g}" for c in CASES],
)
def test_same_latents_in_both_hosts(family, hw, steps, start, cfg):
    unet, patcher = twin_models(family)
    g = torch.Generator().manual_seed(11)
    noise = torch.randn(1, 4, *hw, generator=g)
    latent_image = torch.zeros(1, 4, *hw) if start == 0 else torch.randn(1, 4, *hw, generator=g) * 5
    positive, negative = conds(family, 8 * hw[0], 8 * hw[1])
    scale = patcher.model.latent_format.scale_factor
    options = dict(window_seed=1234)
    want, sigmas = run_diffusers(
        unet,
        family,
        noise,
        steps,
        start,
        positive,
        latent_image * scale,
        (8 * hw[0], 8 * hw[1]),
        cfg=cfg,
        negative=negative,
        **options,
    )
    rec = Recorder()
    got = run_comfy(patcher, noise, sigmas, positive, negative, latent_image, recorder=rec, cfg=cfg, **options)
    # HiDiffusion really acted in ComfyUI: features shrunk in the first step, windows ran.
    assert rec and rec[0].plan.step == 0 and rec[0].plan.total == steps - start
    assert rec[0].plan.conv or rec[0].plan.pool
    assert rec[0].conv_out is not None or rec[0].pooled is not None
    assert all(r.window_calls == 5 for r in rec)
    err = float((got - want).abs().max())
    ref = float(want.abs().max())
    print(
        f"cross-host {family} {hw} steps={steps} start={start}: max|diff| {err:.3g}, max|x| {ref:.3g}, relative {err / ref:.2g}"
    )
    assert err <= TOLERANCE * ref, f"max |diff| {err:.3g} vs max |x| {ref:.3g}"
    # ... and not because HiDiffusion did nothing on both sides.
    stock = run_comfy_stock(patcher, noise, sigmas, positive, negative, latent_image, cfg)
    assert float((stock - got).abs().max()) > 100 * TOLERANCE * ref


@pytest.mark.parametrize(
    "family,hw,factor,windows,levels",
    KV_CASES,
    ids=[f"{c[0]}-{c[1][0]}x{c[1][1]}-kv{c[2]}-{'windows' if c[3] else 'whole'}-l{c[4]}" for c in KV_CASES],
)
def test_same_latents_with_kv_downsampling(family, hw, factor, windows, levels):
    unet, patcher = twin_models(family)
    noise = torch.randn(1, 4, *hw, generator=torch.Generator().manual_seed(11))
    positive, negative = conds(family, 8 * hw[0], 8 * hw[1])
    options = dict(window_seed=1234, kv_downsample=factor, window_attn=windows, kv_levels=levels)
    want, sigmas = run_diffusers(unet, family, noise, 3, 0, positive, None, (8 * hw[0], 8 * hw[1]), **options)
    rec = Recorder()
    got = run_comfy(patcher, noise, sigmas, positive, negative, torch.zeros(1, 4, *hw), recorder=rec, **options)
    # 5 windowed self-attentions (ordinals 0-4); kv_levels 2 adds the next stage's, numbered on from 5
    assert rec and all(len([e for e in r.kv_runs if e[0] < 5]) == 5 for r in rec)
    deep = [len([e for e in r.kv_runs if e[0] >= 5]) for r in rec]
    assert all(n == 0 for n in deep) if levels == 1 else all(n >= 5 for n in deep), deep
    err, ref = float((got - want).abs().max()), float(want.abs().max())
    print(
        f"cross-host kv={factor} l{levels} windows={windows} {family} {hw}: max|diff| {err:.3g}, relative {err / ref:.2g}"
    )
    assert err <= TOLERANCE * ref


def run_comfy_stock(patcher, noise, sigmas, positive, negative, latent_image, cfg=1.0):
    import comfy.sample
    import comfy.samplers

    sampler = comfy.samplers.ksampler("euler")
    out = comfy.sample.sample_custom(
        patcher,
        noise,
        cfg,
        sampler,
        torch.as_tensor(sigmas, dtype=torch.float32),
        positive,
        negative,
        latent_image,
        disable_pbar=True,
        seed=0,
    )
    return out * patcher.model.latent_format.scale_factor
