"""The ``published`` mode of ``hidiff bench``: the published ``hidiffusion`` package run in another
Python (``--reference-python``, with diffusers 0.27.x) on the same saved weights and inputs, timed
by the same loop code (``timing.py``) in ``reference_bench.py``, in a subprocess that stays alive and
runs one repetition whenever its turn in the interleaving comes."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

from .reference import reference_env
from .timing import REPLY_PREFIX

#: The hub name the published package is shown for each family: it picks its preset from it.
PUBLISHED_NAMES = {
    "sd15": "runwayml/stable-diffusion-v1-5",
    "sd21": "stabilityai/stable-diffusion-2-1-base",
    "sd21-768": "stabilityai/stable-diffusion-2-1-base",
    "sdxl": "stabilityai/stable-diffusion-xl-base-1.0",
}

_RUNNER = Path(__file__).with_name("reference_bench.py")


class PublishedRunner:
    """The published package in another Python, alive across repetitions.

    The U-Net is saved once with ``save_pretrained`` and loaded there with
    ``from_pretrained``; the inputs travel as a saved tensor file.
    """

    def __init__(self, python: str, family: str, unet: Any, inputs: dict, steps: int, device: str, dtype: str) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="hidiff-bench-")
        self._proc: Optional[subprocess.Popen] = None
        self._python = python
        self._info: Optional[dict] = None
        try:
            self._start(python, family, unet, inputs, steps, device, dtype, Path(self._tmp.name))
        except BaseException:
            self.close()
            raise

    def _start(
        self, python: str, family: str, unet: Any, inputs: dict, steps: int, device: str, dtype: str, tmp: Path
    ) -> None:
        unet.save_pretrained(tmp / "unet")
        torch.save(inputs, tmp / "inputs.pt")
        spec = {
            "model_dir": str(tmp / "unet"),
            "inputs": str(tmp / "inputs.pt"),
            "name_or_path": PUBLISHED_NAMES[family],
            "steps": steps,
            "device": device,
            "dtype": dtype,
            "threads": torch.get_num_threads(),
        }
        (tmp / "spec.json").write_text(json.dumps(spec))
        self._log = open(tmp / "stderr.txt", "w+")
        self._proc = subprocess.Popen(
            [python, str(_RUNNER), str(tmp / "spec.json")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            env=reference_env(),
        )

    @property
    def info(self) -> dict:
        """What the runner reported once ready (versions, replaced modules, FLOPs per step);
        waits for it: the runner loads in the background while hidiff counts its own FLOPs."""
        if self._info is None:
            self._info = {**self._read(), "python": self._python}
            self._info.pop("ready")
        return self._info

    def _read(self) -> dict:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            if line.startswith(REPLY_PREFIX):
                return json.loads(line[len(REPLY_PREFIX) :])
        self._proc.wait()
        self._log.seek(0)
        tail = self._log.read()[-3000:]
        raise RuntimeError(
            f"the published hidiffusion run in {self._proc.args[0]} stopped (exit code {self._proc.returncode}); "
            f"--reference-python needs a Python with hidiffusion==0.1.10 and diffusers 0.27.x "
            f"(bash tools/setup.sh builds .venv-ref). Its output:\n{tail}"
        )

    def run(self, steps: int, per_phase: bool = False) -> dict:
        assert self._proc is not None and self._proc.stdin is not None
        self.info  # noqa: B018  (ready before the first request)
        self._proc.stdin.write(json.dumps({"steps": steps, "per_phase": per_phase}) + "\n")
        self._proc.stdin.flush()
        return self._read()

    def close(self, kill: bool = False) -> None:
        """End the runner (at once with ``kill``, as when the bench fails or is stopped)
        and remove the saved U-Net."""
        if self._proc is not None:
            if kill:
                self._proc.kill()
            if self._proc.stdin is not None:
                self._proc.stdin.close()  # end of input: the runner exits
            try:
                self._proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._log.close()
        self._tmp.cleanup()


@contextlib.contextmanager
def sigterm_as_exit() -> Iterator[None]:
    """SIGTERM raises SystemExit while the bench runs, so that a stopped bench still ends
    its runner and removes the saved U-Net (gigabytes in the temporary folder)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
