"""Misuse of every ``hidiff`` subcommand: exit code 2, one line on stderr that names the problem
and the fix, no traceback, and nothing loaded (every model loader raises if it is called)."""

from __future__ import annotations

import json

import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from hidiff.app.cli import main

MODEL = ["--model", "hidiff-tests/never-loaded"]  # a hub id: loading it would fail, not exit 2
INFO = ["info", "--model", "sd15", "--width", "1024", "--height", "1024"]


class Loaded(BaseException):
    """A model loader ran (a BaseException, so that the CLI's error handler does not turn it into exit 1)."""


@pytest.fixture
def no_loading(monkeypatch):
    import diffusers
    from diffusers.configuration_utils import ConfigMixin

    import hidiff.app.bench
    import hidiff.app.cli
    import hidiff.app.eval
    import hidiff.app.loading
    import hidiff.app.pipeline

    def refuse(*args, **kwargs):
        raise Loaded("a model was loaded before the input was checked")

    for module, name in (
        (hidiff.app.loading, "load_base_pipeline"),
        (hidiff.app.loading, "load_pipeline"),
        (hidiff.app.pipeline, "load_pipeline"),
        (hidiff.app.eval, "load_toy_pipeline"),
        (hidiff.app.bench, "make_unet"),
        (hidiff.app.bench, "load_model"),
        (hidiff.app.cli, "load_unet_skeleton"),
    ):
        monkeypatch.setattr(module, name, refuse, raising=False)
    monkeypatch.setattr(ConfigMixin, "from_config", classmethod(refuse))
    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", classmethod(refuse))
    monkeypatch.setattr(diffusers.ModelMixin, "from_pretrained", classmethod(refuse))


def _png(path, text=None):
    info = PngInfo()
    for key, value in (text or {}).items():
        info.add_text(key, value)
    Image.new("RGB", (16, 16), "white").save(path, pnginfo=info)
    return path


def _hidiff_png(path, request, index=None):
    meta = {"format": 1, "request": {"model": "hidiff-tests/never-loaded", **request}, "index": index}
    return _png(path, {"hidiff": json.dumps(meta)})


@pytest.fixture
def files(tmp_path):
    (tmp_path / "folder").mkdir()
    (tmp_path / "taken.png").mkdir()  # --out taken: taken.png, a folder
    return {
        "{dir}": tmp_path / "folder",
        "{existing}": _png(tmp_path / "existing.png"),
        "{photo}": _png(tmp_path / "photo.png"),
        "{plain}": _png(tmp_path / "plain.png"),
        "{bad-json}": _png(tmp_path / "bad-json.png", {"hidiff": "{not json"}),
        "{not-a-dict}": _png(tmp_path / "list.png", {"hidiff": "[1, 2]"}),
        "{wrong-type}": _hidiff_png(tmp_path / "wrong-type.png", {"steps": "many"}),
        "{zero-steps}": _hidiff_png(tmp_path / "zero-steps.png", {"steps": 0}),
        "{batch}": _hidiff_png(tmp_path / "batch.png", {"batch": 2, "seed": 1}, index=5),
        "{out}": tmp_path / "out.png",
        "{taken}": tmp_path / "taken",
    }


# (argv, a substring of the one-line message); every case exits 2
MISUSE = [
    # hidiff info
    (INFO + ["--steps", "0"], "--steps: must be at least 1, got 0"),
    (INFO + ["--steps", "many"], "--steps: 'many' is not a whole number"),
    (["info", "--model", "sd15", "--width", "0", "--height", "1024"], "--width: must be at least 1"),
    (["info", "--model", "sd15", "--width", "1024", "--height", "-8"], "--height: must be at least 1"),
    (INFO + ["--t1", "1.5"], "--t1: must lie in [0, 1], got 1.5"),
    (INFO + ["--t2", "nan"], "--t2: must lie in [0, 1], got nan"),
    (INFO + ["--aggressive-step-ratio", "-0.1"], "--aggressive-step-ratio: must lie in [0, 1]"),
    (INFO + ["--controlnet-steps-ratio", "2"], "--controlnet-steps-ratio: must lie in [0, 1]"),
    (INFO + ["--window-seed", "-1"], "--window-seed: must lie in [0, 2**64 - 1]"),
    (INFO + ["--window-shift", "sideways"], "--window-shift: invalid choice"),
    (["info", "--model", "sd15"], "required: --width, --height"),
    # hidiff eval
    (["eval", "--steps", "0"], "--steps: must be at least 1"),
    (["eval", "--samples", "0"], "--samples: must be at least 1"),
    (["eval", "--scales", "0,2"], "--scales: must be at least 1"),
    (["eval", "--scales", "1,x"], "--scales: 'x' is not a whole number"),
    (["eval", "--scales", ","], "--scales: ',' names no scale"),
    (["eval", "--seed", "-1"], "--seed: must lie in [0, 2**64 - 1]"),
    (["eval", "--threads", "0"], "--threads: must be at least 1"),
    (["eval", "--guidance", "inf"], "--guidance: must be a finite number"),
    (["eval", "--methods", "baseline,magic"], "unknown method(s) ['magic']"),
    (["eval", "--methods", "published"], "needs --reference-python PATH"),
    (["eval", "--grid", "grid.jpg"], "grid.jpg is not a .png file name"),
    (["eval", "--prompts", "one purple circle on white"], "not in the toy vocabulary"),
    # hidiff demo
    (["demo", "--steps", "0"], "--steps: must be at least 1"),
    (["demo", "--samples", "0"], "--samples: must be at least 1"),
    (["demo", "--scale", "0"], "--scale: must be at least 1"),
    (["demo", "--seed", str(2**64)], "--seed: must lie in [0, 2**64 - 1]"),
    (["demo", "--threads", "-2"], "--threads: must be at least 1"),
    (["demo", "--out", "{dir}"], "is a folder; name a file"),
    (["demo", "--prompt", "two red circles"], "not in the toy vocabulary"),
    # hidiff bench
    (["bench", "--batch", "0"], "--batch: must be at least 1"),
    (["bench", "--steps", "0"], "--steps: must be at least 1"),
    (["bench", "--repeats", "0"], "--repeats: must be at least 1"),
    (["bench", "--warmup", "-1"], "--warmup: must be 0 or more"),
    (["bench", "--width", "0"], "--width: sizes must be positive multiples of 8"),
    (["bench", "--height", "641"], "--height: sizes must be positive multiples of 8"),
    (["bench", "--threads", "0"], "--threads: must be at least 1"),
    (["bench", "--modes", "hidiff,fast"], "unknown mode(s) ['fast']"),
    (["bench", "--modes", "hidiff,published"], "needs --reference-python PATH"),
    (["bench", "--plot", "chart.svg"], "chart.svg is not a .png file name"),
    (["bench", "--json", "{dir}"], "is a folder; name a file"),
    (["bench", "--device", "toaster"], "--device 'toaster' is not a torch device"),
    (["bench", "--tiny", "--model", "x"], "not both"),
    # hidiff generate: flags
    (["generate", *MODEL, "--guidance", "nan"], "--guidance: must be a finite number, got nan"),
    (["generate", *MODEL, "--guidance", "inf"], "--guidance: must be a finite number, got inf"),
    (["generate", *MODEL, "--seed", "-1"], "--seed: must lie in [0, 2**64 - 1]"),
    (["generate", *MODEL, "--seed", str(2**64)], "--seed: must lie in [0, 2**64 - 1]"),
    (["generate", *MODEL, "--seed", "1.5"], "--seed: '1.5' is not a whole number"),
    (["generate", *MODEL, "--seed", str(2**64 - 1), "--batch", "2"], f"pass --seed {2**64 - 2} or less"),
    (["generate", *MODEL, "--steps", "0"], "--steps: must be at least 1"),
    (["generate", *MODEL, "--batch", "0"], "--batch: must be at least 1"),
    (["generate", *MODEL, "--width", "0"], "--width: sizes must be positive multiples of 8"),
    (["generate", *MODEL, "--width", "100"], "--width: sizes must be positive multiples of 8"),
    (["generate", *MODEL, "--height", "-8"], "--height: sizes must be positive multiples of 8"),
    (["generate", *MODEL, "--strength", "0"], "--strength: must lie in (0, 1]"),
    (["generate", *MODEL, "--strength", "1.5"], "--strength: must lie in (0, 1]"),
    (
        ["generate", *MODEL, "--image", "{photo}", "--strength", "0.1", "--steps", "5"],
        "int(5 x 0.1) = 0 steps; pass --strength 0.2 or more",
    ),
    (["generate", *MODEL, "--controlnet-scale", "nan"], "--controlnet-scale: must be a finite number"),
    (["generate", *MODEL, "--scheduler", "ddim", "--cfgpp", "1.5"], "lam in [0, 1]"),
    (["generate", *MODEL, "--scheduler", "ddim", "--cfgpp", "nan"], "lam in [0, 1]"),
    (["generate", *MODEL, "--cfgpp", "0.5"], "--cfgpp needs --scheduler"),
    (["generate", *MODEL, "--scheduler", "fastest"], "--scheduler: invalid choice"),
    (["generate", *MODEL, "--dtype", "float64"], "--dtype: invalid choice"),
    (["generate", *MODEL, "--t1", "-0.1"], "--t1: must lie in [0, 1]"),
    (["generate", *MODEL, "--mask", "{photo}"], "--mask needs --image"),
    (["generate", *MODEL, "--device", "toaster"], "is not a torch device"),
    (["generate", "--prompt", "x"], "--model is required"),
    # hidiff generate: outputs
    (["generate", *MODEL, "--out", "x.jpg"], "needs PNG text chunks; name a .png file, e.g. x.png"),
    (["generate", *MODEL, "--out", "{existing}"], "exists; pass --overwrite to replace it"),
    (["generate", *MODEL, "--out", "{taken}"], "taken.png: a folder of that name exists"),
    (["generate", *MODEL, "--out", "{existing}/x.png"], "is not a writable folder"),
    # hidiff generate --from-image
    (["generate", "--from-image", "{plain}"], "has no 'hidiff' metadata"),
    (["generate", "--from-image", "{bad-json}"], "unreadable hidiff metadata"),
    (["generate", "--from-image", "{not-a-dict}"], "unreadable hidiff metadata (it holds no 'request' object)"),
    (["generate", "--from-image", "{wrong-type}"], "steps is 'many', of the wrong type"),
    (["generate", "--from-image", "{zero-steps}", "--out", "{out}"], "--steps: must be at least 1"),
    (["generate", "--from-image", "{batch}", "--out", "{out}"], "names image 5 of a batch of 2"),
    (["generate", "--from-image", "{photo}.missing"], "no such file"),
]


@pytest.mark.parametrize("argv,needle", MISUSE, ids=[" ".join(a) for a, _ in MISUSE])
def test_misuse_exits_2_with_one_line_before_loading(no_loading, files, capsys, argv, needle):
    argv = [_fill(a, files) for a in argv]
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    assert err.endswith("\n") and err.count("\n") == 1, err  # one line
    assert err.startswith(f"hidiff {argv[0]}: error: ")
    assert needle in err
    assert out == ""
    assert not files["{out}"].exists()


def _fill(arg, files):
    for key, path in files.items():
        arg = arg.replace(key, str(path))
    return arg


def test_out_names_a_png_inside_a_folder_or_with_png_added(tmp_path):
    from hidiff.app.output import output_base

    assert output_base(str(tmp_path), 7) == tmp_path / "hidiff-7.png"
    assert output_base(str(tmp_path / "new") + "/", 7) == tmp_path / "new" / "hidiff-7.png"
    assert output_base(str(tmp_path / "shot"), 7) == tmp_path / "shot.png"
    assert output_base(str(tmp_path / "shot.PNG"), 7) == tmp_path / "shot.PNG"
    assert output_base(None, 7).name == "hidiff-7.png"


def test_help_tells_where_out_writes_and_about_overwrite(capsys):
    assert main(["generate", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "hidiff-SEED.png inside it" in text and "--overwrite" in text
