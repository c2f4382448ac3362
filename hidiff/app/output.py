"""Where ``hidiff generate`` writes: the PNG names ``--out`` gives (batch and --compare suffixes), the
check that they can be written before anything runs, and the side-by-side picture of --compare."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

from .args import UsageError, png_path
from .request import Request


def output_base(out: Optional[str], seed: int) -> Path:
    """The PNG that ``--out`` names, before the batch and --compare suffixes: ``hidiff-SEED.png`` by default
    or inside a folder (one that exists, or a name ending in /); ``.png`` added to a name without a suffix."""
    default = f"hidiff-{seed}.png"
    if not out:
        return Path(default)
    if os.path.isdir(out) or out.endswith(("/", os.sep)):
        return Path(out) / default
    try:
        return png_path(
            Path(out), "hidiff writes PNG only, as the metadata that re-runs an image needs PNG text chunks"
        )
    except ValueError as error:
        raise UsageError(f"--out {error}") from None


def output_path(out: Optional[str], request: Request, index: Optional[int], suffix: str = "") -> Path:
    base = output_base(out, request.seed)
    stem = base.stem + (f"-{index}" if request.batch > 1 else "")
    return base.with_name(f"{stem}{suffix}.png")


def check_outputs(paths: list[Path], overwrite: bool) -> None:
    """Refuse, before anything runs, outputs that exist (unless ``overwrite``) or cannot be written."""
    for path in paths:
        if path.is_dir():
            raise UsageError(f"cannot write {path}: a folder of that name exists; pass another --out")
        if path.exists() and not overwrite:
            raise UsageError(f"{path} exists; pass --overwrite to replace it, or another --out")
        folder = path.parent
        while not folder.exists():
            folder = folder.parent
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            raise UsageError(f"cannot write {path}: {folder} is not a writable folder; pass another --out")


def side_by_side(left: Any, right: Any) -> Any:
    from PIL import Image

    both = Image.new("RGB", (left.width + right.width, max(left.height, right.height)))
    both.paste(left, (0, 0))
    both.paste(right, (left.width, 0))
    return both
