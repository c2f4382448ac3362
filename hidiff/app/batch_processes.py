"""The processes of ``hidiff batch``: accelerate's state under ``accelerate launch`` (index, count,
device), and each process's progress lines."""

from __future__ import annotations

import datetime
import os
import sys
import time
from typing import Any

from .args import AUTO
from .request import Request


def process_state() -> tuple[Any, int, int]:
    """(accelerate's state, process index, process count): 0 of 1 without ``accelerate launch``."""
    import torch
    from accelerate import PartialState

    # PartialState makes CPU processes a process group only when told they are CPU processes:
    # `accelerate launch --cpu` says so, a machine without CUDA too
    cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes") or (
        "LOCAL_RANK" in os.environ and not torch.cuda.is_available()
    )
    state = PartialState(cpu=cpu, timeout=datetime.timedelta(hours=24))  # the last barrier waits for the slowest
    return state, state.process_index, state.num_processes


def run_device(request: Request, state: Any) -> str:
    """The device string of this process: --device as given, or (auto) accelerate's device for it."""
    if request.device != AUTO:
        return request.device
    device = state.device
    # accelerate's CPU processes are on "cpu:0", which some kernels treat unlike "cpu" (last-bit differences)
    return "cpu" if device.type == "cpu" else str(device)


class Progress:
    """Images done, images per minute and ETA of one process, as lines on stderr."""

    def __init__(self, rank: int, count: int, total: int, quiet: bool) -> None:
        self.who, self.total, self.quiet = f"[process {rank + 1}/{count}]", total, quiet
        self.start, self.made, self.failed = time.perf_counter(), 0, 0

    def rate(self) -> float:
        elapsed = time.perf_counter() - self.start
        return 60 * (self.made + self.failed) / elapsed if elapsed > 0 else 0.0

    def step(self, failed: bool) -> None:
        self.made += not failed
        self.failed += failed
        if self.quiet:
            return
        done, rate = self.made + self.failed, self.rate()
        eta = (self.total - done) / rate * 60 if rate else 0.0
        print(
            f"{self.who} {done}/{self.total} images ({self.failed} failed), {rate:.1f} images/min, "
            f"ETA {_duration(eta)}",
            file=sys.stderr,
            flush=True,
        )


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"
