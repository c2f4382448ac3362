"""The published ``hidiffusion`` package, run in another Python (``--reference-python``):
the environment it runs in and the check that it is there, shared by ``hidiff bench``
(``reference_bench.py``) and ``hidiff eval`` (``reference_eval.py``)."""

from __future__ import annotations

import os
import subprocess
from typing import Optional


def reference_env() -> dict:
    """The environment for the reference Python: this one without PYTHONPATH, so it sees its own packages only."""
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def check_reference_python(reference_python: Optional[str], what: str) -> None:
    """ValueError unless ``reference_python`` runs and has the published package (checked before long work)."""
    if not reference_python:
        raise ValueError(f"{what} needs --reference-python PATH, a Python with hidiffusion installed")
    if not (os.path.isfile(reference_python) and os.access(reference_python, os.X_OK)):
        raise ValueError(f"--reference-python {reference_python!r} is not an executable file")
    probe = "import importlib.util, sys; sys.exit(importlib.util.find_spec('hidiffusion') is None)"
    if subprocess.run([reference_python, "-c", probe], env=reference_env()).returncode != 0:
        raise ValueError(
            f"--reference-python {reference_python} has no hidiffusion package: give a Python with "
            "hidiffusion==0.1.10 and diffusers 0.27.x (bash tools/setup.sh builds .venv-ref)"
        )
