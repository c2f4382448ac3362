"""Procedural pictures for the toy model: flat-colour shapes on a plain background.

Every picture is a function of a seed. The vocabulary is small and fixed: three
shapes, four object colours, two backgrounds, and one prompt form,
``"one <colour> <shape> on <background>"``. Shapes are axis-aligned and drawn
with 4x4 supersampling (anti-aliased edges), so their fill of the bounding box tells
them apart: square 1.0, circle pi/4, triangle 1/2.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import torch

SHAPES = ("circle", "square", "triangle")
#: Object colours (RGB in [0, 1]); far apart so that a mean colour names one.
COLOURS = {
    "red": (0.9, 0.1, 0.1),
    "green": (0.1, 0.8, 0.2),
    "blue": (0.15, 0.25, 0.95),
    "yellow": (0.95, 0.85, 0.1),
}
BACKGROUNDS = {"white": (1.0, 1.0, 1.0), "black": (0.0, 0.0, 0.0)}
PALETTE = {**COLOURS, **BACKGROUNDS}

#: Object size (circle diameter, square side, triangle base and height) as a share of the
#: picture's shorter side, drawn uniformly; positions keep the whole object inside.
SIZE_RANGE = (0.4, 0.65)
SUPERSAMPLE = 4


@dataclass(frozen=True)
class Shape:
    """One object: ``kind`` and ``colour`` names, centre (cx, cy) and size in pixels."""

    kind: str
    colour: str
    cx: float
    cy: float
    size: float


@dataclass(frozen=True)
class Scene:
    background: str
    shapes: tuple[Shape, ...]


def prompt_for(colour: str, shape: str, background: str) -> str:
    return f"one {colour} {shape} on {background}"


def parse_prompt(prompt: str) -> tuple[str, str, str]:
    """(colour, shape, background) of a vocabulary prompt; ValueError naming the vocabulary otherwise."""
    words = prompt.strip().lower().split()
    if (
        len(words) != 5
        or words[0] != "one"
        or words[3] != "on"
        or words[1] not in COLOURS
        or words[2] not in SHAPES
        or words[4] not in BACKGROUNDS
    ):
        raise ValueError(
            f"prompt {prompt!r} is not in the toy vocabulary: use 'one <colour> <shape> on <background>' with "
            f"colour in {sorted(COLOURS)}, shape in {list(SHAPES)}, background in {sorted(BACKGROUNDS)}"
        )
    return words[1], words[2], words[4]


#: Every prompt the toy model knows, in a fixed order.
PROMPTS = tuple(prompt_for(c, s, b) for b, c, s in itertools.product(BACKGROUNDS, COLOURS, SHAPES))
VOCABULARY = ("one", "on", *COLOURS, *SHAPES, *BACKGROUNDS)


def random_scene(rng: random.Random, size: int, prompt: Optional[str] = None) -> Scene:
    """One object of random (or the prompt's) kind, colour and background, random size and place."""
    if prompt is None:
        colour, kind, background = rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.choice(list(BACKGROUNDS))
    else:
        colour, kind, background = parse_prompt(prompt)
    side = rng.uniform(*SIZE_RANGE) * size
    half = side / 2
    cx, cy = rng.uniform(half, size - half), rng.uniform(half, size - half)
    return Scene(background, (Shape(kind, colour, cx, cy, side),))


def _coverage(shape: Shape, height: int, width: int) -> torch.Tensor:
    """Share of each pixel the shape covers, from SUPERSAMPLE^2 sample points per pixel."""
    s = SUPERSAMPLE
    ys = (torch.arange(height * s, dtype=torch.float32) + 0.5) / s
    xs = (torch.arange(width * s, dtype=torch.float32) + 0.5) / s
    y, x = ys[:, None], xs[None, :]
    half = shape.size / 2
    dx, dy = x - shape.cx, y - shape.cy
    if shape.kind == "circle":
        inside = dx * dx + dy * dy <= half * half
    elif shape.kind == "square":
        inside = (dx.abs() <= half) & (dy.abs() <= half)
    elif shape.kind == "triangle":  # apex up, base at the bottom: width grows linearly downwards
        inside = (dy >= -half) & (dy <= half) & (dx.abs() <= (dy + half) / 2)
    else:
        raise ValueError(f"unknown shape {shape.kind!r}; choose one of {SHAPES}")
    return inside.float().reshape(height, s, width, s).mean(dim=(1, 3))


def render(scene: Scene, height: int, width: Optional[int] = None) -> torch.Tensor:
    """The scene as a 3 x H x W float tensor in [0, 1]; later shapes paint over earlier ones."""
    width = height if width is None else width
    image = torch.tensor(PALETTE[scene.background]).view(3, 1, 1).expand(3, height, width).clone()
    for shape in scene.shapes:
        alpha = _coverage(shape, height, width)
        colour = torch.tensor(COLOURS[shape.colour]).view(3, 1, 1)
        image = image * (1 - alpha) + colour * alpha
    return image


def training_batch(seed: int, batch: int, size: int) -> tuple[torch.Tensor, list[str]]:
    """``batch`` pictures in [-1, 1] (B x 3 x size x size) and their prompts, a function of ``seed``."""
    rng = random.Random(seed)
    scenes = [random_scene(rng, size) for _ in range(batch)]
    images = torch.stack([render(s, size) for s in scenes]) * 2 - 1
    prompts = [prompt_for(s.shapes[0].colour, s.shapes[0].kind, s.background) for s in scenes]
    return images, prompts


def separated_scene(
    rng: random.Random,
    size: int,
    count: int,
    background: str = "white",
    kinds: Sequence[str] = SHAPES,
    colours: Iterable[str] = COLOURS,
) -> Scene:
    """``count`` objects that neither touch nor overlap (ground truth for the counter)."""
    colours = list(colours)
    for _ in range(1000):
        shapes = []
        for _ in range(count):
            side = rng.uniform(6.0, max(6.0, 0.3 * size))  # at least the smallest trained object
            half = side / 2
            shapes.append(
                Shape(
                    rng.choice(list(kinds)),
                    rng.choice(colours),
                    rng.uniform(half + 1, size - half - 1),
                    rng.uniform(half + 1, size - half - 1),
                    side,
                )
            )
        # bounding boxes at least 2 pixels apart: no shared pixel, not even anti-aliased
        if all(
            max(abs(a.cx - b.cx), abs(a.cy - b.cy)) > (a.size + b.size) / 2 + 2
            for a, b in itertools.combinations(shapes, 2)
        ):
            return Scene(background, tuple(shapes))
    raise ValueError(f"could not place {count} separate objects on a {size}px picture")
