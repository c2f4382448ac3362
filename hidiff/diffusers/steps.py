"""The step of each U-Net call, read from a diffusers scheduler's timesteps."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Optional

import torch

from ..core import rules
from ..core.planner import Progress
from ..core.progress import close, position

#: Steps assumed for a U-Net driven without a scheduler to place its calls in.
FALLBACK_STEPS = 1000


class StepTracker:
    """Finds the denoising step of each U-Net call from the scheduler, not from call counts.

    The position of the call's timestep in ``scheduler.timesteps`` (or the scheduler's
    own ``step_index`` where it keeps one, which disambiguates the repeated timesteps
    of Heun-type schedulers) gives the step. A new ``timesteps`` tensor, which
    ``set_timesteps`` makes at the start of every pipeline call, starts a new run, so
    an interrupted or failed run leaves nothing behind; a new tensor with the same
    values, met at the step after the one the run had reached (another thread re-set a
    shared scheduler), continues the run. The first position seen in a run is its step 0
    (img2img strength); second-order schedulers (Heun, KDPM2) make ``order`` entries per step.

    Schedules that do not fall (the core's rules, :mod:`hidiff.core.rules`):

    * timesteps that ascend (``DDIMInverseScheduler``, followed or one of ``others``, such
      as DiffEdit's and pix2pix-zero's ``inverse_scheduler``): mirrored, a call at the
      timestep of sampling step i is planned as step i (as :func:`hidiff.invert` does);
    * calls that walk a falling schedule upwards (an inversion loop whose own scheduler
      hidiff cannot see): mirrored from the second call on, and ``walking_back`` is set so
      the host warns with the fix;
    * a timestep in none of the schedules: the core's off-schedule rule
      (:func:`hidiff.core.rules.off_schedule_progress`), and ``off_schedule`` is set.

    One tracker follows one run at a time: hosts keep one per thread (see
    :mod:`hidiff.diffusers.patch`).
    """

    def __init__(self) -> None:
        self._run: Any = None  # the timesteps tensor of the current run (held, so its id cannot be reused)
        self._start = 0
        self._last = -1
        self._seen: dict[int, Any] = {}  # id(scheduler) -> the timesteps tensor it had at the last call
        self._backwards = False  # this run walks its schedule upwards
        self.off_schedule = False  # the latest call had a schedule to follow but was not in it
        self.walking_back = False  # the latest call walked a falling schedule upwards

    def locate(
        self, timestep: Any, scheduler: Any, fallback_total: int = FALLBACK_STEPS, others: Sequence[Any] = ()
    ) -> Progress:
        t = as_float(timestep)
        self.off_schedule = self.walking_back = False
        candidates = [s for s in (scheduler, *others) if _timesteps(s) is not None]
        for candidate in self._in_order(candidates, t):
            progress = self._locate_in(t, candidate)
            if progress is not None:
                return progress
        timesteps = _timesteps(scheduler)
        if timesteps is not None:
            # A schedule to follow, but the call is not in it: the one rule for every host.
            self.off_schedule = True
            values = timesteps.detach().to("cpu", torch.float64).tolist()
            order = max(1, int(getattr(scheduler, "order", 1) or 1))
            total = max(1, math.ceil(len(values) / order))
            place = rules.off_schedule_progress(t, values, len(values))
            index = min(total - 1, place.index * total // len(values))
            new_run = self._run is not timesteps or index < self._last
            self._run, self._last, self._start, self._backwards = timesteps, index, 0, False
            return Progress(index, total, new_run)
        # No schedule at all (a bare U-Net without a scheduler): read progress off the
        # timestep value on the training range.
        train = float(getattr(getattr(scheduler, "config", None), "num_train_timesteps", 1000) or 1000)
        frac = min(max(1.0 - t / train, 0.0), 1.0)
        index = min(fallback_total - 1, int(frac * fallback_total))
        new_run = not isinstance(self._run, str) or index < self._last
        self._run, self._last = "value", index
        return Progress(index, fallback_total, new_run)

    def _in_order(self, candidates: list, t: float) -> list:
        """Schedules set since the last call first (a new ``timesteps`` tensor: the run about
        to start, such as an inversion right after sampling; among them those that start at this
        call's timestep), then the current run's, then the rest."""
        current = [s for s in candidates if s.timesteps is self._run]
        fresh = [s for s in candidates if s.timesteps is not self._run and self._seen.get(id(s)) is not s.timesteps]
        fresh.sort(key=lambda s: not close(float(s.timesteps[0]), t))
        chosen = {id(s) for s in current + fresh}
        self._seen = {id(s): s.timesteps for s in candidates}
        return fresh + current + [s for s in candidates if id(s) not in chosen]

    def _locate_in(self, t: float, scheduler: Any) -> Optional[Progress]:
        timesteps = scheduler.timesteps
        values = timesteps.detach().to("cpu", torch.float64).tolist()
        if rules.ascending(values):
            # An inversion's schedule: planned as the sampling it mirrors.
            progress = rules.schedule_progress(t, values)
            if progress is None:
                return None
            new_run = timesteps is not self._run or progress.index >= self._last
            self._run, self._last, self._start, self._backwards = timesteps, progress.index, 0, False
            return Progress(progress.index, progress.total, new_run)
        same_run = timesteps is self._run
        last = self._last if same_run else -1
        pos = _position(t, timesteps, scheduler, last)
        if pos is None:
            return None
        if not same_run and self._same_values(timesteps) and pos == self._last + 1:
            same_run = True  # another thread re-set a shared scheduler mid-run: this run goes on
            last = self._last
        order = max(1, int(getattr(scheduler, "order", 1) or 1))
        backwards = same_run and 0 < pos < last and (self._backwards or pos != self._start)
        if backwards:
            # Calls walking this falling schedule upwards: an inversion loop with its own
            # scheduler. Planned as the sampling steps at these timesteps, and reported.
            self._backwards, self.walking_back, self._last = True, True, pos
            total = max(1, math.ceil(len(timesteps) / order))
            return Progress(min(total - 1, pos * total // len(timesteps)), total, False)
        new_run = not same_run or pos < last
        if new_run:
            self._start, self._backwards = pos, False
        self._run = timesteps
        self._last = pos
        # PNDM's PLMS mode spends two calls on its first step (its timesteps
        # repeat one entry to make room for the second).
        extra = 1 if _plms_warmup(scheduler) else 0
        span = max(1, len(timesteps) - self._start - extra)
        total = max(1, math.ceil(span / order))
        index = min(total - 1, max(0, pos - self._start - extra) * total // span)
        return Progress(index, total, new_run)

    def _same_values(self, timesteps: torch.Tensor) -> bool:
        run = self._run
        return (
            isinstance(run, torch.Tensor)
            and run.shape == timesteps.shape
            and bool(torch.equal(run.detach().cpu(), timesteps.detach().cpu()))
        )


def _timesteps(scheduler: Any) -> Optional[torch.Tensor]:
    timesteps = getattr(scheduler, "timesteps", None) if scheduler is not None else None
    scheduled = isinstance(timesteps, torch.Tensor) and timesteps.ndim == 1 and len(timesteps) > 0
    return timesteps if scheduled else None


def _position(t: float, timesteps: torch.Tensor, scheduler: Any, last: int) -> Optional[int]:
    """Index of timestep ``t`` in ``timesteps``: the scheduler's own step index where it
    agrees, else the first match at or after the last position of this run."""
    step_index = getattr(scheduler, "_step_index", None)
    if step_index is None and _plms_warmup(scheduler):
        step_index = scheduler.counter  # PNDM counts its calls; it tells the repeated entries apart
    if isinstance(step_index, int) and 0 <= step_index < len(timesteps):
        if close(float(timesteps[step_index]), t):
            return step_index
    return position(t, timesteps.detach().to("cpu", torch.float64).tolist(), last)


def _plms_warmup(scheduler: Any) -> bool:
    return isinstance(getattr(scheduler, "counter", None), int) and bool(
        getattr(getattr(scheduler, "config", None), "skip_prk_steps", False)
    )


def as_float(timestep: Any) -> float:
    if isinstance(timestep, torch.Tensor):
        return float(timestep.detach().reshape(-1)[0])
    return float(timestep)
