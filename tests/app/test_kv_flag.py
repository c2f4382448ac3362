"""--kv-downsample and --kv-levels on hidiff info, generate and bench."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import hidiff
from hidiff.app.bench import count_flops, run_bench
from hidiff.app.cli import main
from hidiff.diffusers.testing import make_unet, tiny_pipeline, tiny_unet_config


def _info(capsys, *argv):
    assert main(["info", "--json", *argv]) == 0
    return json.loads(capsys.readouterr().out)


def _hooked_modules(unet):
    return {name for name, m in unet.named_modules() if name and (m._forward_pre_hooks or m._forward_hooks)}


@pytest.mark.filterwarnings("ignore:hidiff. UNet2DConditionModel was patched without")
@pytest.mark.parametrize("extra", [[], ["--no-raunet", "--no-window-attn"]])
def test_info_shows_where_it_acts(capsys, extra):
    info = _info(capsys, "--model", "sd15", "--width", "1024", "--height", "1024", "--kv-downsample", "2", *extra)
    unet = make_unet(tiny_unet_config("sd15"))
    hidiff.apply_hidiffusion(unet, kv_downsample=2, raunet=not extra, window_attn=not extra)
    assert set(info["modules"]) == _hooked_modules(unet)
    acting = sorted(k for k, v in info["modules"].items() if "downsampled 2x per side" in v)
    assert acting == sorted(
        [f"down_blocks.0.attentions.{i}.transformer_blocks.0.attn1" for i in range(2)]
        + [f"up_blocks.3.attentions.{i}.transformer_blocks.0.attn1" for i in range(3)]
    )
    assert info["kv_steps"] == list(range(50)) and info["config"]["kv_downsample"] == 2


def test_info_default_is_off(capsys):
    info = _info(capsys, "--model", "sd15", "--width", "1024", "--height", "1024")
    assert info["kv_steps"] == [] and info["config"]["kv_downsample"] == 1
    assert not any("downsampled" in v for v in info["modules"].values())


@pytest.mark.parametrize("command", ["info", "generate", "bench"])
@pytest.mark.parametrize("value", ["3", "0", "two"])
def test_bad_factor_exits_2(capsys, command, value):
    argv = {"info": ["--model", "sd15", "--width", "1024", "--height", "1024"], "generate": [], "bench": ["--tiny"]}
    assert main([command, *argv[command], "--kv-downsample", value]) == 2
    assert "--kv-downsample" in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore:hidiff. UNet2DConditionModel was patched without")
def test_info_shows_the_deeper_level(capsys):
    argv = ["--model", "sd15", "--width", "1024", "--height", "1024", "--kv-downsample", "2", "--kv-levels", "2"]
    info = _info(capsys, *argv)
    assert info["kv_stages"] == ["down_blocks.0", "up_blocks.3", "down_blocks.1", "up_blocks.2"]
    assert info["config"]["kv_levels"] == 2
    unet = make_unet(tiny_unet_config("sd15"))
    hidiff.apply_hidiffusion(unet, kv_downsample=2, kv_levels=2)
    assert set(info["modules"]) == _hooked_modules(unet)
    deep = sorted(k for k, v in info["modules"].items() if "(kv level 2)" in v)
    assert deep == sorted(
        [f"down_blocks.1.attentions.{i}.transformer_blocks.0.attn1" for i in range(2)]
        + [f"up_blocks.2.attentions.{i}.transformer_blocks.0.attn1" for i in range(3)]
    )
    assert main(["info", *argv]) == 0
    assert "kv_stages     down_blocks.0, up_blocks.3, down_blocks.1, up_blocks.2" in capsys.readouterr().out
    assert _info(capsys, *argv[:6], "--kv-downsample", "2")["kv_stages"] == ["down_blocks.0", "up_blocks.3"]


@pytest.mark.parametrize(
    "command, argv",
    [
        ("info", ["--kv-levels", "3"]),
        ("generate", ["--kv-levels", "3"]),
        ("bench", ["--kv-levels", "3"]),
        ("info", ["--kv-levels", "2"]),  # without --kv-downsample
        ("bench", ["--kv-levels", "2"]),
    ],
)
def test_bad_levels_exit_2_with_one_line(capsys, command, argv):
    given = {"info": ["--model", "sd15", "--width", "1024", "--height", "1024"], "generate": [], "bench": ["--tiny"]}
    assert main([command, *given[command], *argv]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert (
        ("--kv-levels" in err) if argv[1] == "3" else ("kv-downsample 2 or 4" in err or "kv_downsample=2 or 4" in err)
    )


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("kvmodel")
    tiny_pipeline("sd15", sample_size=8).save_pretrained(root / "sd")
    return str(root / "sd")


@pytest.mark.slow
def test_generate_records_it_in_the_png_and_reruns(saved_model, tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = tmp_path / "a.png"
        size = ["--width", "128", "--height", "96", "--steps", "2", "--seed", "3"]
        common = ["generate", "--quiet", "--model", saved_model, "--prompt", "one red circle", *size]
        assert main([*common, "--kv-downsample", "4", "--kv-levels", "2", "--out", str(out)]) == 0
        with Image.open(out) as image:
            data = json.loads(image.text["hidiff"])
            first = np.asarray(image.convert("RGB"))
        assert data["request"]["hidiff_config"]["kv_downsample"] == 4
        assert data["request"]["hidiff_config"]["kv_levels"] == 2
        assert main(["generate", "--quiet", "--from-image", str(out), "--out", str(tmp_path / "b.png")]) == 0
        with Image.open(tmp_path / "b.png") as image:
            assert np.array_equal(np.asarray(image.convert("RGB")), first)
        assert main([*common, "--out", str(tmp_path / "c.png")]) == 0
        with Image.open(tmp_path / "c.png") as image:
            config = json.loads(image.text["hidiff"])["request"]["hidiff_config"]
            assert config["kv_downsample"] == 1 and config["kv_levels"] == 1
            assert not np.array_equal(np.asarray(image.convert("RGB")), first)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
def test_kv_flops_match_a_hand_count():
    """Windowed attention over n tokens in 4 windows of n/4: QK^T and AV cost 2 * 2 * q * k * c
    per window; with keys/values from a 2x-downsampled window, k is n/16 and to_k/to_v see a
    quarter of the tokens (a linear costs 2 * tokens * c * c)."""
    config = tiny_unet_config("sd15")
    batch, latent = 2, (80, 80)
    msw = count_flops(config, {"raunet": False}, batch, latent, steps=1)["total"]
    kv = count_flops(config, {"raunet": False, "kv_downsample": 2}, batch, latent, steps=1)["total"]
    n, c, layers = 80 * 80, config["block_out_channels"][0], 5
    attention = 4 * (4 * batch) * (n // 4) * (n // 4) * c
    attention_kv = 4 * (4 * batch) * (n // 4) * (n // 16) * c
    projections = 2 * (2 * batch * n * c * c) * 3 // 4
    assert msw - kv == layers * (attention - attention_kv + projections)
    # kv_levels 2 adds the 40x40 stage, unwindowed: QK^T and AV over n1 / 4 keys instead of n1
    deep = count_flops(config, {"raunet": False, "kv_downsample": 2, "kv_levels": 2}, batch, latent, steps=1)["total"]
    n1, c1 = 40 * 40, config["block_out_channels"][1]
    attention = 4 * batch * n1 * n1 * c1
    attention_kv = 4 * batch * n1 * (n1 // 4) * c1
    projections = 2 * (2 * batch * n1 * c1 * c1) * 3 // 4
    assert kv - deep == layers * (attention - attention_kv + projections)


@pytest.mark.slow
def test_bench_adds_the_kv_mode():
    result = run_bench(family="sd15", tiny=True, height=640, width=640, steps=1, batch=1, warmup=0, kv_downsample=2)
    assert list(result["modes"]) == ["baseline", "hidiff", "hidiff-kv2"]
    kv, plain = result["modes"]["hidiff-kv2"], result["modes"]["hidiff"]
    assert kv["flops"] < plain["flops"] and kv["flop_speedup"] > plain["flop_speedup"]
    result = run_bench(
        family="sd15", tiny=True, height=640, width=640, steps=1, batch=1, warmup=0, per_phase=True,
        modes=("hidiff-kv2",), kv_downsample=2, kv_levels=2,
    )  # fmt: skip
    assert list(result["modes"]) == ["baseline", "hidiff-kv2", "hidiff-kv2-l2"]
    assert result["modes"]["hidiff-kv2-l2"]["flops"] < result["modes"]["hidiff-kv2"]["flops"]
