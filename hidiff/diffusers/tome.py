"""tomesd (token merging, ``tomesd.apply_patch``) next to hidiff.

tomesd merges the tokens of the top stage's transformer blocks before their self-attention,
so that ``attn1`` sees a shorter sequence with no grid: MSW-MSA's 2x2 windows and
``kv_downsample`` need the H x W token map and would silently do nothing. hidiff therefore
refuses the combination, applied in either order: at ``apply_hidiffusion`` when tomesd came
first, at the first U-Net call when tomesd came after. RAU-Net alone (``window_attn=False``,
``kv_downsample=1``) composes with tomesd in either order (docs/speed.md has the timing).
"""

from __future__ import annotations

from typing import Any

from ..core.config import HiDiffusionConfig


def tome_merges_attention(unet: Any) -> bool:
    """Whether tomesd is applied to ``unet`` (its hooks live) and merges tokens for self-attention."""
    info = getattr(unet, "_tome_info", None)
    if not isinstance(info, dict) or not info.get("hooks"):
        return False  # never applied, or tomesd.remove_patch ran
    return bool(info.get("args", {}).get("merge_attn", True))


def needs_token_grid(config: HiDiffusionConfig) -> bool:
    return config.window_attn or config.kv_downsample > 1


def check_tomesd(unet: Any, config: HiDiffusionConfig) -> None:
    """Refuse tomesd under MSW-MSA or kv_downsample, naming both ways out."""
    if needs_token_grid(config) and tome_merges_attention(unet):
        parts = [
            p for p, on in (("window_attn", config.window_attn), ("kv_downsample", config.kv_downsample > 1)) if on
        ]
        raise ValueError(
            "hidiff: tomesd is applied to this U-Net and merges the top stage's tokens before their self-attention, "
            f"so {' and '.join(parts)} ({'which need' if len(parts) > 1 else 'which needs'} the token grid) would "
            "silently do nothing. Remove tomesd first "
            "(tomesd.remove_patch(pipe)), or keep it with RAU-Net only: "
            "apply_hidiffusion(pipe, window_attn=False, kv_downsample=1)."
        )
