"""Samples the toy model with the published ``hidiffusion`` package, for ``hidiff eval --reference-python``.

Runs in the other Python (hidiffusion 0.1.10 needs diffusers 0.27.x), as a script:
``python reference_eval.py SPEC.json``. The spec names a folder whose only entry is
this ``hidiff`` package (so the toy pipeline class loads, and nothing else of hidiff's
environment shadows the other Python's diffusers), the toy model folder, the prompts,
sizes, steps, seed and guidance, and the file to write: for every size the pictures
(B x 3 x H x W in [0, 1]) and the seconds of the timed run, after one untimed step as
``hidiff eval`` does for its own methods.

The published code finds the U-Net by its SD 1.5 module names and reads the step
count from ``pipe._num_timesteps``, which the toy pipeline sets as diffusers' own
pipelines do. Its window shifts draw from the global torch RNG, so it is seeded with
the eval seed before each run.
"""

import json
import sys
import time
from importlib.metadata import version


def main(spec_path):
    with open(spec_path) as f:
        spec = json.load(f)
    sys.path.insert(0, spec["package_parent"])
    import torch
    from hidiffusion import apply_hidiffusion

    from hidiff.app.toy.pipeline import load_toy_pipeline

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    pipe = load_toy_pipeline(spec["model"])
    apply_hidiffusion(pipe)
    replaced = sum(type(m).__module__.startswith("hidiffusion") for m in pipe.unet.modules())

    def sample(size, steps):
        torch.manual_seed(spec["seed"])
        generator = torch.Generator().manual_seed(spec["seed"])
        return pipe(
            spec["prompts"],
            height=size,
            width=size,
            num_inference_steps=steps,
            guidance_scale=spec["guidance"],
            generator=generator,
            output_type="pt",
        ).images

    images, seconds = {}, {}
    for size in spec["sizes"]:
        sample(size, 1)  # untimed: the first call at a new shape pays one-time setup
        start = time.perf_counter()
        images[size] = sample(size, spec["steps"])
        seconds[size] = time.perf_counter() - start
    torch.save(
        {
            "images": images,
            "seconds": seconds,
            "replaced_modules": replaced,
            "versions": {name: version(name) for name in ("hidiffusion", "diffusers", "torch")},
        },
        spec["out"],
    )


if __name__ == "__main__":
    main(sys.argv[1])
