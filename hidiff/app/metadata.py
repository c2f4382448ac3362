"""What each PNG carries: the A1111-style ``parameters`` text and the ``hidiff`` JSON chunk that
holds the whole :class:`~hidiff.app.request.Request` (and what ran it), and reading a request back
from a PNG (``--from-image``)."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, get_type_hints

from .args import SCHEDULERS, UsageError
from .inputs import IMAGE_FIELDS, load_image, sha256
from .request import Request, of_type

if TYPE_CHECKING:
    from .run import Run

METADATA_KEY = "hidiff"


def a1111_parameters(request: Request, index: int, run: Run) -> str:
    """The ``parameters`` text that A1111-style tools read."""
    sampler = SCHEDULERS[request.scheduler][2] if request.scheduler else run.scheduler
    fields = [
        ("Steps", request.steps),
        ("Sampler", sampler),
        ("CFG scale", request.guidance),
        ("Seed", request.seed + index),
        ("Size", f"{request.width}x{request.height}"),
        ("Model", Path(request.model).stem if os.path.exists(request.model) else request.model),
        ("Denoising strength", request.strength),
        ("ControlNet", request.controlnet and Path(request.controlnet).name),
        ("HiDiffusion", (run.preset or "inactive at this size") if request.hidiff else "off"),
        ("CFG++", request.cfgpp),
    ]
    line = ", ".join(f"{k}: {v}" for k, v in fields if v is not None)
    negative = f"Negative prompt: {request.negative_prompt}\n" if request.negative_prompt else ""  # as A1111 writes it
    return f"{request.prompt}\n{negative}{line}"


def metadata(request: Request, index: int, run: Run, pipe: Any, device: Any) -> dict[str, Any]:
    import diffusers
    import torch

    import hidiff

    return {
        "format": 1,
        "request": dataclasses.asdict(request),
        "index": index,
        "inputs_sha256": {
            name: sha256(getattr(request, name)) for name, _, _ in IMAGE_FIELDS if getattr(request, name)
        },
        "run": {
            "pipeline": type(pipe).__name__,
            "scheduler": run.scheduler,
            "preset": run.preset,
            "seconds": round(run.seconds, 3),
            "device": str(device),
            "dtype": str(pipe.unet.dtype).replace("torch.", ""),
            "vae_tiling": bool(getattr(getattr(pipe, "vae", None), "use_tiling", False)),
            "memory": run.memory,
            "progressive": run.progressive,
            "hidiff_version": hidiff.__version__,
            "diffusers_version": diffusers.__version__,
            "torch_version": torch.__version__,
        },
    }


def save_png(image: Any, path: Path, text: dict[str, str]) -> None:
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in text.items():
        info.add_text(key, value)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, pnginfo=info)


def read_metadata(path: str) -> tuple[Request, Optional[int]]:
    """(request, index in its batch) from a PNG written by ``hidiff generate``."""
    request, meta = read_request(path, METADATA_KEY, Request, "hidiff generate")
    index = meta.get("index")
    if not (index is None or of_type(index, int)):
        raise UsageError(f"--from-image {path}: unreadable hidiff metadata (its index is of the wrong type)")
    return request, index if request.batch > 1 else None


def read_request(path: str, key: str, kind: type, command: str) -> tuple[Any, dict]:
    """(request of dataclass ``kind``, the whole metadata) from the ``key`` JSON chunk of a PNG that
    ``command`` wrote; a UsageError for a missing or malformed chunk, a warning for changed inputs."""
    text = _png_chunk(path, key, command)
    try:
        meta = json.loads(text)
        if not isinstance(meta, dict) or not isinstance(meta.get("request"), dict):
            raise ValueError("it holds no 'request' object")
        request = _request_of(meta["request"], kind)
        digests = meta.get("inputs_sha256") or {}
        if not isinstance(digests, dict):
            raise ValueError("its inputs_sha256 is of the wrong type")
    except (ValueError, KeyError, TypeError) as error:
        raise UsageError(
            f"--from-image {path}: unreadable {key} metadata ({error}); re-run from a PNG that {command} wrote"
        ) from None
    _warn_changed_inputs(request, digests, path)
    return request, meta


def _png_chunk(path: str, key: str, command: str) -> str:
    """The ``key`` text chunk of the PNG at ``path``."""
    from PIL import Image

    load_image(path, "--from-image", "RGB")  # refuses a missing or non-image file
    with Image.open(path) as image:
        text = dict(getattr(image, "text", {}) or {})
    if key not in text:
        raise UsageError(
            f"--from-image {path} has no '{key}' metadata: only PNGs written by {command} "
            "can be re-run (their text chunks may also have been stripped by an image editor)"
        )
    return text[key]


def _request_of(fields: dict, kind: type) -> Any:
    """A request of dataclass ``kind`` from its stored fields, each of its field's type (ValueError if not)."""
    hints = get_type_hints(kind)
    unknown = sorted(set(fields) - set(hints))
    if unknown:
        raise ValueError(f"unknown field(s) {', '.join(unknown)} (written by a newer hidiff?)")
    for name, value in fields.items():
        if not of_type(value, hints[name]):
            raise ValueError(f"{name} is {value!r}, of the wrong type")
    request = kind(**fields)
    if isinstance(request, Request):
        request.config  # noqa: B018 - validates the stored HiDiffusion config
    return request


def _warn_changed_inputs(request: Any, digests: dict, path: str) -> None:
    for name, digest in digests.items():
        value = getattr(request, name, None)
        if value and os.path.isfile(value) and sha256(value) != digest:
            print(f"warning: {value} changed since {path} was made; the result will differ")


def png_text(request: Request, index: int, run: Run, pipe: Any, device: Any) -> dict[str, str]:
    """The PNG text chunks of image ``index`` of a run: ``parameters`` (A1111) and ``hidiff`` (what re-runs it)."""
    return {
        "parameters": a1111_parameters(request, index, run),
        METADATA_KEY: json.dumps(metadata(request, index, run, pipe, device)),
    }
