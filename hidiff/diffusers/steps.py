"""The step of each U-Net call, read from a diffusers scheduler's timesteps."""

from __future__ import annotations

import math
from typing import Any, Optional

import torch

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

    One tracker follows one run at a time: hosts keep one per thread (see
    :mod:`hidiff.diffusers.patch`).
    """

    def __init__(self) -> None:
        self._run: Any = None  # the timesteps tensor of the current run (held, so its id cannot be reused)
        self._start = 0
        self._last = -1
        self.off_schedule = False  # the latest call had a schedule to follow but was not in it

    def locate(self, timestep: Any, scheduler: Any, fallback_total: int = FALLBACK_STEPS) -> Progress:
        timesteps = getattr(scheduler, "timesteps", None) if scheduler is not None else None
        t = as_float(timestep)
        scheduled = isinstance(timesteps, torch.Tensor) and timesteps.ndim == 1 and len(timesteps) > 0
        self.off_schedule = False
        if scheduled:
            same_run = timesteps is self._run
            last = self._last if same_run else -1
            pos = _position(t, timesteps, scheduler, last)
            if pos is not None and not same_run and self._same_values(timesteps) and pos == self._last + 1:
                same_run = True  # another thread re-set a shared scheduler mid-run: this run goes on
                last = self._last
            if pos is not None:
                new_run = not same_run or pos < last
                if new_run:
                    self._start = pos
                self._run = timesteps
                self._last = pos
                # PNDM's PLMS mode spends two calls on its first step (its timesteps
                # repeat one entry to make room for the second).
                extra = 1 if _plms_warmup(scheduler) else 0
                span = max(1, len(timesteps) - self._start - extra)
                order = max(1, int(getattr(scheduler, "order", 1) or 1))
                total = max(1, math.ceil(span / order))
                index = min(total - 1, max(0, pos - self._start - extra) * total // span)
                return Progress(index, total, new_run)
        # No schedule to place the call in (a bare U-Net, or a timestep from elsewhere):
        # read progress off the timestep value on the training range.
        self.off_schedule = scheduled
        train = float(getattr(getattr(scheduler, "config", None), "num_train_timesteps", 1000) or 1000)
        frac = min(max(1.0 - t / train, 0.0), 1.0)
        index = min(fallback_total - 1, int(frac * fallback_total))
        new_run = not isinstance(self._run, str) or index < self._last
        self._run, self._last = "value", index
        return Progress(index, fallback_total, new_run)

    def _same_values(self, timesteps: torch.Tensor) -> bool:
        run = self._run
        return (
            isinstance(run, torch.Tensor)
            and run.shape == timesteps.shape
            and bool(torch.equal(run.detach().cpu(), timesteps.detach().cpu()))
        )


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
