"""The HiDiffusion node for ComfyUI: MODEL in, MODEL out (a patched clone).

Importing this module needs torch (which ComfyUI has) but not ComfyUI itself; ComfyUI's
modules are imported when the node runs.
"""

from __future__ import annotations

from typing import Any

from ..core.config import HiDiffusionConfig
from ..core.presets import PRESETS

_DEFAULTS = HiDiffusionConfig()
#: Widget value meaning "None" (the library's default) for the optional numbers.
UNSET = -1


def _float_default(value: Any) -> float:
    return float(UNSET) if value is None else float(value)


def _choice_default(value: Any) -> str:
    return {None: "auto", True: "on", False: "off"}[value]


class HiDiffusion:
    """Higher-resolution images from SD 1.x / 2.x / SDXL without duplicated objects (RAU-Net + MSW-MSA)."""

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        d = _DEFAULTS
        return {
            "required": {
                "model": (
                    "MODEL",
                    {"tooltip": "An SD 1.x, SD 2.x or SDXL model (fine-tunes, LoRAs and few-step models included)."},
                ),
                "raunet": (
                    "BOOLEAN",
                    {
                        "default": d.raunet,
                        "tooltip": "RAU-Net: in the early steps, shrink one U-Net stage's features (strided conv, then "
                        "avg-pooling) so the layout forms at the model's native scale. Prevents duplicated objects.",
                    },
                ),
                "window_attn": (
                    "BOOLEAN",
                    {
                        "default": d.window_attn,
                        "tooltip": "MSW-MSA: run the top-resolution self-attention in shifted 2x2 windows. Faster at "
                        "high resolution, same look.",
                    },
                ),
                "preset": (
                    ["auto", *PRESETS],
                    {
                        "default": "auto" if d.preset is None else d.preset,
                        "tooltip": "Schedule of RAU-Net over the steps. auto: chosen per run from the model family, the "
                        "size relative to native, the step count (few-step models) and ControlNet use. "
                        + "; ".join(f"{p.name}: {p.note}" for p in PRESETS.values()),
                    },
                ),
                "t1_ratio": (
                    "FLOAT",
                    {
                        "default": _float_default(d.t1_ratio),
                        "min": -1.0,
                        "max": 1.0,
                        "step": 0.01,
                        "tooltip": "Override the preset's T1 ratio (share of the steps until which RAU-Net acts; "
                        "T1 = int(steps x ratio)). -1: the preset's own value.",
                    },
                ),
                "t2_ratio": (
                    "FLOAT",
                    {
                        "default": _float_default(d.t2_ratio),
                        "min": -1.0,
                        "max": 1.0,
                        "step": 0.01,
                        "tooltip": "Override the preset's T2 ratio (the earlier switch point, T2 <= T1). -1: the preset's "
                        "own value.",
                    },
                ),
                "aggressive": (
                    ["auto", "on", "off"],
                    {
                        "default": _choice_default(d.aggressive),
                        "tooltip": "SDXL below 4x native: on runs the strided conv first and then pools (published "
                        "text-to-image schedule); off pools from the first step (published for inpainting). auto: "
                        "off for inpainting models, else on.",
                    },
                ),
                "aggressive_step_ratio": (
                    "FLOAT",
                    {
                        "default": float(d.aggressive_step_ratio),
                        "min": 0.0,
                        "max": 1.0,
                        "step": 0.01,
                        "tooltip": "Where the aggressive SDXL schedule switches from strided conv to pooling, as a share "
                        "of the steps (8/50 = 0.16, as published).",
                    },
                ),
                "window_shift": (
                    ["seeded", "reference", "none"],
                    {
                        "default": d.window_shift,
                        "tooltip": "How the windows shift each step. seeded: a fixed function of each image's seed, the "
                        "step and the layer (reproducible, same as the hidiff library); reference: drawn from torch's "
                        "global RNG as the published code does; none: never shift.",
                    },
                ),
                "window_seed": (
                    "INT",
                    {
                        "default": UNSET if d.window_seed is None else int(d.window_seed),
                        "min": -1,
                        "max": 2**53,
                        "tooltip": "With window_shift=seeded: -1 seeds each image's window shifts from its own initial "
                        "noise (so the sampler seed decides them); any other value fixes them. The same value gives "
                        "the same shifts as the hidiff library's window_seed.",
                    },
                ),
                "kv_downsample": (
                    ["1", "2", "4"],
                    {
                        "default": str(getattr(d, "kv_downsample", 1)),
                        "tooltip": "ToDo-style key/value downsampling of the top-resolution self-attention (inside "
                        "the windows when window_attn is on): 1 off; 2 or 4 shrink keys and values that much per "
                        "side while queries keep full resolution. Faster, slightly softer. Acts where HiDiffusion "
                        "acts.",
                    },
                ),
                "kv_levels": (
                    ["1", "2"],
                    {
                        "default": str(getattr(d, "kv_levels", 1)),
                        "tooltip": "Where kv_downsample acts: 1 the top-resolution transformer stage only; 2 also "
                        "the next-lower-resolution one (unwindowed; faster still, softer). Needs kv_downsample 2 or 4.",
                    },
                ),
                "at_native": (
                    ["skip", "apply"],
                    {
                        "default": d.at_native,
                        "tooltip": "skip: do nothing at or below the model's native size (512 px SD 1.x, 768 px SD 2.x-v, "
                        "1024 px SDXL); apply: act at every size, as the published code does.",
                    },
                ),
            }
        }

    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The model with HiDiffusion (a patched copy; the input model is unchanged).",)
    FUNCTION = "apply"
    CATEGORY = "model_patches"
    DESCRIPTION = (
        "HiDiffusion (RAU-Net + MSW-MSA): generate above the model's native resolution without duplicated "
        "objects, and faster. Put it between the model loader (and LoRAs) and the sampler."
    )

    def apply(self, model: Any, **widgets: Any) -> tuple:
        from .patch import apply_hidiffusion

        try:
            return (apply_hidiffusion(model, config=config_from_widgets(**widgets)),)
        except (TypeError, ValueError, RuntimeError) as e:
            # ComfyUI shows the exception text as the node's error: say who is talking.
            text = str(e)
            if text.startswith("HiDiffusion"):
                raise
            try:
                error = type(e)(f"HiDiffusion: {text}")
            except Exception:  # an exception type that takes other arguments
                raise e from None
            raise error from e


def config_from_widgets(
    raunet: bool = _DEFAULTS.raunet,
    window_attn: bool = _DEFAULTS.window_attn,
    preset: str = "auto",
    t1_ratio: float = UNSET,
    t2_ratio: float = UNSET,
    aggressive: str = "auto",
    aggressive_step_ratio: float = _DEFAULTS.aggressive_step_ratio,
    window_shift: str = _DEFAULTS.window_shift,
    window_seed: int = UNSET,
    kv_downsample: Any = None,
    kv_levels: Any = None,
    at_native: str = _DEFAULTS.at_native,
) -> HiDiffusionConfig:
    """The library's config from the node's widget values (-1 / "auto" mean the library default None)."""
    if aggressive not in ("auto", "on", "off"):
        raise ValueError(f"aggressive must be auto, on or off, got {aggressive!r}")
    extra = {}
    if kv_downsample is not None:
        extra["kv_downsample"] = int(kv_downsample)
    if kv_levels is not None:
        extra["kv_levels"] = int(kv_levels)
    return HiDiffusionConfig.from_options(
        **extra,
        raunet=bool(raunet),
        window_attn=bool(window_attn),
        preset=None if preset == "auto" else preset,
        t1_ratio=None if t1_ratio is None or float(t1_ratio) < 0 else float(t1_ratio),
        t2_ratio=None if t2_ratio is None or float(t2_ratio) < 0 else float(t2_ratio),
        aggressive={"auto": None, "on": True, "off": False}[aggressive],
        aggressive_step_ratio=float(aggressive_step_ratio),
        window_shift=window_shift,
        window_seed=None if window_seed is None or int(window_seed) < 0 else int(window_seed),
        at_native=at_native,
    )


from .samplers import SamplerDDIMCFGpp  # noqa: E402

NODE_CLASS_MAPPINGS = {"HiDiffusion": HiDiffusion, "HiDiffSamplerDDIMCFGpp": SamplerDDIMCFGpp}
NODE_DISPLAY_NAME_MAPPINGS = {
    "HiDiffusion": "HiDiffusion (RAU-Net + MSW-MSA)",
    "HiDiffSamplerDDIMCFGpp": "SamplerDDIM CFG++ (hidiff)",
}
