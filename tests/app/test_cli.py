"""`hidiff info` tells the truth about what apply changes; errors exit with 2."""

import json

import pytest

import hidiff
from hidiff.app.cli import main
from hidiff.diffusers.testing import make_unet, tiny_unet_config


def _info(capsys, *argv):
    assert main(["info", "--json", *argv]) == 0
    return json.loads(capsys.readouterr().out)


def _hooked_modules(unet):
    return {name for name, m in unet.named_modules() if name and (m._forward_pre_hooks or m._forward_hooks)}


@pytest.mark.parametrize("family,size", [("sd15", 1024), ("sdxl", 2048)])
def test_info_module_list_matches_what_apply_patches(capsys, family, size):
    info = _info(capsys, "--model", family, "--width", str(size), "--height", str(size))
    unet = make_unet(tiny_unet_config(family))  # same layout, same module names
    hidiff.apply_hidiffusion(unet)
    assert set(info["modules"]) == _hooked_modules(unet)
    assert info["family"] == ("sd1" if family == "sd15" else "sdxl")


def test_info_window_only_lists_only_attention(capsys):
    info = _info(capsys, "--model", "sd15", "--width", "1024", "--height", "1024", "--no-raunet")
    unet = make_unet(tiny_unet_config("sd15"))
    hidiff.apply_hidiffusion(unet, raunet=False)
    assert set(info["modules"]) == _hooked_modules(unet)
    assert info["conv_steps"] == [] and info["pool_steps"] == []


def test_info_step_ranges_follow_the_preset(capsys):
    info = _info(capsys, "--model", "sdxl", "--width", "2048", "--height", "2048", "--steps", "50")
    assert info["preset"] == "sdxl-2048"
    assert info["conv_steps"] == list(range(8))
    assert info["pool_steps"] == list(range(8, 20))
    info = _info(capsys, "--model", "sd15", "--width", "2048", "--height", "2048", "--steps", "20")
    assert info["preset"] == "sd-2048"
    assert info["conv_steps"] == list(range(14)) and info["pool_steps"] == list(range(6))


def test_info_at_native_changes_nothing(capsys):
    info = _info(capsys, "--model", "sd15", "--width", "512", "--height", "512")
    assert info["preset"] is None and info["modules"] == {} and info["window_steps"] == []


def test_info_reads_a_saved_model_folder(capsys, tmp_path):
    make_unet(tiny_unet_config("sdxl", in_channels=9)).save_pretrained(tmp_path / "m" / "unet")
    info = _info(capsys, "--model", str(tmp_path / "m"), "--width", "2048", "--height", "2048")
    assert info["family"] == "sdxl" and info["inpainting"] and info["preset"] == "sdxl-2048-gentle"


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["--model", "sd15", "--width", "1001", "--height", "1024"], "multiples of 8"),
        (["--model", "nothing-here", "--width", "1024", "--height", "1024"], "family name"),
        (["--model", "sd15", "--width", "1024", "--height", "1024", "--t1", "0.2", "--t2", "0.5"], "T2"),
        (["--model", "sd15", "--width", "1024", "--height", "1024", "--preset", "bogus"], "unknown preset"),
    ],
)
def test_info_bad_usage_exits_2_with_a_message(capsys, argv, needle):
    assert main(["info", *argv]) == 2
    assert needle in capsys.readouterr().err


def test_info_reads_the_pixel_space_toy_model_without_a_vae_factor(capsys):
    from hidiff.app.toy.pipeline import NATIVE, WEIGHTS, load_toy_pipeline

    info = _info(capsys, "--model", str(WEIGHTS), "--width", str(4 * NATIVE), "--height", str(4 * NATIVE))
    assert info["pixels_per_latent"] == 1 and info["native"] == [NATIVE, NATIVE]
    assert info["preset"] is not None and info["conv_steps"]
    pipe = load_toy_pipeline()
    hidiff.apply_hidiffusion(pipe)
    assert set(info["modules"]) == _hooked_modules(pipe.unet)
    # at native size nothing would change
    assert _info(capsys, "--model", str(WEIGHTS), "--width", str(NATIVE), "--height", str(NATIVE))["preset"] is None
