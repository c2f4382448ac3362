"""AUTOMATIC1111's own U-Net code (ldm's UNetModel for SD 1.x, sgm's for SDXL) with the WebUI
backend equals the diffusers host, by hand.

Run in the ComfyUI venv (for the twin weights) with an A1111 v1.10 tree and its Python:

    HIDIFF_WEBUI_ROOT=/path/to/a1111 HIDIFF_WEBUI_PYTHON=/path/to/a1111/venv/bin/python \\
        .comfy/bin/python -m pytest tests/webui/test_a1111_exact.py -s

This side builds a diffusers U-Net and the same weights in the original key layout (ComfyUI's
key map), runs the diffusers host, and hands weights, noise, sigmas, conditioning and the
expected latents to A1111's Python, which builds the U-Net from A1111's ``repositories/``
(stablediffusion's ldm, generative-models' sgm), runs the backend with a k-diffusion Euler loop
and compares: within 1e-4 of max|x| (fp32), SD 1.5 and SDXL layouts, 2x and an odd size.
"""

from __future__ import annotations

import os
import subprocess

import pytest
import torch
from comfytest import HAVE_COMFY, NATIVE, conds

ROOT = os.environ.get("HIDIFF_WEBUI_ROOT")
PYTHON = os.environ.get("HIDIFF_WEBUI_PYTHON")
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
A1111 = bool(ROOT and os.path.isdir(os.path.join(ROOT or "", "repositories", "stable-diffusion-stability-ai")))

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not HAVE_COMFY, reason="needs the ComfyUI venv (.comfy) for the twin weights"),
    pytest.mark.skipif(
        not (A1111 and PYTHON),
        reason="no AUTOMATIC1111 tree given: set HIDIFF_WEBUI_ROOT (with repositories/) and HIDIFF_WEBUI_PYTHON",
    ),
]

A1111_SIDE = r"""
import sys, dataclasses, torch
root, repo, data = sys.argv[1:4]
sys.path[:0] = [repo, root + "/repositories/stable-diffusion-stability-ai", root + "/repositories/generative-models"]
torch.set_num_threads(1)
from hidiff.core.config import HiDiffusionConfig
from hidiff.core.ops import image_seeds
from hidiff.webui.patch import SamplingRun
from hidiff.webui.structure import describe
case = torch.load(data)
if case["family"] == "sdxl":
    from sgm.modules.diffusionmodules.openaimodel import UNetModel
    unet = UNetModel(adm_in_channels=2816, num_classes="sequential", use_checkpoint=False, in_channels=4,
                     out_channels=4, model_channels=32, attention_resolutions=[2, 4], num_res_blocks=2,
                     channel_mult=[1, 2, 2], num_head_channels=64, use_linear_in_transformer=True,
                     transformer_depth=[0, 1, 1], context_dim=64, spatial_transformer_attn_type="softmax", use_spatial_transformer=True,
                     legacy=False)
else:
    from ldm.modules.diffusionmodules.openaimodel import UNetModel
    unet = UNetModel(image_size=32, in_channels=4, out_channels=4, model_channels=32,
                     attention_resolutions=[1, 2, 4], num_res_blocks=2, channel_mult=[1, 2, 2, 2], num_heads=8,
                     use_spatial_transformer=True, transformer_depth=1, context_dim=64, use_checkpoint=False,
                     legacy=False, use_linear_in_transformer=False)
missing, unexpected = unet.load_state_dict(case["weights"], strict=True), None
unet.eval()
network = describe(unet)
network = dataclasses.replace(network, architecture=dataclasses.replace(network.architecture, native=case["native"]))
sigmas = case["sigmas"]
train = case["train_sigmas"]
run = SamplingRun(unet, network, HiDiffusionConfig(window_seed=1234), sigmas, image_seeds(case["noise"]))

def denoiser(x, sigma):
    s = float(sigma.reshape(-1)[0])
    t = torch.full((x.shape[0],), float((train.log() - torch.tensor(s).log()).abs().argmin()))
    eps = unet(x / (s * s + 1) ** 0.5, t, context=case["context"], y=case["y"])
    return x - s * eps

denoise = run.denoiser(denoiser)
x = case["noise"] * sigmas[0]
run.install()
try:
    with torch.no_grad():
        for i in range(len(sigmas) - 1):
            d = (x - denoise(x, torch.tensor([sigmas[i]]))) / sigmas[i]
            x = x + d * (sigmas[i + 1] - sigmas[i])
finally:
    run.remove()
assert not any("forward" in m.__dict__ or m._forward_hooks or m._forward_pre_hooks for m in unet.modules())
want = case["want"]
err, ref = float((x - want).abs().max()), float(want.abs().max())
print(f"A1111 {case['family']} {tuple(x.shape[-2:])}: max|diff| {err:.3g}, relative {err / ref:.2g}")
sys.exit(0 if err <= 1e-4 * ref else 1)
"""

CASES = [("sd15", (64, 64)), ("sd15", (37, 53)), ("sdxl", (64, 64)), ("sdxl", (37, 53))]


@pytest.mark.parametrize("family,hw", CASES, ids=[f"{c[0]}-{c[1][0]}x{c[1][1]}" for c in CASES])
def test_a1111_unet_with_the_backend_equals_diffusers(family, hw, tmp_path):
    from test_cross_host import run_diffusers, scheduler, twin_models

    unet, patcher = twin_models(family)
    steps = 4
    noise = torch.randn(1, 4, *hw, generator=torch.Generator().manual_seed(11))
    positive, _ = conds(family, 8 * hw[0], 8 * hw[1])
    sched = scheduler(steps)
    sigma0 = float(sched.sigmas[0])
    want, sigmas = run_diffusers(
        unet,
        family,
        noise * sigma0 / (1 + sigma0**2) ** 0.5,
        steps,
        0,
        positive,
        None,
        (8 * hw[0], 8 * hw[1]),
        window_seed=1234,
    )
    model = patcher.model
    y = model.encode_adm(**positive[0][1]) if family == "sdxl" else None
    train = ((1 - sched.alphas_cumprod) / sched.alphas_cumprod) ** 0.5
    case = {
        "family": family,
        "weights": model.diffusion_model.state_dict(),
        "noise": noise,
        "sigmas": [float(s) for s in sigmas],
        "train_sigmas": train.float(),
        "context": positive[0][0],
        "y": y,
        "want": want,
        "native": (NATIVE, NATIVE),
    }
    path = str(tmp_path / "case.pt")
    torch.save(case, path)
    done = subprocess.run(
        [PYTHON, "-c", A1111_SIDE, ROOT, REPO, path],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    print(done.stdout.strip())
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
