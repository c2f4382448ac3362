import os
import sys

import pytest
import torch

# Deterministic CPU maths for bitwise comparisons; two threads match the CI machine.
torch.set_num_threads(min(2, os.cpu_count() or 1))

from hidiff.testing import tiny_pipeline  # noqa: E402


@pytest.fixture
def sd_pipe():
    pipe = tiny_pipeline("sd15")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def sdxl_pipe():
    pipe = tiny_pipeline("sdxl")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def latents_of(pipe, height, width, seed=0, steps=2, **kwargs):
    """Run ``pipe`` to the final latents with a seeded generator."""
    out = pipe(
        "one red circle",
        height=height,
        width=width,
        num_inference_steps=steps,
        generator=torch.Generator().manual_seed(seed),
        output_type="latent",
        **kwargs,
    )
    return out.images
