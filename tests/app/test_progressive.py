"""The progressive mode: its schedule, and hidiff generate --progressive with text-to-image, img2img,
ControlNet and CFG++ on tiny models (the images at the target size, the schedule in the metadata,
re-run to the same pixels, the pipeline left as it was)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import hidiff
from hidiff.app.cli import main
from hidiff.core import progressive
from hidiff.diffusers.progressive import run_diffusers
from hidiff.diffusers.testing import tiny_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")


def test_schedule_sizes_and_checks():
    plan = progressive.schedule((1024, 2048), 64)
    assert plan.sizes == ((512, 1024), (1024, 2048)) and plan.strengths == (0.5,)
    two = progressive.schedule((1024, 1024), 64, start=0.25, strength=0.4, levels=2)
    assert two.sizes == ((256, 256), (512, 512), (1024, 1024)) and two.strengths == (0.4, 0.4)
    assert progressive.schedule((128, 128), 64, start=0.1).sizes[0] == (64, 64)  # at least one multiple
    with pytest.raises(ValueError, match=r"in \(0, 1\)"):
        progressive.schedule((512, 512), 64, start=1.0)
    with pytest.raises(ValueError, match="strength must lie in"):
        progressive.Schedule(((64, 64), (128, 128)), (1.5,))
    with pytest.raises(ValueError, match="must grow"):
        progressive.Schedule(((128, 128), (64, 64)), (0.5,))


def test_run_progressive_calls_first_then_each_refinement():
    calls = []
    plan = progressive.schedule((256, 256), 32, start=0.25, strength=0.3, levels=2)
    out = progressive.run_progressive(
        plan, lambda size: calls.append(("first", size)) or 0, lambda size, p, s: calls.append((size, p, s)) or p + 1
    )
    assert out == 2
    assert calls == [("first", (64, 64)), ((128, 128), 0, 0.3), ((256, 256), 1, 0.3)]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from diffusers import ControlNetModel

    root = tmp_path_factory.mktemp("prog")
    pipe = tiny_pipeline("sd15", sample_size=8)
    pipe.save_pretrained(root / "sd")
    torch.manual_seed(1)
    ControlNetModel.from_unet(pipe.unet, conditioning_embedding_out_channels=(8, 16, 16, 16)).save_pretrained(
        root / "cn"
    )
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (128, 128, 3), dtype=np.uint8)).save(root / "photo.png")
    return {"sd": str(root / "sd"), "cn": str(root / "cn"), "photo": str(root / "photo.png")}


ARGS = ["--prompt", "x", "--width", "128", "--height", "128", "--steps", "4", "--seed", "3"]


def gen(models, out, *extra):
    return main(["generate", "--quiet", "--model", models["sd"], *ARGS, "--out", str(out), *map(str, extra)])


def read(path):
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")), json.loads(image.text["hidiff"])


@pytest.mark.parametrize(
    "inputs",
    [
        [],
        ["--image", "photo", "--strength", "0.75"],
        ["--controlnet", "cn", "--control-image", "photo"],
        ["--scheduler", "ddim", "--cfgpp", "0.5"],
    ],
    ids=["text2img", "img2img", "controlnet", "cfgpp"],
)
def test_progressive_composes_and_reruns(models, tmp_path, inputs):
    inputs = [models.get(a, a) for a in inputs]
    assert gen(models, tmp_path / "d.png", *inputs) == 0
    assert gen(models, tmp_path / "p.png", *inputs, "--progressive") == 0
    direct, _ = read(tmp_path / "d.png")
    pixels, meta = read(tmp_path / "p.png")
    assert pixels.shape == (128, 128, 3)
    assert meta["run"]["progressive"] == {"sizes": [[64, 64], [128, 128]], "strengths": [0.5]}
    assert meta["request"]["progressive"] is True
    assert not np.array_equal(pixels, direct)
    assert main(["generate", "--quiet", "--from-image", str(tmp_path / "p.png"), "--out", str(tmp_path / "r.png")]) == 0
    assert np.array_equal(read(tmp_path / "r.png")[0], pixels)


def test_progressive_leaves_the_pipeline_as_it_was_and_cfgpp_reaches_the_refiner():
    from hidiff.diffusers.cfgpp import enable_cfgpp

    pipe = tiny_pipeline("sd15", sample_size=8)
    pipe.set_progress_bar_config(disable=True)
    enable_cfgpp(pipe, scheduler="ddim", guidance=0.5)
    hidiff.apply_hidiffusion(pipe)
    scheduler = pipe.scheduler
    seen = []

    def first(size):
        return dict(prompt="x", height=size[0], width=size[1], num_inference_steps=2, output_type="pil")

    def refine(refiner, size, images, strength):
        seen.append((type(refiner).__name__, type(refiner.scheduler).__name__, hidiff.is_patched(refiner)))
        return dict(prompt="x", image=images, strength=strength, num_inference_steps=4)

    plan = progressive.schedule((128, 128), 64)
    images, preset = run_diffusers(pipe, plan, first, refine, hidiff.get_patch(pipe).config, ("ddim", 0.5))
    assert images[0].size == (128, 128) and preset is not None
    assert seen == [("StableDiffusionImg2ImgPipeline", type(scheduler).__name__, True)]
    assert hidiff.is_patched(pipe) and type(pipe.scheduler) is type(scheduler)


def test_progressive_errors(models, tmp_path, capsys):
    assert gen(models, tmp_path / "a.png", "--progressive-start", "0.5") == 2
    assert "need --progressive" in capsys.readouterr().err
    assert gen(models, tmp_path / "a.png", "--progressive", "--progressive-start", "1.5") == 2
    assert "(0, 1)" in capsys.readouterr().err
    assert gen(models, tmp_path / "a.png", "--progressive", "--no-hidiff") == 2
    assert "drop --no-hidiff" in capsys.readouterr().err


def test_toy_eval_progressive_method_makes_target_size_pictures():
    from hidiff.app.eval import generate
    from hidiff.app.toy.pipeline import load_toy_pipeline

    pipe = load_toy_pipeline()
    pictures = generate(pipe, "progressive", ["one red circle on white"], 32, 2, 0, 1.0)
    assert pictures.shape == (1, 3, 32, 32)
    direct = generate(pipe, "hidiff", ["one red circle on white"], 32, 2, 0, 1.0)
    assert not torch.equal(pictures, direct)


def test_python_api_runs_every_pass_with_hidiffusion_and_removes_it():
    pipe = tiny_pipeline("sd15", sample_size=8)
    pipe.set_progress_bar_config(disable=True)
    images = hidiff.progressive(pipe, "x", 128, 128, num_inference_steps=4, seed=0)
    assert [im.size for im in images] == [(128, 128)]
    assert not hidiff.is_patched(pipe)
    again = hidiff.progressive(pipe, "x", 128, 128, num_inference_steps=4, seed=0)
    assert np.array_equal(np.asarray(images[0]), np.asarray(again[0]))
    other = hidiff.progressive(pipe, "x", 128, 128, num_inference_steps=4, seed=0, strength=0.75)
    assert not np.array_equal(np.asarray(images[0]), np.asarray(other[0]))


def test_default_start_is_twice_native_at_most_half_the_target():
    assert progressive.default_start((2048, 2048), (512, 512)) == 0.5  # 4x: 2x native is half the target
    assert progressive.default_start((4096, 4096), (512, 512)) == 0.25  # 8x: 2x native
    assert progressive.default_start((1024, 1024), (512, 512)) == 0.5  # 2x: at most half the target
