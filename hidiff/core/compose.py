"""Which other model patches HiDiffusion works with, and what every host says when it cannot.

Two classes of patch cannot share a U-Net with parts of HiDiffusion, whichever host runs them:

* patches that **resize the features between blocks** in the early steps (Deep Shrink, Kohya's
  hires fix: ComfyUI's ``input_block_patch_after_skip``, the same patch in Forge and reForge, or
  anything that hands a downsampler a map of another size than the U-Net's own): they shrink the
  same features RAU-Net shrinks, to the same end, and the sizes RAU-Net plans (ControlNet
  residuals, the unpool, the up-samplers) no longer hold;
* patches that **rearrange the self-attention's tokens** (tiles, merged tokens: HyperTile, ToMe):
  the windows or the key/value downsampling would cut a layout that is not the feature map.

Hosts find the patches (each in its own patch mechanism) and name them; the decision and the
message, with what to do, are made here once. ``where`` says where the user turns an option off
("on the HiDiffusion node", "in the HiDiffusion accordion").
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

from .config import HiDiffusionConfig


class CompositionError(ValueError):
    """HiDiffusion and another model patch on the same model cannot work together."""


def names(patches: Sequence[str]) -> str:
    """Patch names joined for a message, each once, in order."""
    return " and ".join(dict.fromkeys(patches))


def check_composition(
    config: HiDiffusionConfig,
    *,
    resizers: Sequence[str] = (),
    token_patches: Sequence[str] = (),
    where: str = "on the HiDiffusion node",
) -> None:
    """Refuse, naming both and what to do, another patch HiDiffusion with ``config`` cannot run beside.

    ``resizers``: names of patches that resize the features between blocks; ``token_patches``:
    names of patches that tile or merge the self-attention's tokens.
    """
    if config.raunet and resizers:
        raise CompositionError(resizing_message(names(resizers), where))
    if (config.window_attn or config.kv_downsample > 1) and token_patches:
        both = names(token_patches)
        what = "windowed attention (MSW-MSA)" if config.window_attn else "key/value downsampling"
        raise CompositionError(
            f"HiDiffusion's {what} and {both} both rearrange the self-attention's tokens (into windows, "
            f"tiles or merged tokens), so one would run on the other's layout. Remove {both}, or set "
            f"window_attn off and kv_downsample 1 {where} to keep {both} with RAU-Net."
        )


def resizing_message(patch: str, where: str = "on the HiDiffusion node", seen: str = "") -> str:
    """The refusal for ``patch``, which resizes the U-Net's features between blocks, beside RAU-Net
    (``seen``: what showed it, when it was found acting)."""
    return (
        f"HiDiffusion's RAU-Net and {patch} both resize the U-Net's features in the early steps (to keep the "
        f"layout at the model's native scale); together they shrink the same features twice{seen}. Remove "
        f"{patch}, or turn raunet off {where} to keep {patch} with the windowed attention."
    )


def check_planned_size(
    config: HiDiffusionConfig,
    stage: int,
    size: Sequence[int],
    planned: Optional[Sequence[int]],
    suspects: str = "",
    where: str = "on the HiDiffusion node",
) -> None:
    """Refuse when, with RAU-Net on, stage ``stage``'s downsampler meets a map of ``size`` where the
    call's plan says ``planned``: another patch resized the features between blocks, whatever its
    mechanism (``suspects`` names the patches that could have, when the host knows them)."""
    if not config.raunet or planned is None or tuple(size) == tuple(planned):
        return
    who = suspects or "another patch on this U-Net (Deep Shrink, Kohya's hires fix or similar)"
    seen = (
        f" (stage {stage}'s downsampler met a {size[0]}x{size[1]} map where the U-Net makes {planned[0]}x{planned[1]})"
    )
    raise CompositionError(resizing_message(who, where, seen))
