"""Count and name the objects in a toy picture: the metric behind ``hidiff eval``.

Rules (checked on rendered ground truth in tests/app/test_toy.py):

* background: the per-channel median of the picture's border pixels;
* object pixel: a pixel whose largest channel difference from the background exceeds
  ``threshold`` (default 0.3 of the full [0, 1] range);
* object: a 4-connected group of object pixels with at least ``min_area`` pixels
  (default 8; smaller groups are speckle: the smallest trained object covers ~20);
* colour: the palette colour nearest to the mean of the object's solid pixels (those
  more than twice the threshold from the background, or all of them if none are);
* shape: pixels count by their coverage (distance from the background / the object's
  solid contrast, over the object and its 4-neighbours, so anti-aliased edges count
  partly). A triangle (apex up) is the one whose row-mass profile is skewed: skewness
  below -0.3 (a triangle's is -0.57, a circle's and a square's 0). Otherwise the fill of
  the extent (sums of the row and column maxima of coverage) tells a circle (pi/4) from
  a square (1): above 0.89 a square.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from .shapes import BACKGROUNDS, PALETTE, parse_prompt

THRESHOLD = 0.3
MIN_AREA = 8
TRIANGLE_SKEW_BELOW, SQUARE_FILL_ABOVE = -0.3, 0.89


@dataclass(frozen=True)
class Blob:
    """One counted object."""

    area: int
    bbox: tuple[int, int, int, int]  # top, left, bottom, right (exclusive)
    fill: float  # of its extent: circle pi/4, square 1
    skew: float  # of its row-mass profile: triangle (apex up) -0.57, circle and square 0
    shape: str
    colour: str


@dataclass(frozen=True)
class Count:
    background: str
    objects: tuple[Blob, ...]

    @property
    def n(self) -> int:
        return len(self.objects)

    def matches(self, prompt: str) -> bool:
        """Exactly one object, of the prompt's shape and colour."""
        colour, shape, _ = parse_prompt(prompt)
        return self.n == 1 and self.objects[0].shape == shape and self.objects[0].colour == colour


def as_hwc(image: Any) -> np.ndarray:
    """H x W x 3 float array in [0, 1] from a 3 x H x W tensor, an H x W x 3 array or a PIL image."""
    if hasattr(image, "convert"):  # PIL
        return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    array = image.detach().cpu().float().numpy() if hasattr(image, "detach") else np.asarray(image, dtype=np.float32)
    if array.ndim != 3:
        raise ValueError(f"expected one RGB image (3 x H x W or H x W x 3), got shape {array.shape}")
    if array.shape[0] == 3 and array.shape[-1] != 3:
        array = array.transpose(1, 2, 0)
    return array


def _nearest(colour: np.ndarray, names: Any) -> str:
    return min(names, key=lambda name: float(np.sum((np.asarray(PALETTE[name]) - colour) ** 2)))


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean mask, as arrays of flat pixel indices (flood fill)."""
    h, w = mask.shape
    flat = mask.reshape(-1)
    seen = np.zeros(h * w, dtype=bool)
    groups = []
    for start in np.flatnonzero(flat):
        if seen[start]:
            continue
        seen[start] = True
        stack, members = [int(start)], []
        while stack:
            p = stack.pop()
            members.append(p)
            y, x = divmod(p, w)
            for q, ok in ((p - w, y > 0), (p + w, y < h - 1), (p - 1, x > 0), (p + 1, x < w - 1)):
                if ok and flat[q] and not seen[q]:
                    seen[q] = True
                    stack.append(q)
        groups.append(np.asarray(members))
    return groups


def _coverage(distance: np.ndarray, members: np.ndarray, solid: np.ndarray) -> np.ndarray:
    """Per-pixel share of the object (see the module docstring), zero away from it."""
    h, w = distance.shape
    own = np.zeros(h * w, dtype=bool)
    own[members] = True
    own = own.reshape(h, w)
    ring = own.copy()  # the object and its 4-neighbours: where its anti-aliased edge lies
    ring[1:] |= own[:-1]
    ring[:-1] |= own[1:]
    ring[:, 1:] |= own[:, :-1]
    ring[:, :-1] |= own[:, 1:]
    flat = distance.reshape(-1)
    contrast = float(np.median(flat[solid])) if len(solid) else float(flat[members].max())
    return np.where(ring, np.clip(distance / max(contrast, 1e-6), 0.0, 1.0), 0.0)


def classify_shape(coverage: np.ndarray) -> tuple[str, float, float]:
    """(shape name, fill of the extent, skewness of the row-mass profile) of one object's coverage."""
    rows = coverage.sum(axis=1)
    y = np.arange(len(rows), dtype=np.float64)
    mass = max(float(rows.sum()), 1e-6)
    mean = float((y * rows).sum() / mass)
    var = float(((y - mean) ** 2 * rows).sum() / mass)
    skew = float(((y - mean) ** 3 * rows).sum() / mass / max(var, 1e-6) ** 1.5)
    extent = coverage.max(axis=0).sum() * coverage.max(axis=1).sum()
    fill = float(coverage.sum() / max(extent, 1e-6))
    if skew < TRIANGLE_SKEW_BELOW:
        return "triangle", fill, skew
    return ("square" if fill > SQUARE_FILL_ABOVE else "circle"), fill, skew


def count_objects(image: Any, threshold: float = THRESHOLD, min_area: int = MIN_AREA) -> Count:
    """The background and the objects of one picture (see the module docstring for the rules)."""
    rgb = as_hwc(image)
    h, w, _ = rgb.shape
    border = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]])
    background = np.median(border, axis=0)
    distance = np.abs(rgb - background).max(axis=2)
    pixels = rgb.reshape(-1, 3)
    objects = []
    for members in _components(distance > threshold):
        if len(members) < min_area:
            continue
        ys, xs = np.divmod(members, w)
        top, left, bottom, right = int(ys.min()), int(xs.min()), int(ys.max()) + 1, int(xs.max()) + 1
        solid = members[distance.reshape(-1)[members] > 2 * threshold]
        shape, fill, skew = classify_shape(_coverage(distance, members, solid))
        mean = pixels[solid if len(solid) else members].mean(axis=0)
        objects.append(Blob(len(members), (top, left, bottom, right), fill, skew, shape, _nearest(mean, PALETTE)))
    objects.sort(key=lambda b: -b.area)
    return Count(_nearest(background, BACKGROUNDS), tuple(objects))


def summarize(counts: list[Count], prompts: list[str]) -> dict[str, Optional[float]]:
    """Shares over a set of pictures: more than one object, none, and exactly the prompt's object."""
    n = len(counts)
    if n == 0:
        return {"duplicated": None, "empty": None, "right": None, "mean_objects": None}
    return {
        "duplicated": sum(c.n > 1 for c in counts) / n,
        "empty": sum(c.n == 0 for c in counts) / n,
        "right": sum(c.matches(p) for c, p in zip(counts, prompts)) / n,
        "mean_objects": sum(c.n for c in counts) / n,
    }
