"""When HiDiffusion acts: the preset table, the preset choice, and the step of each U-Net call.

The expected values are written out from REFERENCE.md ("When it acts") and from how the
diffusers schedulers and pipelines work, independently of hidiff.core.presets's own code.
The step tracker is driven the way StableDiffusionPipeline drives a scheduler:
``set_timesteps(N)``, then for every ``t`` in ``timesteps``: ``scale_model_input``, one
U-Net call (here: ``locate``), ``scheduler.step``.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EDMEulerScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2DiscreteScheduler,
    LCMScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)
from helpers import latents_of

import hidiff
from hidiff.core.presets import PRESETS, choose_preset, in_range
from hidiff.diffusers.steps import StepTracker

AGGRESSIVE = 8 / 50  # the published aggressive SDXL switch step, as a share of N

# --------------------------------------------------------------------------- presets
# name: (T1 ratio, T2 ratio), from REFERENCE.md's table
TABLE_RATIOS = {
    "sd-1024": (0.4, 0.0),
    "sd-2048": (0.7, 0.3),
    "sdxl-2048": (0.4, 0.0),
    "sdxl-2048-gentle": (0.4, 0.0),
    "sdxl-2048-controlnet": (0.5, 0.0),
    "sdxl-4096": (0.7, 0.3),
    "sdxl-turbo": (0.5, 0.0),
}


def table_active(name: str, i: int, n: int) -> tuple[bool, bool]:
    """(conv active, avg-pool active) at step i of n, from the rules of REFERENCE.md's table."""
    t1_ratio, t2_ratio = TABLE_RATIOS[name]
    t1, t2 = int(n * t1_ratio), int(n * t2_ratio)
    a = int(8 / 50 * n)
    if name in ("sd-1024", "sd-2048"):
        return i < t1, i < t2
    if name in ("sdxl-2048", "sdxl-2048-controlnet"):
        return i < a, a <= i < t1
    if name in ("sdxl-2048-gentle", "sdxl-4096"):
        return i < t2, i < t1
    if name == "sdxl-turbo":
        return False, i < t1
    raise AssertionError(name)


def test_preset_names_and_ratios_match_table():
    assert set(PRESETS) == set(TABLE_RATIOS)
    for name, (t1, t2) in TABLE_RATIOS.items():
        preset = PRESETS[name]
        assert preset.name == name
        assert (preset.t1_ratio, preset.t2_ratio) == (t1, t2), name


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6, 7, 10, 13, 20, 25, 50])
@pytest.mark.parametrize("name", sorted(TABLE_RATIOS))
def test_preset_active_steps_match_table(name, n):
    preset = PRESETS[name]
    for i in range(n):
        conv = in_range(preset.conv, i, n, preset.t1_ratio, preset.t2_ratio, AGGRESSIVE)
        pool = in_range(preset.pool, i, n, preset.t1_ratio, preset.t2_ratio, AGGRESSIVE)
        assert (conv, pool) == table_active(name, i, n), (name, n, i)


def active_steps(name: str, n: int) -> tuple[list[int], list[int]]:
    preset = PRESETS[name]
    conv = [i for i in range(n) if in_range(preset.conv, i, n, preset.t1_ratio, preset.t2_ratio, AGGRESSIVE)]
    pool = [i for i in range(n) if in_range(preset.pool, i, n, preset.t1_ratio, preset.t2_ratio, AGGRESSIVE)]
    return conv, pool


def test_preset_spot_values_from_published_numbers():
    # 50 steps: T1 = 20 / 35, T2 = 15, aggressive switch at 8; 25 for the ControlNet T1 (0.5).
    r = lambda a, b: list(range(a, b))  # noqa: E731
    assert active_steps("sd-1024", 50) == (r(0, 20), [])
    assert active_steps("sd-2048", 50) == (r(0, 35), r(0, 15))
    assert active_steps("sdxl-2048", 50) == (r(0, 8), r(8, 20))
    assert active_steps("sdxl-2048-controlnet", 50) == (r(0, 8), r(8, 25))
    assert active_steps("sdxl-2048-gentle", 50) == ([], r(0, 20))
    assert active_steps("sdxl-4096", 50) == (r(0, 15), r(0, 35))
    assert active_steps("sdxl-turbo", 50) == ([], r(0, 25))
    # 10 and 20 steps
    assert active_steps("sd-1024", 10) == (r(0, 4), [])
    assert active_steps("sd-2048", 20) == (r(0, 14), r(0, 6))
    assert active_steps("sdxl-2048", 20) == (r(0, 3), r(3, 8))
    assert active_steps("sdxl-2048", 10) == (r(0, 1), r(1, 4))
    # few steps: thresholds round down, so the SDXL conv phase needs 7 or more steps
    for n in range(1, 7):
        assert active_steps("sdxl-2048", n)[0] == []
    assert active_steps("sdxl-2048", 7)[0] == [0]
    assert active_steps("sd-1024", 2) == ([], [])
    assert active_steps("sd-1024", 3) == ([0], [])
    assert active_steps("sdxl-turbo", 1) == ([], [])
    assert active_steps("sdxl-turbo", 2) == ([], [0])
    assert active_steps("sdxl-turbo", 4) == ([], [0, 1])


# --------------------------------------------------------------------------- preset choice
SD_NATIVE = (64, 64)
SDXL_NATIVE = (128, 128)


@pytest.mark.parametrize(
    "latent,expected",
    [
        ((64, 64), "sd-1024"),
        ((128, 128), "sd-1024"),
        ((255, 256), "sd-1024"),
        ((256, 255), "sd-1024"),
        ((100, 400), "sd-1024"),
        ((256, 256), "sd-2048"),
        ((256, 384), "sd-2048"),
        ((300, 300), "sd-2048"),
    ],
)
def test_choose_preset_sd(latent, expected):
    for steps in (1, 4, 20, 50):
        assert choose_preset("sd", latent, SD_NATIVE, steps).name == expected
        # inpainting / edm / controlnet flags do not change SD presets
        assert choose_preset("sd", latent, SD_NATIVE, steps, inpainting=True).name == expected
        assert choose_preset("sd", latent, SD_NATIVE, steps, text2img_controlnet=True).name == expected


def test_choose_preset_sd_relative_to_native():
    # SD 2.1 at 768: native latent 96, so 4x is 384
    assert choose_preset("sd", (383, 384), (96, 96), 20).name == "sd-1024"
    assert choose_preset("sd", (384, 384), (96, 96), 20).name == "sd-2048"
    assert choose_preset("sd", (300, 300), (96, 96), 20).name == "sd-1024"


def test_choose_preset_sdxl():
    c = choose_preset
    # few steps: Turbo at any size and task
    for steps in (1, 2, 3, 4):
        for latent in ((128, 128), (256, 256), (512, 512)):
            assert c("sdxl", latent, SDXL_NATIVE, steps).name == "sdxl-turbo"
        assert c("sdxl", (256, 256), SDXL_NATIVE, steps, inpainting=True).name == "sdxl-turbo"
    # below 4x native on either side: aggressive 2048
    for latent in ((128, 128), (256, 256), (511, 512), (512, 511), (200, 700)):
        assert c("sdxl", latent, SDXL_NATIVE, 5).name == "sdxl-2048"
        assert c("sdxl", latent, SDXL_NATIVE, 30).name == "sdxl-2048"
    # both sides at 4x native or more: 4096
    for latent in ((512, 512), (512, 768), (600, 512)):
        assert c("sdxl", latent, SDXL_NATIVE, 30).name == "sdxl-4096"
        assert c("sdxl", latent, SDXL_NATIVE, 30, inpainting=True).name == "sdxl-4096"
    # inpainting or EDM (Playground): gentle
    assert c("sdxl", (256, 256), SDXL_NATIVE, 30, inpainting=True).name == "sdxl-2048-gentle"
    assert c("sdxl", (256, 256), SDXL_NATIVE, 30, edm=True).name == "sdxl-2048-gentle"
    # text-to-image ControlNet
    assert c("sdxl", (256, 256), SDXL_NATIVE, 30, text2img_controlnet=True).name == "sdxl-2048-controlnet"
    # aggressive override, both ways
    assert c("sdxl", (256, 256), SDXL_NATIVE, 30, inpainting=True, aggressive=True).name == "sdxl-2048"
    assert c("sdxl", (256, 256), SDXL_NATIVE, 30, edm=True, aggressive=True).name == "sdxl-2048"
    assert c("sdxl", (256, 256), SDXL_NATIVE, 30, aggressive=False).name == "sdxl-2048-gentle"
    assert (
        c("sdxl", (256, 256), SDXL_NATIVE, 30, text2img_controlnet=True, aggressive=True).name == "sdxl-2048-controlnet"
    )


# --------------------------------------------------------------------------- scheduler driving
SD_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)

SCHEDULERS = {
    "ddim": lambda: DDIMScheduler(**SD_BETAS, clip_sample=False, set_alpha_to_one=False, steps_offset=1),
    "euler": lambda: EulerDiscreteScheduler(**SD_BETAS),
    "euler-a": lambda: EulerAncestralDiscreteScheduler(**SD_BETAS),
    "dpm++": lambda: DPMSolverMultistepScheduler(**SD_BETAS),
    "dpm++-karras": lambda: DPMSolverMultistepScheduler(**SD_BETAS, use_karras_sigmas=True),
    "unipc": lambda: UniPCMultistepScheduler(**SD_BETAS),
    "heun": lambda: HeunDiscreteScheduler(**SD_BETAS),
    "kdpm2": lambda: KDPM2DiscreteScheduler(**SD_BETAS),
    "pndm": lambda: PNDMScheduler(**SD_BETAS, skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1),
    "lcm": lambda: LCMScheduler(**SD_BETAS),
    # Playground v2.5 style: EDM sigmas, timesteps are 0.25 * ln(sigma)
    "edm-euler": lambda: EDMEulerScheduler(sigma_min=0.002, sigma_max=80.0, sigma_data=0.5, prediction_type="epsilon"),
}

STEPS = {name: (1, 2, 3, 4, 6, 10, 25) for name in SCHEDULERS}
STEPS["lcm"] = (1, 2, 3, 4)

LOCATE_CASES = [(name, n) for name in SCHEDULERS for n in STEPS[name]]


def starts_new_step(s) -> bool:
    """Whether the next U-Net call begins a new denoising step, read off the scheduler's own state.

    Heun and KDPM2 make two model calls per step (first-order, then correction);
    PNDM with skip_prk_steps makes two for its first step (counter 0 and 1: the second
    re-evaluates at the duplicated timestep and averages); every other scheduler here
    makes one call per step.
    """
    if isinstance(s, (HeunDiscreteScheduler, KDPM2DiscreteScheduler)):
        return bool(s.state_in_first_order)
    if isinstance(s, PNDMScheduler):
        return s.counter != 1
    return True


@dataclass
class Call:
    index: int
    total: int
    new_run: bool
    truth: int  # the real step of this call, from the scheduler's state
    t: float


class Driver:
    """Drives one scheduler like a diffusers pipeline and records what the tracker says."""

    def __init__(self, scheduler, tracker=None, seed=0):
        self.s = scheduler
        self.tracker = tracker or StepTracker()
        self.gen = torch.Generator().manual_seed(seed)
        params = inspect.signature(scheduler.step).parameters
        self.step_kwargs = {"generator": self.gen} if "generator" in params else {}

    def randn(self):
        return torch.randn(1, 4, 8, 8, generator=self.gen)

    def run(self, n, strength=None, stop_after_calls=None):
        """One pipeline call: returns (calls, number of steps the pipeline runs)."""
        s = self.s
        s.set_timesteps(n)
        if strength is None:
            timesteps = s.timesteps
            steps = n
            sample = self.randn() * s.init_noise_sigma
        else:
            # StableDiffusionImg2ImgPipeline.get_timesteps / prepare_latents
            init_timestep = min(int(n * strength), n)
            t_start = max(n - init_timestep, 0)
            timesteps = s.timesteps[t_start * s.order :]
            if hasattr(s, "set_begin_index"):
                s.set_begin_index(t_start * s.order)
            steps = n - t_start
            sample = s.add_noise(self.randn(), self.randn(), timesteps[:1].repeat(1))
        calls: list[Call] = []
        truth = -1
        for t in timesteps:
            if stop_after_calls is not None and len(calls) >= stop_after_calls:
                break
            if starts_new_step(s):
                truth += 1
            model_input = s.scale_model_input(sample, t)
            p = self.tracker.locate(t, s)  # the U-Net call
            calls.append(Call(p.index, p.total, p.new_run, truth, float(t)))
            model_output = torch.randn(model_input.shape, generator=self.gen)
            sample = s.step(model_output, t, sample, **self.step_kwargs).prev_sample
        return calls, steps


def assert_complete_run(calls: list[Call], steps: int):
    truth = [c.truth for c in calls]
    # the driver's ground truth itself: every step 0..steps-1, in order
    assert sorted(set(truth)) == list(range(steps)) and truth == sorted(truth)
    assert [c.index for c in calls] == truth, [(c.t, c.index, c.truth) for c in calls]
    assert [c.total for c in calls] == [steps] * len(calls)
    assert [c.new_run for c in calls] == [True] + [False] * (len(calls) - 1)


@pytest.mark.parametrize("name,n", LOCATE_CASES, ids=[f"{a}-{b}" for a, b in LOCATE_CASES])
def test_locate_with_real_scheduler(name, n):
    driver = Driver(SCHEDULERS[name]())
    calls, steps = driver.run(n)
    assert_complete_run(calls, steps)
    if name in ("heun", "kdpm2"):
        assert len(calls) == 2 * n - 1  # two U-Net calls per step, one for the last
    if name == "edm-euler" and n > 1:
        assert min(c.t for c in calls) < 0  # not in 0..1000 units


@pytest.mark.parametrize("n", [2, 3, 6, 10])
def test_locate_pndm_duplicate_timestep(n):
    """PNDM (skip_prk_steps, as SD uses it) has N+1 timesteps with one adjacent duplicate:
    the pipeline makes N+1 U-Net calls for N steps. The steps must still be 0..N-1."""
    s = SCHEDULERS["pndm"]()
    s.set_timesteps(n)
    ts = s.timesteps.tolist()
    assert len(ts) == n + 1
    dups = [k for k in range(len(ts) - 1) if ts[k] == ts[k + 1]]
    assert dups == [1]
    calls, _ = Driver(s).run(n)
    assert len(calls) == n + 1
    index = [c.index for c in calls]
    assert index[0] == 0 and calls[0].new_run
    assert all(a <= b for a, b in zip(index, index[1:])), index
    assert index[-1] == n - 1, index
    assert all(c.total == n for c in calls), [c.total for c in calls]


RESTART_SCHEDULERS = ["ddim", "euler", "euler-a", "dpm++-karras", "unipc", "heun", "kdpm2", "lcm", "edm-euler"]


@pytest.mark.parametrize("name", RESTART_SCHEDULERS)
def test_second_set_timesteps_starts_new_run_same_n(name):
    driver = Driver(SCHEDULERS[name]())
    n = 4
    for _ in range(3):
        calls, steps = driver.run(n)
        assert_complete_run(calls, steps)


@pytest.mark.parametrize("name", RESTART_SCHEDULERS)
def test_interrupted_run_then_fresh_run_starts_at_zero(name):
    driver = Driver(SCHEDULERS[name]())
    n = 6 if name != "lcm" else 4
    order = driver.s.order
    # stop after 3 steps, after the first call only, and in the middle of a two-call step
    for stop in (3 * order, 1, 3 * order + 1):
        partial, _ = driver.run(n, stop_after_calls=stop)
        assert partial[0].index == 0 and partial[0].new_run
        assert [c.index for c in partial] == [c.truth for c in partial]
        calls, steps = driver.run(n)
        assert_complete_run(calls, steps)


IMG2IMG_SCHEDULERS = [
    "ddim",
    "euler",
    "euler-a",
    "dpm++",
    "dpm++-karras",
    "unipc",
    "heun",
    "kdpm2",
    "pndm",
    "edm-euler",
]


@pytest.mark.parametrize("name", IMG2IMG_SCHEDULERS)
def test_img2img_strength_run_starts_at_step_zero(name):
    driver = Driver(SCHEDULERS[name]())
    n = 10
    for strength in (0.3, 0.5, 0.75, 1.0, 0.5):
        calls, steps = driver.run(n, strength=strength)
        assert steps == min(int(n * strength), n)
        assert calls[0].index == 0 and calls[0].new_run
        assert_complete_run(calls, steps)


@pytest.mark.parametrize("name", ["ddim", "euler", "heun", "dpm++"])
def test_interrupted_text2img_then_img2img(name):
    """An interrupted run leaves nothing behind for an img2img run whose first timestep
    lies later in the schedule than the last one seen."""
    driver = Driver(SCHEDULERS[name]())
    partial, _ = driver.run(10, stop_after_calls=1)
    assert partial[0].new_run
    calls, steps = driver.run(10, strength=0.5)
    assert steps == 5
    assert_complete_run(calls, steps)
    calls, steps = driver.run(10)
    assert_complete_run(calls, steps)


def test_swapped_scheduler_starts_new_run():
    tracker = StepTracker()
    calls, steps = Driver(SCHEDULERS["euler"](), tracker).run(6, stop_after_calls=4)
    assert [c.index for c in calls] == [0, 1, 2, 3]
    calls, steps = Driver(SCHEDULERS["heun"](), tracker).run(6)
    assert_complete_run(calls, steps)
    calls, steps = Driver(SCHEDULERS["ddim"](), tracker).run(3)
    assert_complete_run(calls, steps)


# --------------------------------------------------------------------------- pipeline integration
def true_step(scheduler, i: int) -> int:
    """The denoising step of the pipeline's i-th U-Net call (i-th entry of timesteps)."""
    if isinstance(scheduler, (HeunDiscreteScheduler, KDPM2DiscreteScheduler)):
        return i // 2  # (first-order, correction) pairs; the last step has one call
    if isinstance(scheduler, PNDMScheduler):
        return max(0, i - 1)  # calls 0 and 1 are the first step
    return i


def windowed_blocks(unet) -> int:
    """Self-attentions MSW-MSA acts on for an SD layout: down_blocks.0 and up_blocks.3."""
    count = 0
    for block in (unet.down_blocks[0], unet.up_blocks[3]):
        for transformer in block.attentions:
            count += len(transformer.transformer_blocks)
    return count


def make_scheduler(kind, config):
    if kind == "heun":
        return HeunDiscreteScheduler.from_config(config)
    if kind == "pndm":
        return PNDMScheduler.from_config(config, skip_prk_steps=True)
    return DDIMScheduler.from_config(config)


class Recorder:
    def __init__(self, raise_at=None):
        self.rows = []
        self.raise_at = raise_at

    def __call__(self, pipe, i, t, callback_kwargs):
        rec = hidiff.last_call(pipe)
        assert rec is not None
        self.rows.append((i, rec.step, rec.total, rec.conv, rec.pool, rec.preset, rec.windows, rec.window_calls))
        if self.raise_at is not None and i == self.raise_at:
            raise RuntimeError("stop here")
        return {}


def check_rows(pipe, rows, n, n_calls):
    assert [r[0] for r in rows] == list(range(n_calls))
    t1 = int(n * 0.4)  # sd-1024
    blocks = windowed_blocks(pipe.unet)
    for i, step, total, conv, pool, preset, windows, window_calls in rows:
        expected = true_step(pipe.scheduler, i)
        assert (step, total) == (expected, n), (type(pipe.scheduler).__name__, i, step, total)
        assert preset == "sd-1024"
        assert conv == (expected < t1), (i, expected, conv)
        assert pool is False
        assert windows and window_calls == blocks


@pytest.fixture
def patched_sd(sd_pipe):
    # One thread for these runs only (restored after): nothing here compares numerics
    # across thread counts, and two spinning OpenMP threads on a busy 2-core machine
    # make these U-Net calls many times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    hidiff.apply_hidiffusion(sd_pipe)
    try:
        yield sd_pipe
    finally:
        hidiff.remove_hidiffusion(sd_pipe)
        torch.set_num_threads(threads)


# DDIM's full run is checked in the exception test below (the run after the failed one).
@pytest.mark.slow
@pytest.mark.parametrize("kind", ["heun", "pndm"])
def test_pipeline_steps_follow_sd1024_preset(patched_sd, kind):
    pipe = patched_sd
    pipe.scheduler = make_scheduler(kind, pipe.scheduler.config)
    n = 6
    rec = Recorder()
    latents = latents_of(pipe, 640, 640, steps=n, guidance_scale=1.0, callback_on_step_end=rec)
    assert latents.shape == (1, 4, 80, 80)
    assert torch.isfinite(latents).all()
    n_calls = len(pipe.scheduler.timesteps)
    assert n_calls == {"ddim": n, "heun": 2 * n - 1, "pndm": n + 1}[kind]
    check_rows(pipe, rec.rows, n, n_calls)


@pytest.mark.slow
def test_pipeline_exception_in_callback_leaves_next_run_clean(patched_sd):
    pipe = patched_sd
    assert isinstance(pipe.scheduler, DDIMScheduler)
    n = 6
    failing = Recorder(raise_at=2)
    with pytest.raises(RuntimeError, match="stop here"):
        latents_of(pipe, 640, 640, steps=n, guidance_scale=1.0, callback_on_step_end=failing)
    assert [r[1] for r in failing.rows] == [0, 1, 2]
    assert [r[3] for r in failing.rows] == [True, True, False]
    rec = Recorder()
    latents_of(pipe, 640, 640, steps=n, guidance_scale=1.0, callback_on_step_end=rec)
    check_rows(pipe, rec.rows, n, n)
