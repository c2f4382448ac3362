"""hidiff: HiDiffusion (RAU-Net + MSW-MSA) for diffusers Stable Diffusion pipelines.

    import hidiff
    hidiff.apply_hidiffusion(pipe)          # one line; pipe(...) now works at 2x-4x native
    hidiff.remove_hidiffusion(pipe)         # exact undo
    with hidiff.hidiffusion(pipe): ...      # scoped
"""

from .adapter import (
    CallRecord,
    apply_hidiffusion,
    get_patch,
    hidiffusion,
    is_patched,
    last_call,
    remove_hidiffusion,
)
from .config import HiDiffusionConfig
from .families import Layout, UnsupportedModelError, detect_layout
from .schedule import PRESETS, Preset

__version__ = "0.1.0"

__all__ = [
    "apply_hidiffusion",
    "remove_hidiffusion",
    "hidiffusion",
    "HiDiffusionConfig",
    "PRESETS",
    "Preset",
    "Layout",
    "detect_layout",
    "UnsupportedModelError",
    "last_call",
    "is_patched",
    "get_patch",
    "CallRecord",
]
