"""One InvokeAI denoise with HiDiffusion, through the diffusers host (InvokeAI is not imported here).

InvokeAI's denoise sets its scheduler's whole schedule and then runs a slice of it
(``denoising_start`` / ``denoising_end``: image-to-image, the SDXL refiner's split). The
diffusers host places each U-Net call in ``scheduler.timesteps``; here it is shown the slice
that runs (:class:`RunSchedule`), so RAU-Net's step ranges cover the steps that really run.
The task (text-to-image, image-to-image, inpainting) and the ControlNets of the denoise reach
the host as a diffusers pipeline would give them (:class:`InvokeAIRun` and its subclasses).
The patch is applied on entry and removed on exit, also when the denoise raises or is
cancelled: the U-Net in InvokeAI's model cache is handed back exactly as it was.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Sequence

import torch

from ..core.config import HiDiffusionConfig
from ..diffusers.model import detect_layout
from ..diffusers.patch import CallRecord, hidiffusion, last_call

TASKS = ("text2img", "img2img", "inpaint")


class RunSchedule:
    """A scheduler as the diffusers host's step tracker reads it, cut to the steps one denoise runs.

    ``timesteps`` is the slice InvokeAI iterates over; the scheduler's own step index (which
    tells the repeated timesteps of Heun-type schedulers apart) is shifted to that slice.
    Everything else (``order``, ``config``, ...) is the scheduler's.
    """

    def __init__(self, scheduler: Any, timesteps: torch.Tensor):
        self._scheduler = scheduler
        self.timesteps = timesteps
        self._offset = slice_offset(getattr(scheduler, "timesteps", None), timesteps)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._scheduler, name)

    @property
    def _step_index(self) -> Optional[int]:
        index = getattr(self._scheduler, "_step_index", None)
        if isinstance(index, int) and self._offset is not None:
            return index - self._offset
        return None


def slice_offset(full: Any, part: torch.Tensor) -> Optional[int]:
    """Where ``part`` starts in ``full`` (None if it is not a contiguous slice of it)."""
    if not isinstance(full, torch.Tensor) or full.ndim != 1 or part.ndim != 1 or len(part) > len(full):
        return None
    full, part = full.detach().cpu(), part.detach().cpu()
    for start in range(len(full) - len(part) + 1):
        if torch.equal(full[start : start + len(part)], part):
            return start
    return None


class InvokeAIRun:
    """What the diffusers host reads from a pipeline, for one InvokeAI text-to-image denoise:
    the U-Net, the schedule that runs and the ControlNets. The host reads the task from the
    pipeline's class name as diffusers names its pipelines; the subclasses below say it."""

    def __init__(self, unet: torch.nn.Module, schedule: RunSchedule, controlnets: Sequence[torch.nn.Module] = ()):
        self.unet = unet
        self.scheduler = schedule
        # A ModuleList only lists the ControlNets (the host hooks each, and unhooks it on exit).
        self.controlnet = torch.nn.ModuleList(controlnets) if controlnets else None


class InvokeAIImg2ImgRun(InvokeAIRun):
    """An image-to-image denoise (latents given)."""


class InvokeAIInpaintRun(InvokeAIRun):
    """An inpainting denoise (a denoise mask given)."""


RUNS = {"text2img": InvokeAIRun, "img2img": InvokeAIImg2ImgRun, "inpaint": InvokeAIInpaintRun}


@dataclass
class RunReport:
    """What HiDiffusion did in one denoise: the options, the family, and each step's latest call."""

    config: HiDiffusionConfig
    family: str = ""
    task: str = "text2img"
    records: list[CallRecord] = field(default_factory=list)

    def step_done(self, unet: torch.nn.Module) -> None:
        record = last_call(unet)
        if record is not None:
            self.records.append(record)

    def summary(self) -> dict[str, Any]:
        """JSON-ready: what goes into the image's metadata."""
        last = self.records[-1] if self.records else None
        return {
            "options": self.config.to_dict(),
            "family": self.family,
            "task": self.task,
            "preset": last.preset if last is not None else None,
            "steps": len(self.records),
            "latent": list(last.latent) if last is not None else None,
            "conv_steps": [r.step for r in self.records if r.conv],
            "pool_steps": [r.step for r in self.records if r.pool],
            "window_steps": [r.step for r in self.records if r.windows],
        }


def task_of(has_latents: bool, has_mask: bool) -> str:
    """InvokeAI's task from a denoise's inputs: a mask is inpainting, given latents image-to-image."""
    return "inpaint" if has_mask else "img2img" if has_latents else "text2img"


@contextlib.contextmanager
def hidiffusion_run(
    unet: torch.nn.Module,
    scheduler: Any,
    timesteps: torch.Tensor,
    config: HiDiffusionConfig,
    task: str = "text2img",
    controlnets: Sequence[torch.nn.Module] = (),
) -> Iterator[RunReport]:
    """HiDiffusion on ``unet`` for one denoise over ``timesteps`` (a slice of ``scheduler.timesteps``).

    Refuses a U-Net HiDiffusion is not for (:class:`hidiff.UnsupportedModelError`) before
    anything changes. Yields the run's :class:`RunReport`; call its ``step_done(unet)`` after
    each step to record it.
    """
    if task not in RUNS:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    architecture = detect_layout(unet)
    run = RUNS[task](unet, RunSchedule(scheduler, timesteps), controlnets)
    report = RunReport(config=config, family=architecture.family, task=task)
    with hidiffusion(run, config=config):
        yield report
