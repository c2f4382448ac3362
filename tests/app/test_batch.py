"""`hidiff batch`: a prompt file in one process and in two (accelerate launch) gives the same images,
a killed run resumes to the same set, a bad line is recorded and the rest go on, per-line options
are honoured, and usage errors stop it (exit 2) before any model loads."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import hidiff.app.batch as batch
import hidiff.app.metadata as metadata
import hidiff.app.pipeline as pipeline
import hidiff.app.run as running
from hidiff.app.cli import main
from hidiff.app.request import Request
from hidiff.diffusers.testing import tiny_pipeline

ROOT = Path(__file__).resolve().parents[2]
SIZE = ["--width", "128", "--height", "96", "--steps", "2"]  # above the tiny model's 64x64 native
PROMPTS = [f"a red circle number {i}" for i in range(10)]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "sd"
    tiny_pipeline("sd15", sample_size=8).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("# ten prompts\n" + "\n".join(PROMPTS[:5]) + "\n\n" + "\n".join(PROMPTS[5:]) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def reference(model, prompts, tmp_path_factory):
    """One uninterrupted single-process run in this process: (folder, exit code, stderr)."""
    out = tmp_path_factory.mktemp("reference")
    code = main(["batch", prompts, "--out", str(out), "--model", model, *SIZE])
    return out, code


def pngs(folder):
    return sorted(p.name for p in Path(folder).iterdir() if p.suffix == ".png")


def pixels(path):
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def meta(path):
    with Image.open(path) as image:
        return image.text["parameters"], json.loads(image.text["hidiff"])


def manifest(folder):
    return [json.loads(line) for line in (Path(folder) / batch.MANIFEST).read_text().splitlines()]


def assert_same_images(folder, reference_folder):
    assert pngs(folder) == pngs(reference_folder)
    for name in pngs(reference_folder):
        assert np.array_equal(pixels(Path(folder) / name), pixels(Path(reference_folder) / name)), name


def environment(tmp_path):
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HOME": str(tmp_path / "hf"),  # no accelerate config of this machine's user
        "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }


def cli_command(*argv):
    return [sys.executable, "-m", "hidiff.app.cli", "batch", *map(str, argv)]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------ one process
@pytest.mark.slow
def test_one_process_writes_every_line_with_generate_metadata_and_a_manifest(
    reference, model, prompts, tmp_path, capsys, monkeypatch
):
    out, code = reference
    assert code == 0
    names = pngs(out)
    assert len(names) == 10
    assert names[0].startswith("00002-a-red-circle-number-0-")  # line 2: the comment is line 1
    assert names[-1].startswith("00012-a-red-circle-number-9-")
    entries = manifest(out)
    assert sorted(e["file"] for e in entries) == names
    assert {e["status"] for e in entries} == {"done"} and all(e["error"] is None for e in entries)
    for e in entries:
        parameters, data = meta(out / e["file"])
        assert data["request"] == e["settings"]  # the manifest holds what the PNG re-runs
        assert data["request"]["prompt"] == PROMPTS[e["line"] - 2 - (e["line"] > 7)]
        assert e["seed"] == data["request"]["seed"] == e["line"] - 1  # default seed: line number - 1
        assert "HiDiffusion: sd-1024" in parameters and e["time"] and e["seconds"] > 0
    # generate's metadata: `hidiff generate --from-image` re-makes the same pixels
    first = out / names[0]
    assert main(["generate", "--quiet", "--from-image", str(first), "--out", str(tmp_path / "again.png")]) == 0
    assert np.array_equal(pixels(tmp_path / "again.png"), pixels(first))

    # a rerun finds everything done: no model loaded, nothing written, the same files
    capsys.readouterr()
    monkeypatch.setattr(pipeline, "load", lambda *a, **k: pytest.fail("a model was loaded"))
    assert main(["batch", prompts, "--out", str(out), "--model", model, *SIZE]) == 0
    assert manifest(out) == entries and pngs(out) == names
    assert "0 made, 10 already done, 0 failed, of 10" in capsys.readouterr().err

    # killed after a PNG was renamed into place but before its manifest line: the rerun records it, once;
    # a temporary file left by a killed run is removed
    (out / batch.MANIFEST).write_text("".join(json.dumps(e) + "\n" for e in entries[:-1]))
    (out / f".{names[3]}.partial-1.png").write_bytes(b"half a PNG")
    assert main(["batch", prompts, "--out", str(out), "--model", model, *SIZE]) == 0
    recovered = manifest(out)[-1]
    assert recovered["recovered"] and {**recovered, "recovered": None, "time": None, "process": None} == {
        **entries[-1],
        "recovered": None,
        "time": None,
        "process": None,
    }
    assert len(manifest(out)) == 10 and sorted(os.listdir(out)) == sorted([*names, batch.MANIFEST])


# ------------------------------------------------------------------ two processes
def accelerate_command(*argv):
    """Two processes: `--cpu --num_processes 2` starts one unless MPI is set up; the torchrun launcher
    that --multi_gpu picks starts two, which form a gloo group on a machine without CUDA."""
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    launch += ["--main_process_port", str(free_port()), "-m", "hidiff.app.cli", "batch"]
    return [*launch, *map(str, argv)]


@pytest.mark.slow
def test_two_processes_under_accelerate_launch_make_the_same_images(reference, model, prompts, tmp_path):
    out = tmp_path / "two"
    done = subprocess.run(
        accelerate_command(prompts, "--out", out, "--model", model, *SIZE),
        env=environment(tmp_path),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "process 1/2: 5 made" in done.stderr and "process 2/2: 5 made" in done.stderr
    assert "batch: 10/10 images" in done.stdout
    entries = manifest(out)
    assert Counter(e["process"] for e in entries) == {0: 5, 1: 5}  # a real second process made half
    assert_same_images(out, reference[0])


# ------------------------------------------------------------------ killed and resumed
@pytest.mark.slow
@pytest.mark.parametrize(
    "launcher, stop",
    [("one", signal.SIGKILL), ("one", signal.SIGTERM), ("accelerate", signal.SIGTERM)],
    ids=["SIGKILL", "SIGTERM", "accelerate-SIGTERM"],
)
def test_a_killed_run_resumes_to_the_same_set_nothing_lost_nothing_made_twice(
    reference, model, prompts, tmp_path, launcher, stop
):
    out = tmp_path / "resumed"
    argv = (prompts, "--out", out, "--model", model, *SIZE)
    command = cli_command(*argv) if launcher == "one" else accelerate_command(*argv)
    process = subprocess.Popen(command, env=environment(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    manifest_file = out / batch.MANIFEST
    deadline = time.monotonic() + 300
    while not (manifest_file.exists() and manifest_file.read_text().strip()):
        assert process.poll() is None, process.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.02)
    process.send_signal(stop)  # to the launcher, which stops its processes
    process.wait(timeout=60)
    process.stderr.close()
    made_before = len(manifest(out))
    assert 1 <= made_before < 10, "the run ended before it was stopped: nothing to resume"

    command = cli_command(*argv) if launcher == "one" else accelerate_command(*argv)  # a free port again
    done = subprocess.run(command, env=environment(tmp_path), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "already done" in done.stderr
    entries = manifest(out)
    per_file = Counter(e["file"] for e in entries if e["status"] == "done")
    assert set(per_file) == set(pngs(reference[0])) and set(per_file.values()) == {1}  # none lost, none twice
    assert sorted(os.listdir(out)) == sorted([*pngs(reference[0]), batch.MANIFEST])  # no temporary file left
    assert_same_images(out, reference[0])


# ------------------------------------------------------------------ failing lines
def test_a_bad_line_is_recorded_with_its_error_and_the_rest_go_on(model, tmp_path, capsys):
    lines = [
        {"prompt": "first", "seed": 1},
        {"prompt": "bad size", "width": 100},
        {"prompt": "missing image", "image": "nowhere.png", "strength": 0.5},
        {"prompt": "last", "seed": 2},
    ]
    file = tmp_path / "p.jsonl"
    file.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    out = tmp_path / "out"
    argv = ["batch", str(file), "--out", str(out), "--model", model, *SIZE]
    assert main(argv) == 1
    entries = {e["line"]: e for e in manifest(out)}
    assert [entries[n]["status"] for n in (1, 2, 3, 4)] == ["done", "failed", "failed", "done"]
    assert "multiples of 8" in entries[2]["error"] and entries[2]["settings"]["width"] == 100
    assert str(tmp_path / "nowhere.png") in entries[3]["error"]  # relative to the prompt file's folder
    assert len(pngs(out)) == 2
    captured = capsys.readouterr()
    assert "2 failed (lines 2, 3)" in captured.out and "Traceback" not in captured.err
    # a rerun tries the failed lines again, and only them
    assert main(argv) == 1
    again = manifest(out)[len(entries) :]
    assert sorted((e["line"], e["status"]) for e in again) == [(2, "failed"), (3, "failed")]


# ------------------------------------------------------------------ per-line options
def test_jsonl_lines_set_seed_size_steps_hidiffusion_and_batch(model, tmp_path):
    lines = [
        {"prompt": "a", "seed": 42, "width": 96, "height": 128, "steps": 3, "guidance": 5.0, "negative_prompt": "blur"},
        {"prompt": "b", "hidiff": False, "scheduler": "euler"},
        {"prompt": "c", "seed": 5, "batch": 2, "t1": 0.5},
    ]
    file = tmp_path / "p.jsonl"
    file.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    out = tmp_path / "out"
    assert main(["batch", str(file), "--out", str(out), "--model", model, *SIZE, "--seed", "100"]) == 0
    by_line = {}
    for e in manifest(out):
        by_line.setdefault(e["line"], []).append(meta(out / e["file"]))
    ((parameters, a),) = by_line[1]
    request = a["request"]
    assert (request["seed"], request["width"], request["height"], request["steps"]) == (42, 96, 128, 3)
    assert request["guidance"] == 5.0 and request["negative_prompt"] == "blur"
    assert "Steps: 3" in parameters and "Size: 96x128" in parameters and "Negative prompt: blur" in parameters
    ((parameters, b),) = by_line[2]
    assert b["request"]["hidiff"] is False and b["run"]["preset"] is None and "HiDiffusion: off" in parameters
    assert b["request"]["seed"] == 101  # no seed on line 2: --seed + (2 - 1)
    assert b["run"]["scheduler"] == "EulerDiscreteScheduler" and b["request"]["steps"] == 2  # the flags' default
    c = [data for _, data in by_line[3]]
    assert sorted(d["request"]["seed"] for d in c) == [5, 6]  # --batch 2: seed, seed + 1, one image each
    assert all(d["request"]["batch"] == 1 and d["request"]["hidiff_config"]["t1_ratio"] == 0.5 for d in c)
    assert a["request"]["hidiff_config"]["t1_ratio"] is None
    # line 1's settings after line 2 ran without HiDiffusion and with another scheduler: nothing carried over
    assert a["run"]["scheduler"] == "DDIMScheduler" and a["run"]["preset"] is not None


# ------------------------------------------------------------------ usage errors
def test_usage_errors_exit_2_in_one_line_before_any_model_loads(model, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(pipeline, "load", lambda *a, **k: pytest.fail("a model was loaded"))
    text = tmp_path / "p.txt"
    text.write_text("one\n")
    jsonl = tmp_path / "p.jsonl"
    out = str(tmp_path / "out")
    cases = [
        ([str(tmp_path / "none.txt"), "--out", out, "--model", model], "no such file"),
        ([str(text), "--model", model], "--out DIR is required"),
        ([str(text), "--out", out], "--model is required"),
        ([str(text), "--out", out, "--model", model, "--compare"], "--compare is for hidiff generate"),
        ([str(text), "--out", str(text), "--model", model], "is a file"),
        ([str(text), "--out", out, "--model", str(tmp_path / "nomodel")], "no such file or folder"),
        ([str(text), "--out", out, "--model", model, "--cfgpp", "0.5"], "--cfgpp needs --scheduler"),
        ([str(text), "--out", out, "--model", model, "--width", "100"], "multiples of 8"),
        ([str(jsonl), "--out", out, "--model", model], "p.jsonl:2: not a JSON object"),
        ([str(jsonl), "--out", out, "--model", model], "unknown key 'colour'"),
        ([str(jsonl), "--out", out, "--model", model], "width is '128', of the wrong type"),
        ([str(tmp_path / "empty.txt"), "--out", out, "--model", model], "has no prompt"),
    ]
    (tmp_path / "empty.txt").write_text("\n# nothing\n")
    bodies = iter(['{"prompt": "a"}\n{"prompt": ', '{"prompt": "a", "colour": 1}', '{"prompt": "a", "width": "128"}'])
    for argv, message in cases:
        if argv[0] == str(jsonl):
            jsonl.write_text(next(bodies))
        assert main(["batch", *argv]) == 2, message
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert not os.path.exists(out)


# ------------------------------------------------------------------ the pieces
def test_file_names_follow_the_line_and_settings_only(model):
    base = Request(model=model, width=128, height=96, steps=2)
    lines = [batch.Line(3, {"prompt": "Hello, World!"}, {}), batch.Line(4, {"prompt": "x", "batch": 2}, {})]
    jobs = batch.build_jobs(base, lines)
    assert [j.name.rsplit("-", 1)[0] for j in jobs] == ["00003-hello-world", "00004-0-x", "00004-1-x"]
    assert [j.request.seed for j in jobs] == [2, 6, 7]  # line number - 1, times the line's batch, + k
    assert [j.name for j in batch.build_jobs(base, lines)] == [j.name for j in jobs]  # deterministic
    import dataclasses

    moved = batch.build_jobs(dataclasses.replace(base, device="cuda:1"), lines)
    assert [j.name for j in moved] == [j.name for j in jobs]  # where it runs is not what it is
    other = batch.build_jobs(dataclasses.replace(base, steps=3), lines)
    assert all(a.name != b.name for a, b in zip(jobs, other))


def test_manifest_lines_survive_a_line_cut_short_and_unfinished_pngs_are_not_done(tmp_path):
    path = tmp_path / batch.MANIFEST
    batch.append_manifest(path, {"file": "a", "status": "done"})
    with open(path, "a") as f:
        f.write('{"file": "b", "sta')  # killed mid-line
    batch.append_manifest(path, {"file": "c", "status": "done"})
    assert [e["file"] for e in batch.read_manifest(path)] == ["a", "c"]

    image = Image.new("RGB", (16, 16), "red")
    good = tmp_path / "good.png"
    metadata.save_png(image, good, {"hidiff": "{}"})
    bad_meta = tmp_path / "bad-meta.png"
    metadata.save_png(image, bad_meta, {"hidiff": "{cut"})
    assert batch.is_done(good)
    cut = tmp_path / "cut.png"
    cut.write_bytes(good.read_bytes()[:-20])
    plain = tmp_path / "plain.png"
    image.save(plain)  # no hidiff metadata
    assert (
        not batch.is_done(cut)
        and not batch.is_done(plain)
        and not batch.is_done(bad_meta)
        and not batch.is_done(tmp_path / "none.png")
    )


def test_lines_of_other_tasks_and_cfgpp_share_the_loaded_model_and_leave_nothing_behind(model, tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)).save(tmp_path / "photo.png")
    lines = [
        {"prompt": "same", "seed": 3},
        {"prompt": "from a photo", "seed": 9, "image": "photo.png", "strength": 0.5, "steps": 4},  # relative path
        {"prompt": "cfg++", "scheduler": "euler", "cfgpp": 0.5},
        {"prompt": "same", "seed": 3},
        {"prompt": "cfg++", "scheduler": "euler", "cfgpp": 0.5},
        {"prompt": "from a photo", "seed": 9, "image": "photo.png", "strength": 0.5, "steps": 4},
    ]
    file = tmp_path / "p.jsonl"
    file.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    loads = []
    real_load = pipeline.load
    monkeypatch.setattr(pipeline, "load", lambda *a, **k: loads.append(1) or real_load(*a, **k))
    out = tmp_path / "out"
    assert main(["batch", str(file), "--out", str(out), "--model", model, *SIZE]) == 0
    assert len(loads) == 1  # the img2img line got the same components in its pipeline class
    files = {e["line"]: out / e["file"] for e in manifest(out)}
    _, photo = meta(files[2])
    assert photo["run"]["pipeline"] == "StableDiffusionImg2ImgPipeline"
    assert photo["request"]["image"] == str(tmp_path / "photo.png") and photo["inputs_sha256"]["image"]
    _, guided = meta(files[3])
    assert guided["request"]["cfgpp"] == 0.5 and "CFG++: 0.5" in meta(files[3])[0]
    assert guided["run"]["scheduler"] != "DDIMScheduler"
    # the last line is the first one again: the same pixels after img2img and CFG++ ran in between
    assert np.array_equal(pixels(files[1]), pixels(files[4]))
    assert np.array_equal(pixels(files[2]), pixels(files[6]))  # img2img right after CFG++ on the shared U-Net
    assert meta(files[4])[1]["run"]["scheduler"] == "DDIMScheduler"
    # and what the img2img line wrote re-runs through hidiff generate
    assert main(["generate", "--quiet", "--from-image", str(files[2]), "--out", str(tmp_path / "again.png")]) == 0
    assert np.array_equal(pixels(tmp_path / "again.png"), pixels(files[2]))


def test_a_model_that_cannot_load_stops_the_batch_instead_of_failing_every_line(tmp_path, capsys):
    (tmp_path / "p.txt").write_text("one\ntwo\n")
    (tmp_path / "notamodel").mkdir()
    argv = ["batch", str(tmp_path / "p.txt"), "--out", str(tmp_path / "out"), "--model", str(tmp_path / "notamodel")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "without model_index.json" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out" / batch.MANIFEST).exists()


def test_controlnet_lines_take_their_own_control_images(model, tmp_path):
    from diffusers import ControlNetModel, StableDiffusionPipeline

    torch.manual_seed(1)
    unet = StableDiffusionPipeline.from_pretrained(model).unet
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16, 16, 16))
    with torch.no_grad():  # a ControlNet's zero convolutions start at zero: make its hints count
        for module in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]:
            module.weight.normal_(0, 0.1)
    controlnet.save_pretrained(tmp_path / "cn")
    rng = np.random.default_rng(0)
    for name in ("edges-a.png", "edges-b.png"):
        Image.fromarray(rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)).save(tmp_path / name)
    lines = [
        {"prompt": "same", "seed": 1, "control_image": "edges-a.png"},
        {"prompt": "same", "seed": 1, "control_image": "edges-b.png", "controlnet_scale": 2.0},
    ]
    file = tmp_path / "p.jsonl"
    file.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    out = tmp_path / "out"
    argv = ["batch", str(file), "--out", str(out), "--model", model, "--controlnet", str(tmp_path / "cn"), *SIZE]
    assert main(argv) == 0
    files = {e["line"]: out / e["file"] for e in manifest(out)}
    (_, a), (_, b) = meta(files[1]), meta(files[2])
    assert a["run"]["pipeline"] == "StableDiffusionControlNetPipeline"
    assert a["request"]["control_image"] == str(tmp_path / "edges-a.png") and a["request"]["controlnet_scale"] == 1.0
    assert b["request"]["control_image"] == str(tmp_path / "edges-b.png") and b["request"]["controlnet_scale"] == 2.0
    assert a["inputs_sha256"]["control_image"] != b["inputs_sha256"]["control_image"]
    assert not np.array_equal(pixels(files[1]), pixels(files[2]))


def test_out_of_memory_on_one_line_is_recorded_and_ctrl_c_stops_cleanly(model, tmp_path, capsys, monkeypatch):
    file = tmp_path / "p.txt"
    file.write_text("small\nhuge\nsmall again\n")
    real_run = running.run_pipeline

    def run(request, *args, **kwargs):
        if request.prompt == "huge":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")
        return real_run(request, *args, **kwargs)

    monkeypatch.setattr(running, "run_pipeline", run)
    out = tmp_path / "out"
    argv = ["batch", str(file), "--out", str(out), "--model", model, *SIZE]
    assert main(argv) == 1
    entries = {e["line"]: e for e in manifest(out)}
    assert [entries[n]["status"] for n in (1, 2, 3)] == ["done", "failed", "done"]
    assert entries[2]["error"].startswith("OutOfMemoryError: CUDA out of memory")

    def interrupted(request, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(running, "run_pipeline", interrupted)
    capsys.readouterr()
    assert main(argv) == batch.EXIT_INTERRUPTED
    assert "rerun the same command to resume" in capsys.readouterr().err
    assert len(manifest(out)) == 3 and not [n for n in os.listdir(out) if ".partial-" in n]
