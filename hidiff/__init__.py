"""hidiff: HiDiffusion (RAU-Net + MSW-MSA) for diffusers Stable Diffusion pipelines.

import hidiff
hidiff.apply_hidiffusion(pipe)          # one line; pipe(...) now works at 2x-4x native
hidiff.remove_hidiffusion(pipe)         # exact undo
with hidiff.hidiffusion(pipe): ...      # scoped
hidiff.enable_cfgpp(pipe, "ddim", 0.6)  # CFG++ sampling (hidiff.invert: DDIM inversion with it)
hidiff.edit(pipe, image, "a cat", "a dog")  # edit by CFG++ inversion
hidiff.progressive(pipe, prompt, 4096, 4096)  # small first, then enlarged and refined
"""

from .core.architecture import Architecture, UnsupportedModelError
from .core.config import HiDiffusionConfig
from .core.presets import PRESETS, Preset
from .diffusers.cfgpp import disable_cfgpp, enable_cfgpp
from .diffusers.edit import edit
from .diffusers.inversion import invert
from .diffusers.model import detect_architecture, detect_layout
from .diffusers.patch import (
    CallRecord,
    apply_hidiffusion,
    get_patch,
    hidiffusion,
    is_patched,
    last_call,
    remove_hidiffusion,
)
from .diffusers.progressive import progressive

#: The name ``detect_layout``'s result had before the core/host split.
Layout = Architecture

__version__ = "0.1.0"

__all__ = [
    "apply_hidiffusion",
    "remove_hidiffusion",
    "hidiffusion",
    "enable_cfgpp",
    "disable_cfgpp",
    "invert",
    "edit",
    "progressive",
    "HiDiffusionConfig",
    "PRESETS",
    "Preset",
    "Layout",
    "Architecture",
    "detect_architecture",
    "detect_layout",
    "UnsupportedModelError",
    "last_call",
    "is_patched",
    "get_patch",
    "CallRecord",
]
