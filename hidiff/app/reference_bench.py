"""Times the published ``hidiffusion`` package for ``hidiff bench --reference-python``.

Runs in the other Python (hidiffusion 0.1.10 needs diffusers 0.27.x), as a script:
``python reference_bench.py SPEC.json``. It never imports hidiff; the timed loop is
``timing.py`` beside it, the same code hidiff's own modes are timed with.

Protocol, one JSON object per line on stdout, each prefixed with ``REPLY_PREFIX`` (library
output on stdout is ignored): after loading the saved U-Net and applying the published
HiDiffusion it answers ``{"ready": ...}`` with its versions, how many modules the package
replaced and the FLOPs of each step; then each line ``{"steps": N}`` on stdin runs one
timed loop of N steps (with ``"per_phase": true``, one call per distinct phase of those N
steps) and answers with its times; end of input ends it. Staying alive
between repetitions lets them interleave with hidiff's modes, so machine drift cancels.
"""

import json
import os
import sys
from importlib.metadata import version

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import timing  # noqa: E402


def reply(message):
    print(timing.REPLY_PREFIX + json.dumps(message), flush=True)


def published_pipeline(diffusers, unet, name_or_path):
    """The published package only patches pipelines: a bare pipeline around the U-Net,
    named like the hub model whose preset it should pick. It reads the step count of the
    current run from ``_num_timesteps``, which the pipeline's ``__call__`` would set."""
    from hidiffusion import apply_hidiffusion

    pipe = diffusers.DiffusionPipeline()
    pipe.register_modules(unet=unet)
    pipe.register_to_config(_name_or_path=name_or_path)
    apply_hidiffusion(pipe)
    return pipe


def call_counters(unet):
    """The published package's patched blocks, each counting its own calls in ``timestep``."""
    return [m for m in unet.modules() if type(m).__module__.startswith("hidiffusion") and hasattr(m, "timestep")]


def run_steps(pipe, scheduler, inputs, steps):
    pipe._num_timesteps = steps
    result = timing.timed_loop(pipe.unet, scheduler, inputs, steps)
    # The published code counts U-Net calls and wraps at _num_timesteps: a loop with
    # any other number of calls would leave its schedule off for the next repetition.
    if result["unet_calls"] != steps:
        raise RuntimeError(f"{result['unet_calls']} U-Net calls in a {steps}-step loop")
    return result


def run_phases(pipe, scheduler, inputs, steps, flops):
    """``hidiff bench --per-phase``: one timed call per distinct phase of the published schedule.
    The package counts its own calls in each patched block's ``timestep`` (wrapping at
    ``_num_timesteps``), so every counter is set to the step before that step's call, and back
    to 0 after. Phases are told apart by their FLOPs, which differ wherever the geometry does."""
    if len(flops) != steps:
        raise RuntimeError(f"FLOPs counted for {len(flops)} steps, asked for {steps}")
    pipe._num_timesteps = steps
    counters = call_counters(pipe.unet)

    def at_step(i):
        for module in counters:
            module.timestep = i

    try:
        return timing.timed_phases(pipe.unet, scheduler, inputs, steps, list(flops), at_step)
    finally:
        at_step(0)


def count_flops(diffusers, spec, inputs):
    """FLOPs of each step of the published schedule, on a weightless (meta) copy."""
    config = diffusers.UNet2DConditionModel.load_config(spec["model_dir"])
    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel.from_config(config)
    pipe = published_pipeline(diffusers, unet, spec["name_or_path"])
    pipe._num_timesteps = spec["steps"]
    per_step = timing.loop_flops(unet, diffusers.DDIMScheduler(), timing.move(inputs, "meta"), spec["steps"])
    return [step[""] for step in per_step]


def main(spec_path):
    with open(spec_path) as f:
        spec = json.load(f)
    torch.set_num_threads(spec["threads"])
    import diffusers

    dtype = getattr(torch, spec["dtype"])
    inputs = torch.load(spec["inputs"])
    flops = count_flops(diffusers, spec, inputs)
    unet = (
        diffusers.UNet2DConditionModel.from_pretrained(spec["model_dir"], torch_dtype=dtype).to(spec["device"]).eval()
    )
    pipe = published_pipeline(diffusers, unet, spec["name_or_path"])
    replaced = sorted(name for name, m in unet.named_modules() if type(m).__module__.startswith("hidiffusion"))
    inputs = timing.move(inputs, spec["device"], dtype)
    scheduler = diffusers.DDIMScheduler()
    reply(
        {
            "ready": True,
            "hidiffusion": version("hidiffusion"),
            "diffusers": diffusers.__version__,
            "torch": torch.__version__,
            "replaced_modules": replaced,
            "flops_per_step": flops,
        }
    )
    for line in sys.stdin:
        request = json.loads(line)
        if request.get("per_phase"):
            reply(run_phases(pipe, scheduler, inputs, request["steps"], flops))
        else:
            reply(run_steps(pipe, scheduler, inputs, request["steps"]))


if __name__ == "__main__":
    main(sys.argv[1])
