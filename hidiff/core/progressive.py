"""Progressive generation: structure from a smaller image first, then detail at the target size.

The image is made at an intermediate size (with HiDiffusion), enlarged bicubically and
refined by image-to-image at the target size (with HiDiffusion), possibly over several
sizes. The schedule (where it starts, how strongly each enlargement is re-noised) was
chosen by measurement on the shipped toy model (docs/progressive.md: the sweep and the
table it was chosen from), not guessed.

:func:`schedule` plans the passes (sizes and strengths); :func:`run_progressive` runs them through a
``first(size)`` callable that makes the first picture and a ``refine(size, picture,
strength)`` callable that enlarges and refines it, so any host can drive it: the diffusers
host's :func:`hidiff.progressive` (hidiff/diffusers/progressive.py, also behind ``hidiff
generate --progressive``) and ``hidiff eval``'s method ``progressive`` on the toy model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

#: The measured default: the first picture at twice the native side (where direct HiDiffusion keeps
#: shapes), at most half the target's; one refinement at strength 0.5.
DEFAULT_START_SCALE = 2.0
MAX_START = 0.5
DEFAULT_STRENGTH = 0.5


def default_start(target: Size, native: Size) -> float:
    """The first picture's side over the target's: 2x native, at most half the target (docs/progressive.md)."""
    share = min(DEFAULT_START_SCALE * native[0] / target[0], DEFAULT_START_SCALE * native[1] / target[1])
    return min(MAX_START, share)


Size = tuple[int, int]  # (height, width)


def check_start(value: float) -> float:
    """A first-picture share: in (0, 1)."""
    if not 0.0 < value < 1.0:
        raise ValueError(f"must lie in (0, 1) (the first picture's side over the target's), got {value}")
    return value


@dataclass(frozen=True)
class Schedule:
    """The sizes of a progressive run, first to last (the last is the target), and the
    img2img strength of each refinement (one per size after the first)."""

    sizes: tuple[Size, ...]
    strengths: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.sizes) < 2:
            raise ValueError("a progressive schedule needs a first size and at least one larger size")
        if len(self.strengths) != len(self.sizes) - 1:
            raise ValueError(f"{len(self.sizes) - 1} refinements need as many strengths, got {len(self.strengths)}")
        for a, b in zip(self.sizes, self.sizes[1:]):
            if b[0] < a[0] or b[1] < a[1]:
                raise ValueError(f"progressive sizes must grow: {a[1]}x{a[0]} before {b[1]}x{b[0]}")
        for s in self.strengths:
            if not 0.0 < s <= 1.0:
                raise ValueError(f"a refinement strength must lie in (0, 1], got {s}")

    def to_dict(self) -> dict[str, Any]:
        return {"sizes": [list(s) for s in self.sizes], "strengths": list(self.strengths)}


def schedule(
    target: Size,
    multiple: int,
    start: float = MAX_START,
    strength: float = DEFAULT_STRENGTH,
    levels: int = 1,
) -> Schedule:
    """The schedule for ``target`` (height, width): the first picture at ``start`` times the
    target's side (rounded down to ``multiple``, at least one ``multiple``), then ``levels``
    refinements at sizes growing geometrically to the target, each at ``strength``."""
    check_start(start)
    if not isinstance(levels, int) or isinstance(levels, bool) or levels < 1:
        raise ValueError(f"levels (refinements) must be a whole number >= 1, got {levels!r}")
    sizes = []
    for k in range(levels + 1):
        share = start ** (1 - k / levels)  # start, ..., 1
        sizes.append(tuple(max(multiple, int(side * share) // multiple * multiple) for side in target))
    sizes[-1] = tuple(target)
    return Schedule(tuple(sizes), (strength,) * levels)  # type: ignore[arg-type]


def run_progressive(
    passes: Schedule,
    first: Callable[[Size], Any],
    refine: Callable[[Size, Any, float], Any],
    log: Optional[Callable[[str], None]] = None,
) -> Any:
    """The picture(s) of a progressive run: ``first(sizes[0])``, then ``refine(size, previous, strength)``
    for each later size."""
    picture = first(passes.sizes[0])
    for size, strength in zip(passes.sizes[1:], passes.strengths):
        if log is not None:
            log(f"progressive: refining to {size[1]}x{size[0]} at strength {strength}")
        picture = refine(size, picture, strength)
    return picture
