"""The memory estimate against allocator peaks measured on tiny models, and the plan of hidiff generate:
each measure only when the budget is short, said, recorded, and a refusal when nothing fits."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

import hidiff
from hidiff.app.cli import main
from hidiff.app.memory_plan import allocator_peak, measure_unet_call, parse_bytes
from hidiff.core import memory
from hidiff.core.config import HiDiffusionConfig
from hidiff.diffusers.memory import vae_shape
from hidiff.diffusers.testing import tiny_pipeline, tiny_unet_config

pytestmark = pytest.mark.usefixtures("one_thread")


def measured_and_estimated(family, side, config, attention):
    result = measure_unet_call(tiny_unet_config(family, sample_size=side // 2), side, 2, config, attention)
    return result["measured"], result["estimated"]


@pytest.mark.parametrize(
    "family,side,mode,attention",
    [
        ("sd15", 64, None, "flash"),
        ("sd15", 64, "hidiff", "flash"),
        ("sd15", 48, "hidiff", "math"),
        ("sd15", 48, None, "math"),
        ("sd15", 48, "windows", "sliced"),
        ("sdxl", 64, "hidiff", "flash"),
        ("sdxl", 48, None, "math"),
    ],
)
def test_estimate_tracks_the_measured_allocator_peak(family, side, mode, attention):
    config = {None: None, "hidiff": HiDiffusionConfig(), "windows": HiDiffusionConfig(raunet=False)}[mode]
    measured, estimated = measured_and_estimated(family, side, config, attention)
    assert measured > 0
    assert estimated == pytest.approx(measured, rel=0.15)


def test_math_attention_measures_and_estimates_the_scores_windows_divide():
    plain, plain_est = measured_and_estimated("sd15", 48, None, "math")
    windowed, windowed_est = measured_and_estimated("sd15", 48, HiDiffusionConfig(raunet=False), "math")
    assert windowed < 0.6 * plain and windowed_est < 0.6 * plain_est


def test_vae_decode_estimate_tracks_the_measured_peak():
    from diffusers import AutoencoderKL

    # a quarter of SD's VAE width (at 8 channels, tiny_vae's, fixed costs the estimate leaves out dominate)
    blocks = dict(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(32, 64, 128, 128), layers_per_block=2, norm_num_groups=8, **blocks).eval()
    for side, tiled in ((128, False), (256, True)):
        if tiled:
            vae.enable_tiling()
            vae.tile_sample_min_size, vae.tile_latent_min_size = 128, 16
        z = torch.randn(1, 4, side // 8, side // 8)
        with torch.no_grad():
            vae.decode(z)
            measured = allocator_peak(lambda z=z: vae.decode(z).sample)
        estimated = memory.vae_decode_elements(vae_shape(vae), side, side, 1, tiled) * 4
        assert estimated == pytest.approx(measured, rel=0.15)


def test_parse_bytes():
    assert parse_bytes("8GB") == 8 * 10**9
    assert parse_bytes("24 GiB") == 24 * 2**30
    assert parse_bytes("512mb") == 512 * 10**6
    with pytest.raises(ValueError, match="not a memory size"):
        parse_bytes("lots")


# ------------------------------------------------------------------ hidiff generate
@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("mem")
    tiny_pipeline("sd15", sample_size=8).save_pretrained(root / "sd")
    return str(root / "sd")


ARGS = ["--prompt", "x", "--width", "128", "--height", "96", "--steps", "2", "--seed", "1"]


def gen(model, out, *extra):
    return main(["generate", "--quiet", "--model", model, *ARGS, "--out", str(out), *map(str, extra)])


def run_memory(path):
    with Image.open(path) as image:
        return json.loads(image.text["hidiff"])["run"]["memory"]


def test_nothing_is_turned_on_when_the_budget_suffices(model, tmp_path, capsys):
    assert gen(model, tmp_path / "a.png", "--memory-budget", "10GB") == 0
    plan = run_memory(tmp_path / "a.png")
    assert plan["budget_bytes"] == 10**10 and plan["budget_source"] == "--memory-budget"
    assert not plan["vae_tiling"] and not plan["attention_slicing"] and not plan["model_offload"]
    assert 0 < plan["estimate_bytes"] == plan["planned_bytes"] < 10**10
    assert "tiling on" not in capsys.readouterr().out


def test_a_short_budget_turns_tiling_on_and_says_so(model, tmp_path, capsys):
    assert gen(model, tmp_path / "a.png", "--memory-budget", "10GB") == 0
    need = run_memory(tmp_path / "a.png")["estimate_bytes"]
    capsys.readouterr()
    # just below the one-piece estimate: tiling makes it fit
    assert gen(model, tmp_path / "b.png", "--memory-budget", need - 1000) == 0
    out = capsys.readouterr().out
    assert "VAE tiling on: 128x96 x1 (decoding in one piece needs about" in out
    assert "model offload: nothing to gain on CPU" not in out  # it fitted after tiling
    plan = run_memory(tmp_path / "b.png")
    assert plan["vae_tiling"] and plan["planned_bytes"] < need - 1000 < plan["estimate_bytes"]


def test_a_run_that_cannot_fit_is_refused_with_what_would(model, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HIDIFF_MEMORY_BUDGET", "2MB")
    assert gen(model, tmp_path / "a.png") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "needs about" in err and "more than the 2.0 MB budget (HIDIFF_MEMORY_BUDGET)" in err
    assert "with VAE tiling" in err
    assert not (tmp_path / "a.png").exists()


def test_a_bad_budget_is_a_usage_error(model, tmp_path, capsys):
    assert gen(model, tmp_path / "a.png", "--memory-budget", "lots") == 2
    assert "not a memory size" in capsys.readouterr().err


def test_info_prints_the_estimate_table(capsys):
    assert main(["info", "--model", "sdxl", "--width", "4096", "--height", "4096", "--steps", "30", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["memory"]
    modes = {(r["mode"], r["vae_tiling"]): r for r in rows}
    assert len(modes) == 8
    one, tiled = modes[("HiDiffusion (as given)", False)], modes[("HiDiffusion (as given)", True)]
    assert tiled["peak_bytes"] < one["peak_bytes"] and tiled["unet_bytes"] == one["unet_bytes"]
    assert set(one["unet_by_phase"]) <= {"conv", "pool", "windows", "plain"}
    assert main(["info", "--model", "sd15", "--width", "1024", "--height", "1024", "--attention", "math"]) == 0
    out = capsys.readouterr().out
    assert "attention math" in out and "U-Net peak per stage (as given): down.0" in out


def test_plan_turns_on_slicing_then_offload_only_as_far_as_needed(monkeypatch):
    """Every branch on CPU: the budget is injected, the device named (the plan reads only its type)."""
    from diffusers.models.attention_processor import AttnProcessor

    import hidiff.app.memory_plan as mp
    from hidiff.app.args import UsageError

    pipe = tiny_pipeline("sd15", sample_size=8)
    pipe.unet.set_attn_processor(AttnProcessor())  # materialises its scores: slicing can help
    layout = hidiff.detect_layout(pipe.unet)
    args = dict(width=512, height=512, batch=1, config=HiDiffusionConfig(), steps=4, guidance=True, free=None)

    def plan(budget, device="cpu", tiling="auto"):
        return mp.make_memory_plan(
            pipe, layout, torch.device(device), vae_tiling=tiling, budget_flag=str(budget), **args
        )

    first = plan(10**12)
    assert first.turned_on() == [] and first.peak == first.first
    tiled = mp.pipeline_estimate(
        pipe, layout, attention="math", vae_tiling=True, **{k: v for k, v in args.items() if k != "free"}
    )
    sliced = mp.pipeline_estimate(
        pipe, layout, attention="sliced", vae_tiling=True, **{k: v for k, v in args.items() if k != "free"}
    )
    assert sliced.peak < tiled.peak
    short = plan(sliced.peak)  # tiling alone is not enough, slicing is
    assert short.turned_on() == ["VAE tiling", "attention slicing"] and short.peak <= sliced.peak
    monkeypatch.setattr(mp, "_has_accelerate", lambda: True)
    offloaded = plan(sliced.peak - 1, device="cuda")
    assert offloaded.turned_on() == ["VAE tiling", "attention slicing", "model offload"]
    with pytest.raises(UsageError, match=r"would fit: \d+x\d+"):
        plan(sliced.peak - 1)  # on CPU offload gains nothing: refused, with a smaller size that fits
    assert "VAE tiling" not in plan(first.first, tiling="off").turned_on()


def test_cpu_without_a_budget_warns_instead_of_refusing(monkeypatch):
    import hidiff.app.memory_plan as mp

    pipe = tiny_pipeline("sd15", sample_size=8)
    layout = hidiff.detect_layout(pipe.unet)
    monkeypatch.delenv(mp.BUDGET_ENV, raising=False)
    plan = mp.make_memory_plan(
        pipe, layout, torch.device("cpu"), 512, 512, 1, None, 4, True, vae_tiling="auto", budget_flag=None, free=1000
    )
    assert plan.budget_source == "free memory" and plan.vae_tiling
    assert plan.actions[-1].startswith("warning: 512x512 x1 needs about")
