"""Tiny random-weight ComfyUI models and runs for the node tests (imported after conftest set ComfyUI up)."""

from __future__ import annotations

import os
import sys
from typing import Any, Optional

import torch

from hidiff.comfy.testing import TINY, build_patcher, unet_config
from hidiff.comfy.testing import seed_weights as seed_weights  # re-exported: tests reseed other modules with it

#: The ComfyUI root these tests run against: $HIDIFF_COMFY_ROOT (or its older name $HIDIFF_COMFYUI), else
#: <venv>/ComfyUI (install_comfy.sh's layout). tools/test_comfy.sh runs them with that ComfyUI's Python.
COMFY_ROOT = os.path.abspath(
    os.environ.get("HIDIFF_COMFY_ROOT") or os.environ.get("HIDIFF_COMFYUI") or os.path.join(sys.prefix, "ComfyUI")
)
HAVE_COMFY = os.path.isfile(os.path.join(COMFY_ROOT, "comfy", "model_patcher.py"))


def start_comfy() -> None:
    """Import ComfyUI from COMFY_ROOT as its own scripts would, for tests that use its classes in-process.

    ComfyUI reads its command line when comfy.cli_args is first imported: it gets ours (CPU;
    PyTorch's SDPA, the attention diffusers uses, ~10x faster than the CPU default). One torch
    thread and denormals flushed, as the ComfyUI tests expect.
    """
    if COMFY_ROOT not in sys.path:
        sys.path.insert(0, COMFY_ROOT)
    argv = sys.argv
    sys.argv = [argv[0], "--cpu", "--use-pytorch-cross-attention"]
    try:
        import comfy.options

        comfy.options.enable_args_parsing()
        import comfy.cli_args  # noqa: F401
        import comfy.model_management  # noqa: F401
    finally:
        sys.argv = argv
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)


def patch_api() -> bool:
    """Whether this ComfyUI has the APIs the node patches through (0.3.x from December 2024 on)."""
    from comfy.model_patcher import ModelPatcher

    return all(hasattr(ModelPatcher, n) for n in ("add_wrapper_with_key", "set_model_forward_timestep_embed_patch"))


#: Native latent side of the tiny models in these tests (256 px): 2x native is a 64x64 latent.
NATIVE = 32
CONTEXT = TINY["context_dim"]


def sd15_unet_config(**overrides: Any) -> dict:
    """SD 1.5's layout at width 32: 4 levels, attention on the first three, conv proj_in."""
    return unet_config("sd15", **overrides)


def sdxl_unet_config(**overrides: Any) -> dict:
    """SDXL's layout at width 32: 3 levels, attention on the last two, linear proj_in, adm 2816."""
    return unet_config("sdxl", **overrides)


def build(family: str = "sd15", seed: int = 0, model_type: Optional[str] = None, **overrides: Any):
    """(ModelPatcher, unet_config) of a tiny random model built with ComfyUI's own classes."""
    if family in ("sdxl", "sdxl-refiner"):
        cfg = unet_config(family, **overrides)
    else:
        # SD 2.x sets 64 channels per head: width 64 gives it one head at the top stage.
        sd2 = {"context_dim": 1024, "use_linear_in_transformer": True, "model_channels": 64}
        cfg = sd15_unet_config(**(sd2 if family == "sd2" else {}))
        cfg.update(overrides)
    return build_patcher(family, cfg, seed, model_type)


def conds(family: str, height: int, width: int, seed: int = 1, tokens: int = 8):
    """(positive, negative) in ComfyUI's CONDITIONING format; sizes in pixels for SDXL's adm."""
    g = torch.Generator().manual_seed(seed)
    context = 1024 if family == "sd2" else CONTEXT

    def one():
        extra = {}
        if family.startswith("sdxl"):
            extra = {
                "pooled_output": torch.randn(1, 1280, generator=g),
                "width": width,
                "height": height,
                "crop_w": 0,
                "crop_h": 0,
                "target_width": width,
                "target_height": height,
            }
        return [[torch.randn(1, tokens, context, generator=g), extra]]

    return one(), one()


def sample(
    patcher,
    family: str,
    latent_hw,
    steps: int = 4,
    cfg: float = 1.0,
    seed: int = 7,
    sampler: str = "euler",
    scheduler: str = "normal",
    denoise: float = 1.0,
    latent_image=None,
    start_step=None,
    last_step=None,
    positive=None,
    negative=None,
    batch: int = 1,
):
    import comfy.sample

    h, w = latent_hw
    latent = latent_image if latent_image is not None else torch.zeros(batch, 4, h, w)
    noise = comfy.sample.prepare_noise(latent, seed)
    pos, neg = conds(family, 8 * h, 8 * w) if positive is None else (positive, negative)
    return comfy.sample.sample(
        patcher,
        noise,
        steps,
        cfg,
        sampler,
        scheduler,
        pos,
        neg,
        latent,
        denoise=denoise,
        start_step=start_step,
        last_step=last_step,
        disable_pbar=True,
        seed=seed,
    )


class Recorder(list):
    """Collects hidiff.comfy CallRecords."""

    def __call__(self, record) -> None:
        self.append(record)
