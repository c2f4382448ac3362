"""``hidiff edit``: the PNG re-runs the edit from its metadata, bad usage exits 2 in one line,
and on the shipped (guidance-trained) toy model a colour edit happens and keeps the object."""

import json
import random

import pytest
from PIL import Image

import hidiff
from hidiff.app.cli import main
from hidiff.app.toy import NATIVE, ToyPipeline, load_toy_pipeline, render, toy_components
from hidiff.app.toy.count import count_objects
from hidiff.app.toy.pipeline import tensor_to_pil
from hidiff.app.toy.shapes import random_scene

SOURCE, TARGET = "one red square on white", "one blue square on white"


@pytest.fixture(scope="module")
def toy_folder(tmp_path_factory):
    """An untrained toy model saved as a folder (fast; the CLI loads it like the shipped one)."""
    folder = tmp_path_factory.mktemp("toy")
    pipe = ToyPipeline(**toy_components())
    pipe.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def picture(tmp_path_factory):
    path = tmp_path_factory.mktemp("in") / "square.png"
    scene = random_scene(random.Random(0), NATIVE, SOURCE)
    tensor_to_pil(render(scene, NATIVE)).save(path)
    return path


def _edit(capsys, *argv):
    code = main(["edit", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_the_png_re_runs_the_edit_from_its_metadata(capsys, toy_folder, picture, tmp_path):
    first = tmp_path / "first.png"
    argv = ["--model", str(toy_folder), "--image", str(picture), "--source-prompt", SOURCE, "--prompt", TARGET]
    code, out, err = _edit(capsys, *argv, "--steps", "6", "--scheduler", "euler-a", "--out", str(first))
    assert code == 0, err
    meta = json.loads(Image.open(first).text["hidiff-edit"])
    assert meta["request"]["scheduler"] == "euler-a" and meta["request"]["steps"] == 6
    assert meta["request"]["cfgpp"] == hidiff.diffusers.edit.DEFAULT_EDIT_GUIDANCE and isinstance(
        meta["request"]["seed"], int
    )
    code, out, err = _edit(capsys, "--from-image", str(first))
    assert code == 0, err
    again = first.with_name("first-rerun.png")
    assert Image.open(again).tobytes() == Image.open(first).tobytes()
    # a flag overrides the metadata: another seed gives euler-a other noise
    code, out, err = _edit(
        capsys,
        "--from-image",
        str(first),
        "--seed",
        str(meta["request"]["seed"] + 1),
        "--out",
        str(tmp_path / "other.png"),
    )
    assert code == 0, err
    assert Image.open(tmp_path / "other.png").tobytes() != Image.open(first).tobytes()


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--strength", "0"], "--strength"),
        (["--strength", "1.5"], "--strength"),
        (["--cfgpp", "2"], "--cfgpp"),
        (["--cfgpp", "0.5", "--cfg-scale", "7"], "exclude each other"),
        (["--cfg-scale", "0.5"], "at least 1"),
        (["--scheduler", "heun"], "--scheduler"),
        (["--source-prompt", " "], "--source-prompt is empty"),
        (["--mask", "MASK32"], "--mask is 32x32 but --image is 16x16"),
        (["--image", "ODD"], "multiples of 8"),
        (["--image", "/nonexistent.png"], "no such file"),
        (["--from-image", "PLAIN"], "no 'hidiff-edit' metadata"),
    ],
)
def test_bad_usage_exits_2_with_one_line(capsys, toy_folder, picture, tmp_path, extra, needle):
    Image.new("L", (32, 32)).save(tmp_path / "mask32.png")
    Image.new("RGB", (20, 20)).save(tmp_path / "odd.png")
    Image.new("RGB", (16, 16)).save(tmp_path / "plain.png")
    names = {"MASK32": "mask32.png", "ODD": "odd.png", "PLAIN": "plain.png"}
    extra = [str(tmp_path / names[x]) if x in names else x for x in extra]
    argv = ["--model", str(toy_folder), "--image", str(picture), "--source-prompt", SOURCE, "--prompt", TARGET]
    code, out, err = _edit(capsys, *argv, "--steps", "4", "--out", str(tmp_path / "o.png"), *extra)
    assert code == 2
    assert needle in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "o.png").exists()


@pytest.mark.slow
def test_a_colour_edit_on_the_shipped_toy_changes_the_colour_and_keeps_the_object():
    """Trained weights: 6 red squares edited to blue (lam 0.3, strength 0.6, 20 steps) turn blue and
    keep their place and size (object-mask IoU)."""
    pipe = load_toy_pipeline()
    rng = random.Random(3)
    done, ious = 0, []
    for _ in range(6):
        picture = render(random_scene(rng, NATIVE, SOURCE), NATIVE)
        out = hidiff.edit(pipe, picture, SOURCE, TARGET, num_inference_steps=20, guidance=0.3, output_type="pt")
        out = out.images[0]
        found = count_objects(out)
        done += found.matches(TARGET)
        before = (picture - 1).abs().amax(0) > 0.3  # object pixels: away from the white background
        after = (out - 1).abs().amax(0) > 0.3
        ious.append(float((before & after).sum() / (before | after).sum()))
    assert done >= 5
    assert sum(ious) / len(ious) > 0.7
