"""Every command that takes a model takes the shipped toy model (issue 27, fault 4), by name
(``--model toy``) and by folder (where the toy pipeline was saved): generate and its PNG
metadata re-running to the same pixels, image-to-image, batch, info and bench, and the clear
refusals of what the toy cannot do (ControlNet, inpainting)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from hidiff.app.cli import main
from hidiff.app.loading import TOY, load_base_pipeline, pixels_per_cell, toy_folder
from hidiff.app.toy.pipeline import NATIVE, WEIGHTS, ToyPipeline, load_toy_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPT = "one red circle on white"
SIZE = ["--width", str(2 * NATIVE), "--height", str(3 * NATIVE), "--steps", "3"]  # above native: HiDiffusion acts


@pytest.fixture(scope="module")
def toy_copy(tmp_path_factory):
    """The toy pipeline saved to a folder of the user's (as tools/train_toy.py --export writes it)."""
    folder = tmp_path_factory.mktemp("toy") / "my-toy"
    load_toy_pipeline().save_pretrained(folder)
    return str(folder)


def pixels(path):
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def hidiff_meta(path):
    with Image.open(path) as image:
        return json.loads(image.text["hidiff"])


@pytest.mark.parametrize("by", ["name", "folder"])
def test_generate_takes_the_toy_and_its_png_reruns_to_the_same_pixels(by, toy_copy, tmp_path):
    model = TOY if by == "name" else toy_copy
    out = tmp_path / "a.png"
    assert (
        main(["generate", "--quiet", "--model", model, "--prompt", PROMPT, *SIZE, "--seed", "5", "--out", str(out)])
        == 0
    )
    meta = hidiff_meta(out)
    assert meta["request"]["model"] == model and meta["request"]["hidiff"]
    assert pixels(out).shape == (3 * NATIVE, 2 * NATIVE, 3)  # pixel space: the size asked for
    again = tmp_path / "again.png"
    assert main(["generate", "--quiet", "--from-image", str(out), "--out", str(again)]) == 0
    assert np.array_equal(pixels(again), pixels(out))
    # the same seed through the pipeline itself: the command ran the toy, with HiDiffusion on
    other = tmp_path / "other-seed.png"
    assert main(["generate", "--quiet", "--from-image", str(out), "--seed", "6", "--out", str(other)]) == 0
    assert not np.array_equal(pixels(other), pixels(out))


def test_generate_with_and_without_hidiffusion_differ_on_the_toy(tmp_path):
    on, off = tmp_path / "on.png", tmp_path / "off.png"
    args = ["generate", "--quiet", "--model", TOY, "--prompt", PROMPT, *SIZE, "--seed", "1"]
    assert main([*args, "--out", str(on)]) == 0
    assert main([*args, "--no-hidiff", "--out", str(off)]) == 0
    assert not np.array_equal(pixels(on), pixels(off))


def test_image_to_image_on_the_toy(tmp_path):
    source = tmp_path / "source.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (3 * NATIVE, 2 * NATIVE, 3), dtype=np.uint8)).save(source)
    out = tmp_path / "i2i.png"
    args = ["generate", "--quiet", "--model", TOY, "--prompt", PROMPT, "--image", str(source), "--strength", "0.5"]
    assert main([*args, "--steps", "4", "--out", str(out)]) == 0
    again = tmp_path / "again.png"
    assert main(["generate", "--quiet", "--from-image", str(out), "--out", str(again)]) == 0
    assert np.array_equal(pixels(again), pixels(out))


def test_batch_takes_the_toy_and_each_image_reruns_from_its_png(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{PROMPT}\none blue square on black\n")
    out = tmp_path / "out"
    assert main(["batch", str(prompts), "--model", TOY, *SIZE, "--out", str(out), "--quiet"]) == 0
    images = sorted(out.glob("*.png"))
    assert len(images) == 2
    again = tmp_path / "again.png"
    assert main(["generate", "--quiet", "--from-image", str(images[1]), "--out", str(again)]) == 0
    assert np.array_equal(pixels(again), pixels(images[1]))


@pytest.mark.parametrize("by", ["name", "folder"])
def test_bench_times_the_toy_at_its_pixel_size(by, toy_copy, capsys):
    model = TOY if by == "name" else toy_copy
    side = 4 * NATIVE
    argv = ["bench", "--model", model, "--width", str(side), "--height", str(side), "--steps", "2"]
    assert main([*argv, "--repeats", "1", "--warmup", "0", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["model"] == model and result["components"]["text_encoders"] == 0  # no tokenizer, no VAE
    modes = result["modes"]
    # the toy denoises pixels: its U-Net ran at 64 x 64 (not 8 x 8, below its native 16), where RAU-Net acts
    assert modes["baseline"]["rau_steps"] == 0 and modes["hidiff"]["rau_steps"] > 0
    assert modes["hidiff"]["flops"] < modes["baseline"]["flops"]


def test_info_takes_the_toy_by_name_and_folder(toy_copy, capsys):
    for model in (TOY, toy_copy):
        assert main(["info", "--model", model, "--width", "64", "--height", "64", "--json"]) == 0
        info = json.loads(capsys.readouterr().out)
        assert info["model"] == model and info["pixels_per_latent"] == 1 and info["native"] == [NATIVE, NATIVE]
        assert info["preset"] == "sd-2048"  # 64 px is 4x the toy's native 16 px


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--controlnet", "some/controlnet", "--control-image", "x.png"], "toy model, which takes no ControlNet"),
        (["--image", "x.png", "--mask", "x.png"], "toy model, which cannot inpaint"),
    ],
)
def test_what_the_toy_cannot_do_is_refused_in_one_line(extra, words, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Image.new("RGB", (2 * NATIVE, 2 * NATIVE)).save("x.png")
    assert main(["generate", "--quiet", "--model", TOY, "--prompt", PROMPT, *extra, "--out", "o.png"]) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and "\n" not in err and not (tmp_path / "o.png").exists()


def test_loading_recognises_the_toy_by_name_and_folder_only(toy_copy, tmp_path):
    assert toy_folder(TOY) == str(WEIGHTS) and toy_folder(toy_copy) == toy_copy
    assert toy_folder(str(tmp_path)) is None and toy_folder("runwayml/stable-diffusion-v1-5") is None
    assert pixels_per_cell(TOY) == 1 and pixels_per_cell("runwayml/stable-diffusion-v1-5") == 8
    assert isinstance(load_base_pipeline(toy_copy, None, torch.float32), ToyPipeline)


def test_image_k_of_a_toy_batch_is_the_image_made_alone_with_its_generator():
    """What generate's --batch relies on: one generator per image, as in diffusers' pipelines."""
    pipe = load_toy_pipeline()
    kwargs = dict(height=2 * NATIVE, width=2 * NATIVE, num_inference_steps=2, output_type="pt")
    batch = pipe(
        PROMPT, num_images_per_prompt=3, generator=[torch.Generator().manual_seed(s) for s in (4, 5, 6)], **kwargs
    )
    alone = pipe(PROMPT, generator=torch.Generator().manual_seed(5), **kwargs)
    assert batch.images.shape[0] == 3
    assert torch.allclose(batch.images[1], alone.images[0], atol=1e-5)
    assert not torch.allclose(batch.images[0], batch.images[1], atol=1e-3)
    with pytest.raises(ValueError, match="2 generators for 3 images"):
        pipe(PROMPT, num_images_per_prompt=3, generator=[torch.Generator()] * 2, **kwargs)
