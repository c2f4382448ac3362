"""hidiff with window_shift="reference" equals the published hidiffusion 0.1.10.

The reference runs in its own virtual environment (diffusers 0.27.2, built by
``.ci/run``; override with HIDIFF_REFERENCE_PYTHON) on the same saved random-weight
models and inputs, in one subprocess for all cases. The tiny U-Nets are saved with a
native size of 256x256 (sample_size 32) so that the cases keep the published presets'
scales at a sixteenth of the pixels: SD 1.5 layout at 2x (512x512) and 2x by 4x
(512x1024), the published "1024" preset; SDXL layout at 2x (512x512: the aggressive
"2048" preset, the inpainting/Playground "2048" variant, and Turbo); DDIM and Euler,
10 steps. The published code picks its presets from the latent size alone (below 256
for SD, below 512 for SDXL), so these sizes select the same presets as full-size ones.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import diffusers
import pytest
import torch

import hidiff
from hidiff.diffusers.testing import make_unet, tiny_unet_config, tiny_vae

sys.path.insert(0, str(Path(__file__).parent / "reference"))
from common import build_pipeline, run_case  # noqa: E402
from helpers import reference_python  # noqa: E402

pytestmark = [pytest.mark.reference, pytest.mark.slow]

RUNNER = Path(__file__).parent / "reference" / "run_reference.py"
TOLERANCE = 1e-4

SD_NAME = "runwayml/stable-diffusion-v1-5"
SDXL_NAME = "stabilityai/stable-diffusion-xl-base-1.0"

# (id, family, height, width, scheduler, guidance, name the reference sees, hidiff options,
#  the preset hidiff must pick: the one the published code picks at full size)
CASES = [
    ("sd-2x-ddim-cfg", "sd", 512, 512, "ddim", 7.5, SD_NAME, {}, "sd-1024"),
    ("sd-2x-euler", "sd", 512, 512, "euler", 1.0, SD_NAME, {}, "sd-1024"),
    ("sd-2x4-ddim", "sd", 512, 1024, "ddim", 1.0, SD_NAME, {}, "sd-1024"),
    ("sd-2x4-euler", "sd", 512, 1024, "euler", 1.0, SD_NAME, {}, "sd-1024"),
    ("sdxl-2x-aggressive-ddim", "sdxl", 512, 512, "ddim", 1.0, SDXL_NAME, {}, "sdxl-2048"),
    ("sdxl-2x-aggressive-euler", "sdxl", 512, 512, "euler", 1.0, SDXL_NAME, {}, "sdxl-2048"),
    # The published code takes the non-aggressive schedule for models named "inpainting".
    (
        "sdxl-2x-gentle-euler",
        "sdxl",
        512,
        512,
        "euler",
        1.0,
        "diffusers/stable-diffusion-xl-1.0-inpainting-0.1",
        {"aggressive": False},
        "sdxl-2048-gentle",
    ),
    (
        "sdxl-turbo-ddim",
        "sdxl",
        512,
        512,
        "ddim",
        1.0,
        "stabilityai/sdxl-turbo",
        {"preset": "sdxl-turbo"},
        "sdxl-turbo",
    ),
]
STEPS = 10

NATIVE_LATENT = 32  # sample_size of the saved tiny U-Nets: 256x256 pixels


def _save_model(family, folder):
    config = tiny_unet_config("sdxl" if family == "sdxl" else "sd15", sample_size=NATIVE_LATENT)
    make_unet(config, seed=1).save_pretrained(folder / "unet")
    tiny_vae(seed=1).save_pretrained(folder / "vae")
    text_dim = config["cross_attention_dim"]
    sizes = {(c[2], c[3]) for c in CASES if c[1] == family}
    g = torch.Generator().manual_seed(7)
    for h, w in sizes:
        inputs = {
            "latents": torch.randn(1, 4, h // 8, w // 8, generator=g),
            "prompt_embeds": torch.randn(1, 77, text_dim, generator=g),
            "negative_prompt_embeds": torch.randn(1, 77, text_dim, generator=g),
        }
        if family == "sdxl":
            inputs["pooled_prompt_embeds"] = torch.randn(1, 32, generator=g)
            inputs["negative_pooled_prompt_embeds"] = torch.randn(1, 32, generator=g)
        torch.save(inputs, folder / f"inputs_{h}x{w}.pt")


def _case_dict(case, tmp):
    cid, family, h, w, scheduler, guidance, name, _, _ = case
    return dict(
        id=cid,
        family=family,
        height=h,
        width=w,
        scheduler=scheduler,
        guidance=guidance,
        name_or_path=name,
        steps=STEPS,
        seed=1234,
        model_dir=str(tmp / family),
        out=str(tmp / f"ref-{cid}.pt"),
    )


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("exactness")
    for family in ("sd", "sdxl"):
        _save_model(family, tmp / family)
    spec = {"threads": torch.get_num_threads(), "cases": [_case_dict(c, tmp) for c in CASES]}
    spec_path = tmp / "spec.json"
    spec_path.write_text(json.dumps(spec))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [reference_python(), str(RUNNER), str(spec_path)], capture_output=True, text=True, timeout=900, env=env
    )
    assert proc.returncode == 0, f"reference run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return tmp, {c["id"]: c for c in spec["cases"]}


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_equals_published_hidiffusion(reference, case):
    tmp, cases = reference
    spec = cases[case[0]]
    expected = torch.load(spec["out"])
    pipe = build_pipeline(diffusers, spec["model_dir"], spec)
    inputs = torch.load(Path(spec["model_dir"]) / f"inputs_{spec['height']}x{spec['width']}.pt")
    records = []

    def keep(p, i, t, kwargs):
        records.append(hidiff.last_call(p))
        return kwargs

    hidiff.apply_hidiffusion(pipe, window_shift="reference", **case[7])
    ours = run_case(pipe, spec, inputs, callback_on_step_end=keep)
    assert ours.shape == expected.shape
    # HiDiffusion really acted (or matching the reference would say nothing): windows at
    # every step, and a RAU-Net path in the early steps.
    assert len(records) == STEPS and all(r.window_calls > 0 for r in records)
    assert records[0].conv or records[0].pool
    assert not (records[-1].conv or records[-1].pool)
    assert records[0].preset == case[8]  # the full-size preset, at 2x
    diff = (ours - expected).abs().max().item()
    assert diff <= TOLERANCE, f"{case[0]}: max abs difference {diff:.3g} to the published hidiffusion"
