"""Where a call stands in its run, from the noise levels the host actually samples.

Steps are read from the schedule, never from call counts: a call's noise level (a
timestep or a sigma) is found in the run's schedule, so interrupted runs, img2img
strength, samplers with several calls per step and few-step models all land on the
right step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

from .planner import Progress


def position(value: float, schedule: Sequence[float], after: int = -1) -> Optional[int]:
    """Index of ``value`` in ``schedule`` (relative tolerance 1e-6): the first match at or
    after ``after`` where there is one (repeated entries), else the first; None if absent."""
    hits = [i for i, v in enumerate(schedule) if close(float(v), value)]
    if not hits:
        return None
    later = [i for i in hits if i >= after]
    return later[0] if later else hits[0]


def close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-6 * max(1.0, abs(a), abs(b))


def progress_from_sigmas(sigma: float, sample_sigmas: Sequence[float], after: int = -1) -> Optional[Progress]:
    """The step of a call at noise level ``sigma`` in a run over ``sample_sigmas`` (the
    sigmas being sampled: steps + 1 values, the last the final level), or None when the
    sigma is not in the schedule (a call from outside the sampling loop).

    Calls between two listed sigmas (the second evaluation of a Heun-type step) belong to
    the step they started from.
    """
    steps = len(sample_sigmas) - 1
    if steps < 1:
        return None
    found = position(sigma, sample_sigmas[:-1], after)
    if found is None:
        levels = [float(v) for v in sample_sigmas]
        inside = [i for i in range(steps) if min(levels[i], levels[i + 1]) <= sigma <= max(levels[i], levels[i + 1])]
        if not inside:
            return None
        found = inside[0]
    return Progress(found, steps)
