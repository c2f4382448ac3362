"""`hidiff bench`: every reported field is there, the published package really runs side by
side, and the FLOP counts agree with hand counts."""

import json

import pytest
from helpers import reference_python

from hidiff.app.bench import count_flops
from hidiff.app.cli import main
from hidiff.diffusers.testing import tiny_unet_config


def test_window_attention_flops_match_a_hand_count():
    """MSW-MSA only changes the attention scores of the windowed attn1 layers:
    full attention costs 2 matmuls x 2*B*N*N*C; four windows of N/4 tokens cost a quarter."""
    config = tiny_unet_config("sd15")
    latent = (80, 80)  # 640 px, above the tiny model's 512 px native size
    batch = 2
    base = count_flops(config, None, batch, latent, steps=1)["total"]
    msw = count_flops(config, {"raunet": False}, batch, latent, steps=1)["total"]
    n, c, layers = 80 * 80, config["block_out_channels"][0], 5  # stage 0: 2 down + 3 up attn1
    full = 4 * batch * n * n * c
    windowed = 4 * (4 * batch) * (n // 4) ** 2 * c
    assert base - msw == layers * (full - windowed)


def test_raunet_flops_match_a_hand_count():
    """The strided conv: a 3x3 conv costs 2*B*Cin*Cout*9 per output pixel; with stride 4 it
    has a quarter of the stock outputs (80 -> 20 instead of 40 per side), and so has the next
    stage. The avg-pool (sd-2048, steps < T2) quarters the map once more after the first
    attention of down_blocks.1."""
    config = tiny_unet_config("sd15")
    c0, c1 = config["block_out_channels"][:2]
    batch, steps = 2, 5  # sd-2048 at 5 steps: conv in steps 0-2 (T1 = 3), pool in step 0 (T2 = 1)
    base = count_flops(config, None, batch, (80, 80), steps)["by_module"]
    rau = count_flops(config, {"window_attn": False, "preset": "sd-2048"}, batch, (80, 80), steps)["by_module"]

    def conv3x3(cin, cout, side):
        return 2 * batch * cin * cout * 9 * side * side

    down = "down_blocks.0.downsamplers.0"
    assert base[0][down] == conv3x3(c0, c0, 40)
    assert [step[down] for step in rau] == [conv3x3(c0, c0, 20)] * 3 + [conv3x3(c0, c0, 40)] * 2
    # the stage after the conv: its first conv before the pool, its second one after it
    first, second = "down_blocks.1.resnets.0.conv1", "down_blocks.1.resnets.1.conv1"
    assert base[0][first] == conv3x3(c0, c1, 40) and base[0][second] == conv3x3(c1, c1, 40)
    assert rau[0][first] == conv3x3(c0, c1, 20) and rau[0][second] == conv3x3(c1, c1, 10)
    assert rau[1][first] == conv3x3(c0, c1, 20) and rau[1][second] == conv3x3(c1, c1, 20)
    assert rau[4] == base[4]  # the stock U-Net after T1
    # the JSON's per-mode count is the sum of these whole-call counts
    assert count_flops(config, None, batch, (80, 80), steps)["total"] == sum(step[""] for step in base)


@pytest.mark.reference
@pytest.mark.slow
def test_bench_json_with_the_published_package_and_a_chart(capsys, tmp_path):
    chart, saved = tmp_path / "bench.png", tmp_path / "bench.json"
    code = main(
        [
            "bench",
            "--tiny",
            "--width",
            "576",
            "--height",
            "576",
            "--steps",
            "3",
            "--batch",
            "1",
            "--warmup",
            "0",
            "--threads",
            "1",
            "--json",
            str(saved),
            "--reference-python",
            reference_python(),
            "--plot",
            str(chart),
            "--modes",
            "all",
        ]
    )
    assert code == 0
    table = capsys.readouterr().out  # with --json FILE the table is printed, the JSON saved
    assert [line.split()[0] for line in table.splitlines()[2:7]] == ["baseline", "hidiff", "raunet", "msw", "published"]
    assert "published: hidiffusion 0.1.10" in table
    result = json.loads(saved.read_text())
    for key in (
        "family",
        "height",
        "width",
        "steps",
        "batch",
        "repeats",
        "warmup",
        "device",
        "dtype",
        "threads",
        "torch",
        "modes",
        "published",
    ):
        assert key in result
    modes = result["modes"]
    assert list(modes) == ["baseline", "hidiff", "raunet", "msw", "published"]
    for mode in modes.values():
        assert set(mode) == {
            "total_s",
            "totals_s",
            "step_s",
            "rau_steps",
            "peak_memory_bytes",
            "flops",
            "speedup",
            "flop_speedup",
        }
        assert mode["total_s"] > 0 and mode["peak_memory_bytes"] > 0 and mode["flops"] > 0
        assert mode["totals_s"] == [mode["total_s"]]  # one repetition
        assert set(mode["step_s"]) == {"rau", "plain"}
    assert modes["baseline"]["speedup"] == 1.0 and modes["baseline"]["rau_steps"] == 0
    # sd-1024 at 3 steps: the strided conv acts in step 0 only (T1 = int(1.2) = 1)
    assert modes["hidiff"]["rau_steps"] == modes["raunet"]["rau_steps"] == 1 and modes["msw"]["rau_steps"] == 0
    assert modes["hidiff"]["step_s"]["rau"] is not None and modes["msw"]["step_s"]["rau"] is None
    assert modes["hidiff"]["flops"] < modes["msw"]["flops"] < modes["baseline"]["flops"]
    assert modes["raunet"]["flops"] < modes["baseline"]["flops"]

    # The published code ran: its own classes replaced the U-Net's modules, its call
    # counter saw every step, its RAU-Net shrank the deep stage in step 0 (seen by the
    # same probe), and its FLOPs, counted in the other Python, equal hidiff's.
    ref = result["published"]
    assert ref["hidiffusion"] == "0.1.10" and ref["diffusers"].startswith("0.27")
    assert "down_blocks.0.downsamplers.0.conv" in ref["replaced_modules"]
    assert "down_blocks.0.attentions.0.transformer_blocks.0" in ref["replaced_modules"]
    assert ref["unet_calls"] == [3]
    assert modes["published"]["rau_steps"] == 1
    assert modes["published"]["flops"] == modes["hidiff"]["flops"]

    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    assert Image.open(chart).size[0] >= 800


def test_bench_rejects_bad_input(capsys, tmp_path):
    assert main(["bench", "--tiny", "--width", "641", "--height", "640"]) == 2
    assert "multiples of 8" in capsys.readouterr().err
    assert main(["bench", "--tiny", "--repeats", "0"]) == 2
    assert "--repeats: must be at least 1" in capsys.readouterr().err
    assert main(["bench", "--tiny", "--modes", "hidiff,fast"]) == 2
    assert "unknown mode" in capsys.readouterr().err
    assert main(["bench", "--tiny", "--modes", "hidiff,published"]) == 2
    assert "--reference-python" in capsys.readouterr().err
    assert main(["bench", "--tiny", "--reference-python", str(tmp_path / "python")]) == 2
    assert "not an executable file" in capsys.readouterr().err


def test_bench_refuses_a_reference_python_without_hidiffusion(capsys):
    """This Python has diffusers 0.42 and no hidiffusion: refused before any model is built."""
    import sys

    assert main(["bench", "--tiny", "--reference-python", sys.executable]) == 2
    err = capsys.readouterr().err
    assert "has no hidiffusion package" in err and "tools/setup.sh" in err


def test_default_modes_are_the_comparison_and_all_adds_the_ablations():
    from hidiff.app.bench import _check

    args = ("sd15", 1024, 1024, 3, 1, 0)
    assert _check(*args, None, None) == ("baseline", "hidiff")
    assert _check(*args, ("all",), None) == ("baseline", "hidiff", "raunet", "msw")
    assert _check(*args, ("msw", "hidiff"), None) == ("baseline", "msw", "hidiff")  # baseline always first


@pytest.mark.slow
def test_bench_a_real_model_times_its_unet_and_its_text_encoders_and_vae_apart(capsys, tmp_path):
    """--model: the loop runs the saved model's own U-Net (its parameter count and FLOPs),
    HiDiffusion acts on it, and the text encoders and VAE are timed once on their own."""
    from hidiff.app.bench import count_flops
    from hidiff.diffusers.testing import tiny_pipeline

    pipe = tiny_pipeline("sd15", sample_size=8)  # native 64 px: 128 px is 2x
    pipe.save_pretrained(tmp_path / "model")
    saved = tmp_path / "bench.json"
    assert (
        main(
            [
                "bench",
                "--model",
                str(tmp_path / "model"),
                "--width",
                "128",
                "--height",
                "128",
                "--steps",
                "3",
                "--batch",
                "2",
                "--warmup",
                "0",
                "--threads",
                "1",
                "--json",
                str(saved),
            ]
        )
        == 0
    )
    table = capsys.readouterr().out
    assert f"{tmp_path / 'model'} (sd15) 128x128" in table and "text encoders" in table
    result = json.loads(saved.read_text())
    assert result["model"] == str(tmp_path / "model") and result["family"] == "sd15"
    assert result["unet_parameters"] == sum(p.numel() for p in pipe.unet.parameters())
    parts = result["components"]
    assert parts["prompts"] == 2 and parts["images"] == 1 and parts["text_encoders"] == 1
    assert parts["text_encoders_s"] > 0 and parts["vae_decode_s"] > 0
    assert result["modes"]["hidiff"]["rau_steps"] == 1  # RAU-Net acted on the loaded U-Net
    stock = count_flops(dict(pipe.unet.config), None, 2, (16, 16), 3)["total"]
    assert result["modes"]["baseline"]["flops"] == stock


def test_bench_model_and_family_are_exclusive(capsys, tmp_path):
    assert main(["bench", "--model", str(tmp_path), "--family", "sdxl"]) == 2
    assert "not both" in capsys.readouterr().err
    assert main(["bench", "--config", str(tmp_path)]) == 2
    assert "needs --model" in capsys.readouterr().err


def test_repetitions_alternate_the_mode_order_and_keep_each_total(monkeypatch):
    """Every other repetition runs the modes in reverse, so drift in the machine's speed over a
    repetition favours no mode; each repetition's total is kept beside the median."""
    from hidiff.app import bench

    calls = []

    def fake_run(mode, unet, scheduler, inputs):
        def run(steps):
            calls.append(mode)
            # a distinct time per call, so a total records which call it came from
            return {"times": [float(len(calls))] * steps, "phases": [False] * steps, "unet_calls": steps, "peak": 1}

        return run

    monkeypatch.setattr(bench, "_local_run", fake_run)
    result = bench.run_bench(
        tiny=True, height=256, width=256, steps=2, batch=1, repeats=3, warmup=1, modes=("hidiff", "msw")
    )
    order = ["baseline", "hidiff", "msw"]
    assert calls == order + order + order[::-1] + order
    assert result["modes"]["msw"]["totals_s"] == [2 * 6.0, 2 * 7.0, 2 * 12.0]
    assert result["modes"]["baseline"]["totals_s"] == [2 * 4.0, 2 * 9.0, 2 * 10.0]
    assert result["modes"]["baseline"]["total_s"] == 2 * 9.0


def test_the_published_line_pairs_each_repetition():
    from hidiff.app.bench_report import format_table

    def mode(totals):
        return {
            "total_s": sorted(totals)[len(totals) // 2],
            "totals_s": totals,
            "step_s": {"rau": 1.0, "plain": 1.0},
            "speedup": 1.0,
            "flop_speedup": 1.0,
            "flops": 1e9,
            "peak_memory_bytes": 2**20,
        }

    result = {
        "family": "sd15",
        "tiny": False,
        "width": 1024,
        "height": 1024,
        "batch": 1,
        "steps": 3,
        "device": "cpu",
        "dtype": "float32",
        "threads": 1,
        "repeats": 3,
        "modes": {
            "baseline": mode([9.0, 9.0, 9.0]),
            "hidiff": mode([4.0, 6.0, 5.0]),
            "published": mode([5.0, 5.0, 5.0]),
        },
        "published": {"hidiffusion": "0.1.10", "diffusers": "0.27.2", "python": "ref"},
    }
    last = format_table(result).splitlines()[-1]
    assert last.endswith("hidiff takes 1.00x its time (per repetition: 0.80x, 1.20x, 1.00x)")
