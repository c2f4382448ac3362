"""What one ``hidiff generate`` run makes: the :class:`Request` (everything that determines its images,
stored in each PNG to re-run it), the checks and choices of its fields, and the JSON types they take.

``hidiff batch`` makes one Request per image and ``hidiff edit`` reads its own request type with
the same helpers; the flags that fill a Request are in :mod:`hidiff.app.generate_flags`.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field
from typing import Any, Optional, get_args, get_type_hints

from ..core.config import HiDiffusionConfig
from ..core.progressive import check_start
from .args import (
    AUTO,
    DTYPES,
    SCHEDULERS,
    VAE_TILING,
    UsageError,
    cfgpp_lambda,
    check_value,
    finite,
    flag,
    image_side,
    img2img_strength,
    positive,
    seed,
)
from .memory_plan import check_budget


@dataclass
class Request:
    """Everything that determines the images: what the ``hidiff`` PNG chunk stores and re-runs."""

    model: str
    prompt: str = ""
    negative_prompt: str = ""
    width: Optional[int] = None
    height: Optional[int] = None
    steps: Optional[int] = None
    guidance: Optional[float] = None
    seed: Optional[int] = None
    scheduler: Optional[str] = None  # a SCHEDULERS name; None keeps the model's own
    batch: int = 1
    image: Optional[str] = None
    mask: Optional[str] = None
    strength: Optional[float] = None
    controlnet: Optional[str] = None
    control_image: Optional[str] = None
    controlnet_scale: Optional[float] = None
    config_folder: Optional[str] = None  # component configs for single-file checkpoints
    hidiff: bool = True
    hidiff_config: dict = field(default_factory=dict)
    cfgpp: Optional[float] = None
    device: str = AUTO
    dtype: str = AUTO
    vae_tiling: str = AUTO
    memory_budget: Optional[str] = None  # e.g. "8GB"; None: $HIDIFF_MEMORY_BUDGET, else the device's free memory
    progressive: bool = False
    progressive_start: Optional[float] = None  # the first picture's side over the target's
    progressive_strength: Optional[float] = None  # img2img strength of the refinement

    @property
    def task(self) -> str:
        return "inpaint" if self.mask else "img2img" if self.image else "text2img"

    @property
    def config(self) -> HiDiffusionConfig:
        return HiDiffusionConfig.from_options(**self.hidiff_config)


#: The check of each numeric Request field: the type of its flag, and run again on values read
#: back from a PNG's metadata.
CHECKS: dict[str, Any] = {
    "width": image_side,
    "height": image_side,
    "steps": positive,
    "batch": positive,
    "guidance": finite,
    "seed": seed,
    "strength": img2img_strength,
    "controlnet_scale": finite,
    "cfgpp": cfgpp_lambda,
    "progressive_start": check_start,
    "progressive_strength": img2img_strength,
    "memory_budget": check_budget,
}
#: The choices of each Request field that has them.
CHOICES: dict[str, tuple[str, ...]] = {
    "scheduler": tuple(SCHEDULERS),
    "dtype": (AUTO, *DTYPES),
    "vae_tiling": VAE_TILING,
}


def flag_name(name: str) -> str:
    """The flag of a request field: ``--name-with-dashes``."""
    return "--" + name.replace("_", "-")


def check_fields(request: Any, checks: dict[str, Any], choices: dict[str, tuple[str, ...]]) -> None:
    """Each set field of a request dataclass through its check in ``checks`` and its ``choices``: a
    UsageError naming the field's flag otherwise."""
    for name, check in checks.items():
        if getattr(request, name) is not None:
            check_value(flag_name(name), getattr(request, name), check)
    for name, values in choices.items():
        value = getattr(request, name)
        if value is not None and value not in values:
            raise UsageError(f"{flag_name(name)} {value!r} is not one of {', '.join(values)}")


def typed_flag(kind: type, checks: dict[str, Any], name: str) -> Any:
    """The argparse type of the flag of field ``name`` of request dataclass ``kind``: its check in ``checks``."""
    return flag(checks[name], field_type(get_type_hints(kind)[name]))


def with_seed(request: Request) -> Request:
    """The request with a seed: a random one (recorded in the metadata) when none was given."""
    return (
        request
        if request.seed is not None
        else dataclasses.replace(request, seed=random.SystemRandom().randrange(2**32))
    )


def field_type(hint: Any) -> Any:
    """The type of a request field's annotation: ``X`` of ``Optional[X]`` or of ``X``."""
    return next((a for a in get_args(hint) if a is not type(None)), hint)


def of_type(value: Any, hint: Any) -> bool:
    """Whether a JSON value fits a request field's annotation (``Optional[X]``, ``X``; no bool for a number)."""
    if value is None:
        return type(None) in get_args(hint)
    kind = field_type(hint)
    if isinstance(value, bool) and kind is not bool:
        return False
    return isinstance(value, (int, float) if kind is float else kind)
