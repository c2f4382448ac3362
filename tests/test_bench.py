"""`hidiff bench`: every reported field is there, and its FLOP counts agree with a hand count."""

import json

import pytest

from hidiff.bench import count_flops, run_bench
from hidiff.cli import main
from hidiff.testing import tiny_unet_config


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


def test_bench_json_has_every_field(capsys):
    code = main(["bench", "--tiny", "--width", "640", "--height", "640", "--steps", "5", "--batch", "1",
                 "--warmup", "0", "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    for key in ("family", "height", "width", "steps", "batch", "repeats", "device", "dtype", "threads", "modes"):
        assert key in result
    assert set(result["modes"]) == {"baseline", "hidiff", "raunet", "msw"}
    for name, mode in result["modes"].items():
        assert set(mode) == {"total_s", "step_s", "rau_steps", "peak_memory_bytes", "flops", "speedup", "flop_speedup"}
        assert mode["total_s"] > 0 and mode["peak_memory_bytes"] > 0 and mode["flops"] > 0
        assert set(mode["step_s"]) == {"rau", "plain"}
    modes = result["modes"]
    assert modes["baseline"]["speedup"] == 1.0 and modes["baseline"]["rau_steps"] == 0
    # sd-1024 at 5 steps: the strided conv acts in steps 0 and 1
    assert modes["hidiff"]["rau_steps"] == 2 and modes["raunet"]["rau_steps"] == 2 and modes["msw"]["rau_steps"] == 0
    assert modes["hidiff"]["flops"] < modes["msw"]["flops"] < modes["baseline"]["flops"]
    assert modes["raunet"]["flops"] < modes["baseline"]["flops"]


def test_bench_rejects_bad_input(capsys):
    assert main(["bench", "--tiny", "--width", "641", "--height", "640"]) == 2
    assert "multiples of 8" in capsys.readouterr().err
    assert main(["bench", "--tiny", "--modes", "hidiff,fast"]) == 2
    assert "unknown mode" in capsys.readouterr().err
