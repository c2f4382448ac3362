"""The toy model hidiff ships: a tiny SD 1.5-layout pixel-space U-Net trained on procedural shapes.

It duplicates objects above its native size the way Stable Diffusion does, which makes
it the project's offline stand-in for measuring HiDiffusion (``hidiff eval``) and its
demo (``hidiff demo``). See :mod:`hidiff.app.toy.shapes` (pictures and prompts),
:mod:`hidiff.app.toy.count` (the object counter) and :mod:`hidiff.app.toy.pipeline` (the model).
"""

from .pipeline import NATIVE, TOY_UNET_CONFIG, WEIGHTS, ToyPipeline, ToyTextEncoder, load_toy_pipeline, toy_components
from .shapes import BACKGROUNDS, COLOURS, PROMPTS, SHAPES, Scene, Shape, parse_prompt, prompt_for, render

__all__ = [
    "NATIVE",
    "TOY_UNET_CONFIG",
    "WEIGHTS",
    "ToyPipeline",
    "ToyTextEncoder",
    "load_toy_pipeline",
    "toy_components",
    "BACKGROUNDS",
    "COLOURS",
    "PROMPTS",
    "SHAPES",
    "Scene",
    "Shape",
    "parse_prompt",
    "prompt_for",
    "render",
]
