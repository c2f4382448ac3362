"""hidiff eval / hidiff demo mechanics on an untrained toy model (the counter itself: tests/app/test_toy.py)."""

import json

import pytest
import torch

import hidiff
from hidiff.app.cli import main
from hidiff.app.eval import METHODS, deep_shrink, generate, run_eval, save_grid, to_json
from hidiff.app.toy import NATIVE, ToyPipeline, toy_components
from hidiff.app.toy.count import count_objects

PROMPT = "one red circle on white"


@pytest.fixture(scope="module")
def pipe():
    p = ToyPipeline(**toy_components())
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def saved(tmp_path_factory, pipe):
    folder = tmp_path_factory.mktemp("toy")
    pipe.save_pretrained(folder)
    return folder


def _no_hooks(unet):
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in unet.modules())


def test_eval_rows_and_same_seeds(pipe):
    # 3 steps: RAU-Net's sd-1024 preset strides the conv in step 0 (T1 = int(3 * 0.4) = 1)
    result = run_eval(pipe, [PROMPT], samples=1, scales=(1, 2), steps=3, guidance=1.0)
    assert [(r["method"], r["scale"]) for r in result["rows"]] == [(m, s) for s in (1, 2) for m in METHODS]
    for row in result["rows"]:
        counts = [count_objects(p) for p in result["images"][(row["method"], row["scale"])]]
        assert row["duplicated"] == float(counts[0].n > 1)
        assert row["right"] == float(counts[0].matches(PROMPT))
        assert row["size"] == row["scale"] * NATIVE and row["images"] == 1
    baseline = result["images"][("baseline", 1)]
    assert baseline.shape == (1, 3, NATIVE, NATIVE)
    # At native size every method is the baseline: same seeds, nothing acts (hidiff skips native).
    for method in METHODS:
        assert torch.equal(result["images"][(method, 1)], baseline), method
    # Above it, each method changes the picture, and nothing stays attached to the model.
    for method in METHODS[1:]:
        assert not torch.equal(result["images"][(method, 2)], result["images"][("baseline", 2)]), method
    assert not hidiff.is_patched(pipe) and _no_hooks(pipe.unet)
    parsed = json.loads(to_json(result))
    assert "images" not in parsed and len(parsed["rows"]) == 2 * len(METHODS)


def test_deep_shrink_shrinks_the_deep_stages_early_only(pipe):
    seen = []
    handle = pipe.unet.down_blocks[1].register_forward_pre_hook(
        lambda m, a, k: seen.append(tuple((a[0] if a else k["hidden_states"]).shape[-2:])), with_kwargs=True
    )
    try:
        with deep_shrink(pipe, factor=2) as shrunk:
            out = pipe(
                PROMPT, height=2 * NATIVE, width=2 * NATIVE, num_inference_steps=6, guidance_scale=1.0, output_type="pt"
            ).images
    finally:
        handle.remove()
    native_stage1 = (NATIVE // 2, NATIVE // 2)
    assert seen == [native_stage1] * 2 + [(NATIVE, NATIVE)] * 4  # int(6 * 0.35) = 2 shrunk steps
    assert shrunk == [native_stage1] * 2
    assert out.shape == (1, 3, 2 * NATIVE, 2 * NATIVE) and _no_hooks(pipe.unet)


def test_hires_fix_generates_native_then_refines_at_full_size(pipe):
    sizes = []
    handle = pipe.unet.register_forward_pre_hook(lambda m, a, k: sizes.append(a[0].shape[-1]), with_kwargs=True)
    try:
        out = generate(pipe, "hiresfix", [PROMPT], 2 * NATIVE, steps=4, seed=0, guidance=1.0)
    finally:
        handle.remove()
    assert sizes == [NATIVE] * 4 + [2 * NATIVE] * 2  # strength 0.5 of 4 steps
    assert out.shape == (1, 3, 2 * NATIVE, 2 * NATIVE)


def test_grid_has_a_row_per_method_and_a_block_per_size(pipe, tmp_path):
    from PIL import Image

    result = run_eval(pipe, [PROMPT], samples=1, scales=(1, 2), methods=("baseline", "hidiff"), steps=1, guidance=1.0)
    save_grid(result, str(tmp_path / "grid.png"), per_cell=1, cell=32)
    grid = Image.open(tmp_path / "grid.png")
    assert grid.size == (80 + 2 * (32 + 4), 16 + 2 * (32 + 4))
    # the baseline's native sample sits at the first cell, upscaled 2x (nearest)
    first = torch.from_numpy(__import__("numpy").array(grid.crop((80, 16, 112, 48)))).permute(2, 0, 1)
    expected = (result["images"][("baseline", 1)][0].clamp(0, 1) * 255).round().to(torch.uint8)
    assert torch.equal(first[:, ::2, ::2], expected)


def test_cli_eval_json_and_bad_input(saved, capsys):
    code = main(
        [
            "eval",
            "--model",
            str(saved),
            "--samples",
            "1",
            "--prompts",
            PROMPT,
            "--scales",
            "2",
            "--methods",
            "baseline,hidiff",
            "--steps",
            "1",
            "--guidance",
            "1",
            "--json",
        ]
    )
    assert code == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert [(r["method"], r["size"]) for r in rows] == [("baseline", 2 * NATIVE), ("hidiff", 2 * NATIVE)]
    assert main(["eval", "--model", str(saved), "--methods", "baseline,magic"]) == 2
    assert "unknown method(s) ['magic']" in capsys.readouterr().err
    assert main(["eval", "--model", str(saved), "--prompts", "one purple circle on white"]) == 2
    assert "not in the toy vocabulary" in capsys.readouterr().err
    assert main(["eval", "--model", str(saved.parent / "nothing-here")]) == 2
    assert "no toy model" in capsys.readouterr().err


def test_cli_demo_writes_the_side_by_side_and_prints_counts(saved, tmp_path, capsys):
    from PIL import Image

    out = tmp_path / "demo.png"
    code = main(["demo", "--model", str(saved), "--scale", "2", "--samples", "2", "--steps", "2", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert (
        "without HiDiffusion  objects per image [" in printed and "with HiDiffusion     objects per image [" in printed
    )
    assert Image.open(out).size == (2 * (192 + 4), 2 * (192 + 20))
    assert main(["demo", "--model", str(saved), "--prompt", "two red circles"]) == 2
    assert "not in the toy vocabulary" in capsys.readouterr().err


@pytest.mark.slow
def test_shipped_model_draws_one_object_natively_and_duplicates_at_4x_unless_hidiff():
    """The weights in the package: the premise of hidiff eval and hidiff demo, on a few seeds."""
    from hidiff.app.toy import PROMPTS, load_toy_pipeline

    shipped = load_toy_pipeline()
    native = run_eval(shipped, list(PROMPTS), samples=1, scales=(1,), methods=("baseline",), steps=10)
    assert native["rows"][0]["right"] >= 0.9
    prompts = ["one red circle on white", "one blue square on black", "one green triangle on white"]
    big = run_eval(shipped, prompts, samples=1, scales=(4,), methods=("baseline", "hidiff"), steps=10)
    baseline, ours = big["rows"]
    assert baseline["duplicated"] >= 2 / 3
    assert ours["duplicated"] < baseline["duplicated"]


@pytest.mark.reference
@pytest.mark.slow
def test_published_method_runs_the_published_package_on_the_same_model_and_seeds(pipe, saved):
    """The published package's pictures equal hidiff's in its reference mode with the preset
    the published code picks for any toy size (sd-1024): both sides really ran the same
    model, prompts, seeds and schedule, and the published package acted on it."""
    from helpers import reference_python

    result = run_eval(
        pipe,
        [PROMPT],
        samples=2,
        scales=(2,),
        methods=("baseline", "published"),
        steps=3,
        seed=5,
        reference_python=reference_python(),
        model=str(saved),
    )
    assert [r["method"] for r in result["rows"]] == ["baseline", "published"]
    assert result["published_versions"]["hidiffusion"] == "0.1.10"
    published, baseline = result["images"][("published", 2)], result["images"][("baseline", 2)]
    assert published.shape == baseline.shape == (2, 3, 2 * NATIVE, 2 * NATIVE)
    assert (published - baseline).abs().max() > 1e-2  # it changed the pictures
    torch.manual_seed(5)  # the published window shifts draw from the global RNG
    with hidiff.hidiffusion(pipe, window_shift="reference", preset="sd-1024"):
        ours = generate(pipe, "baseline", [PROMPT] * 2, 2 * NATIVE, 3, 5, result["guidance"])
    assert (ours - published).abs().max() <= 1e-4


def test_published_method_needs_a_python_with_the_package(pipe, tmp_path):
    with pytest.raises(ValueError, match="needs --reference-python"):
        run_eval(pipe, [PROMPT], samples=1, scales=(2,), methods=("published",), steps=1)
    with pytest.raises(ValueError, match="not an executable file"):
        run_eval(
            pipe,
            [PROMPT],
            samples=1,
            scales=(2,),
            methods=("published",),
            steps=1,
            reference_python=str(tmp_path / "python"),
        )
