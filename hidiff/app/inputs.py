"""The files a request reads before anything is loaded: its input images, its component-config folder,
and the digests that tell a re-run whether an input changed."""

from __future__ import annotations

import hashlib
import os
from typing import Any

from .args import UsageError
from .loading import resolve_device
from .request import Request
from .validation import check_request

#: The request fields that name input images: (field, flag, PIL mode).
IMAGE_FIELDS = (("image", "--image", "RGB"), ("mask", "--mask", "L"), ("control_image", "--control-image", "RGB"))


def checked_inputs(request: Request) -> dict[str, Any]:
    """Refuse bad input before anything is loaded (the request's rules, its folder, its device);
    returns the opened input images by field."""
    check_request(request)
    if request.config_folder and not os.path.isdir(request.config_folder):
        raise UsageError(
            f"--config {request.config_folder}: not a folder; pass a local diffusers model folder "
            "(one with model_index.json) of the checkpoint's family"
        )
    resolve_device(request.device, request.dtype)
    return {
        name: load_image(getattr(request, name), flag, mode)
        for name, flag, mode in IMAGE_FIELDS
        if getattr(request, name)
    }


def load_image(path: str, flag_name: str, mode: str) -> Any:
    """The image at ``path`` in PIL ``mode``; a UsageError naming ``flag_name`` when it cannot be read."""
    from PIL import Image, UnidentifiedImageError

    if not os.path.isfile(path):
        raise UsageError(f"{flag_name} {path}: no such file")
    try:
        with Image.open(path) as image:
            return image.convert(mode)
    except (UnidentifiedImageError, OSError) as error:
        raise UsageError(
            f"{flag_name} {path} is not an image that can be read ({error}); pass a PNG, JPEG or WebP file"
        ) from None


def sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()
