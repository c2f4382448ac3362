"""LoRA (PEFT, on the strided conv too), FreeU and PAG keep working under hidiff."""

import diffusers
import pytest
import torch
from helpers import run_recorded, small_native

import hidiff
from hidiff.diffusers.testing import tiny_components, tiny_pipeline

SIDE = 640  # latent 80 > the tiny SD native 64
STEPS = 5  # sd-1024: the strided conv acts in steps 0 and 1


def _lora(pipe, seed=0):
    from peft import LoraConfig

    config = LoraConfig(
        r=4,
        lora_alpha=4,
        init_lora_weights=False,
        target_modules=["to_q", "to_k", "to_v", "down_blocks.0.downsamplers.0.conv"],
    )
    torch.manual_seed(seed)
    pipe.unet.add_adapter(config)
    return pipe


@pytest.mark.slow
def test_lora_on_the_strided_conv_follows_rau_net():
    """An unfused PEFT LoRA under RAU-Net equals the same LoRA fused into the weights."""
    pipe = _lora(tiny_pipeline("sd15"))
    conv = pipe.unet.down_blocks[0].downsamplers[0].conv
    assert hasattr(conv, "lora_A")  # the LoRA really wraps the conv RAU-Net strides
    stock, _ = run_recorded(pipe, SIDE, SIDE, STEPS, guidance_scale=1.0)
    hidiff.apply_hidiffusion(pipe)
    unfused, records = run_recorded(pipe, SIDE, SIDE, STEPS, guidance_scale=1.0)
    assert records[0].conv and records[0].skip_sizes[1] == (20, 20)
    # strides restored after each call, LoRA layers included
    assert {tuple(m.stride) for m in conv.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)} == {
        (2, 2)
    }
    hidiff.remove_hidiffusion(pipe)
    back, _ = run_recorded(pipe, SIDE, SIDE, STEPS, guidance_scale=1.0)
    assert torch.equal(back, stock)
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in pipe.unet.modules():
        if isinstance(module, BaseTunerLayer):
            module.merge()
    hidiff.apply_hidiffusion(pipe)
    fused, _ = run_recorded(pipe, SIDE, SIDE, STEPS, guidance_scale=1.0)
    torch.testing.assert_close(unfused, fused, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_lora_is_not_ignored_under_rau_net():
    base = tiny_pipeline("sd15")
    hidiff.apply_hidiffusion(base)
    plain, _ = run_recorded(base, SIDE, SIDE, STEPS, guidance_scale=1.0)
    with_lora = _lora(tiny_pipeline("sd15"))
    hidiff.apply_hidiffusion(with_lora)
    lora_out, _ = run_recorded(with_lora, SIDE, SIDE, STEPS, guidance_scale=1.0)
    assert (plain - lora_out).abs().max() > 1e-3


@pytest.mark.slow
def test_freeu_works_and_hidiff_removes_cleanly():
    pipe = tiny_pipeline("sd15")
    pipe.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
    freeu_stock, _ = run_recorded(pipe, SIDE, SIDE, STEPS)
    hidiff.apply_hidiffusion(pipe)
    ours, records = run_recorded(pipe, SIDE, SIDE, STEPS)
    assert ours.shape == (1, 4, 80, 80) and torch.isfinite(ours).all()
    assert records[0].conv and all(r.window_calls == 5 for r in records)
    hidiff.remove_hidiffusion(pipe)
    again, _ = run_recorded(pipe, SIDE, SIDE, STEPS)
    assert torch.equal(again, freeu_stock)
    pipe.disable_freeu()


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_pag_pipeline_keeps_its_step_and_windows(family):
    cls = "StableDiffusionXLPAGPipeline" if family == "sdxl" else "StableDiffusionPAGPipeline"
    if not hasattr(diffusers, cls):
        pytest.skip(f"diffusers {diffusers.__version__} has no {cls} (PAG pipelines came in diffusers 0.30)")
    components = tiny_components(family, **small_native(family))
    pipe = getattr(diffusers, cls)(**components, pag_applied_layers=["mid"])
    pipe.set_progress_bar_config(disable=True)
    side = SIDE  # 1.25x native for both (SDXL here: 512)
    stock, _ = run_recorded(pipe, side, side, STEPS, pag_scale=3.0)
    hidiff.apply_hidiffusion(pipe)
    out, records = run_recorded(pipe, side, side, STEPS, pag_scale=3.0)
    assert out.shape == (1, 4, side // 8, side // 8) and torch.isfinite(out).all()
    assert [r.step for r in records] == list(range(STEPS))
    assert records[0].conv or records[0].pool
    windows = 5 if family == "sd15" else 10
    assert all(r.window_calls == windows for r in records)
    hidiff.remove_hidiffusion(pipe)
    back, _ = run_recorded(pipe, side, side, STEPS, pag_scale=3.0)
    assert torch.equal(back, stock) and not torch.equal(out, stock)


@pytest.mark.slow
def test_several_unet_calls_per_step_share_the_step():
    """Split classifier-free guidance (as modular pipelines do): two U-Net calls per step."""
    pipe = tiny_pipeline("sd15")
    unet, scheduler = pipe.unet, pipe.scheduler
    hidiff.apply_hidiffusion(pipe)
    scheduler.set_timesteps(STEPS)
    x = torch.randn(1, 4, 80, 80, generator=torch.Generator().manual_seed(0))
    cond, uncond = torch.randn(2, 1, 77, 32, generator=torch.Generator().manual_seed(1))
    seen = []
    with torch.no_grad():
        for t in scheduler.timesteps:
            e_c = unet(x, t, encoder_hidden_states=cond).sample
            seen.append(hidiff.last_call(pipe).step)
            e_u = unet(x, t, encoder_hidden_states=uncond).sample
            seen.append((hidiff.last_call(pipe).step, hidiff.last_call(pipe).conv))
            x = scheduler.step(e_u + 5 * (e_c - e_u), t, x).prev_sample
    t1 = int(STEPS * 0.4)
    assert seen == [v for i in range(STEPS) for v in (i, (i, i < t1))]


@pytest.mark.slow
def test_torch_compile_runs_and_stops_compiling():
    """A compiled U-Net (dynamo, eager backend: no C compiler needed) follows the schedule
    and, once both RAU-Net phases have been seen, compiles nothing new."""
    from torch._dynamo.utils import counters

    pipe = tiny_pipeline("sd15")
    stock, _ = run_recorded(pipe, SIDE, SIDE, STEPS, guidance_scale=1.0)
    hidiff.apply_hidiffusion(pipe)
    eager, _ = run_recorded(pipe, SIDE, SIDE, STEPS, guidance_scale=1.0)
    torch._dynamo.reset()
    pipe.unet.compile(backend="eager")
    try:
        for _ in range(2):
            compiled, records = run_recorded(pipe, SIDE, SIDE, STEPS, guidance_scale=1.0)
        graphs = counters["stats"]["unique_graphs"]
        again, _ = run_recorded(pipe, SIDE, SIDE, STEPS, guidance_scale=1.0)
        assert counters["stats"]["unique_graphs"] == graphs
    finally:
        torch._dynamo.reset()
    assert [r.conv for r in records] == [i < int(STEPS * 0.4) for i in range(STEPS)]
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    assert torch.equal(again, compiled)
    # removed from the compiled U-Net: the stock output again
    hidiff.remove_hidiffusion(pipe)
    try:
        back, _ = run_recorded(pipe, SIDE, SIDE, STEPS, guidance_scale=1.0)
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(back, stock, rtol=1e-5, atol=1e-5)
    assert (back - compiled).abs().max() > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("order", ["offload-first", "apply-first"])
def test_model_cpu_offload_before_or_after_apply(order):
    pipe = tiny_pipeline("sd15")
    stock, _ = run_recorded(pipe, SIDE, SIDE, STEPS, guidance_scale=1.0)
    if order == "offload-first":
        pipe.enable_model_cpu_offload(device="cpu")
        hidiff.apply_hidiffusion(pipe)
    else:
        hidiff.apply_hidiffusion(pipe)
        pipe.enable_model_cpu_offload(device="cpu")
    ours, records = run_recorded(pipe, SIDE, SIDE, STEPS, guidance_scale=1.0)
    assert records[0].conv and all(r.window_calls == 5 for r in records)
    assert not torch.equal(ours, stock)
    hidiff.remove_hidiffusion(pipe)
    assert hasattr(pipe.unet, "_hf_hook")  # accelerate's offload hook survives the removal
    back, _ = run_recorded(pipe, SIDE, SIDE, STEPS, guidance_scale=1.0)
    assert torch.equal(back, stock)


def _ip_adapter_state_dict(unet, clip_dim=16, seed=0):
    """A random IP-Adapter checkpoint in the published layout (image projection + to_k_ip/to_v_ip)."""
    g = torch.Generator().manual_seed(seed)
    cross = unet.config.cross_attention_dim
    image_proj = {
        "proj.weight": 0.1 * torch.randn(4 * cross, clip_dim, generator=g),
        "proj.bias": torch.zeros(4 * cross),
        "norm.weight": torch.ones(cross),
        "norm.bias": torch.zeros(cross),
    }
    ip, key_id = {}, 1
    channels = unet.config.block_out_channels
    for name in unet.attn_processors:
        if not name.endswith("attn1.processor"):
            if name.startswith("mid_block"):
                hidden = channels[-1]
            elif name.startswith("up_blocks"):
                hidden = list(reversed(channels))[int(name[len("up_blocks.")])]
            else:
                hidden = channels[int(name[len("down_blocks.")])]
            ip[f"{key_id}.to_k_ip.weight"] = 0.1 * torch.randn(hidden, cross, generator=g)
            ip[f"{key_id}.to_v_ip.weight"] = 0.1 * torch.randn(hidden, cross, generator=g)
            key_id += 2
    return {"image_proj": image_proj, "ip_adapter": ip}


@pytest.mark.slow
@pytest.mark.parametrize("order", ["ip-adapter-first", "apply-first"])
def test_ip_adapter_loaded_before_or_after_apply(order):
    pipe = tiny_pipeline("sd15")
    embeds = [torch.randn(1, 1, 16, generator=torch.Generator().manual_seed(3))]
    without_ip, _ = run_recorded(pipe, SIDE, SIDE, STEPS, guidance_scale=1.0)
    if order == "ip-adapter-first":
        pipe.unet._load_ip_adapter_weights([_ip_adapter_state_dict(pipe.unet)])
        ip_stock, _ = run_recorded(pipe, SIDE, SIDE, STEPS, guidance_scale=1.0, ip_adapter_image_embeds=embeds)
        hidiff.apply_hidiffusion(pipe)
    else:
        hidiff.apply_hidiffusion(pipe)
        pipe.unet._load_ip_adapter_weights([_ip_adapter_state_dict(pipe.unet)])
    assert (
        "IPAdapter"
        in type(pipe.unet.attn_processors["down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor"]).__name__
    )
    ours, records = run_recorded(pipe, SIDE, SIDE, STEPS, guidance_scale=1.0, ip_adapter_image_embeds=embeds)
    assert ours.shape == (1, 4, 80, 80) and torch.isfinite(ours).all()
    assert records[0].conv and all(r.window_calls == 5 for r in records)
    hidiff.remove_hidiffusion(pipe)
    back, _ = run_recorded(pipe, SIDE, SIDE, STEPS, guidance_scale=1.0, ip_adapter_image_embeds=embeds)
    assert not torch.equal(back, without_ip)  # the image prompt acts
    assert not torch.equal(back, ours)  # and so did HiDiffusion
    if order == "ip-adapter-first":
        assert torch.equal(back, ip_stock)
