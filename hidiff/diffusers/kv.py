"""Key/value downsampling (ToDo-style) of the top stages' self-attention on a diffusers U-Net.

The self-attentions (``attn1``) of the transformer blocks that MSW-MSA windows, at the
top stage and its mirror (and with ``kv_levels`` 2 those of the next-lower-resolution
transformer stage and its mirror too), take their keys and values from a token map
shrunk by ``kv_downsample`` per side (:func:`hidiff.core.ops.kv_downsample`), while their
queries stay at full resolution, so every output keeps its size. The deeper level is
never windowed: its keys come from its whole map.

How: a pre-hook on each such ``attn1`` passes the shrunk map as ``encoder_hidden_states``.
diffusers' ``Attention`` projects keys and values from ``encoder_hidden_states`` (queries
from ``hidden_states``), and a self-attention has no ``norm_cross`` to apply to it, so this
works with any attention processor that follows that contract (diffusers' own, xformers,
sliced, LoRA, third-party ones built on ``attn.to_k(encoder_hidden_states)``). Blocks built
with ``only_cross_attention`` (their ``attn1`` attends to the text) are left alone.

With MSW-MSA the hook runs after the window hook (groups attach in order), so it sees
the packed windows and shrinks each window on its own: every key summarises tokens of
its own window only (see docs/speed.md for the measurement behind this choice). On an
odd-sized map the padded windows' mask is shrunk with them: padding never enters an
average, and a cell of padding only is masked.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from ..core import ops
from .hooks import HookGroup, arg
from .model import is_transformer_block

_METHOD_WORDS = {
    "nearest": "the top-left token of each {f}x{f} cell",
    "average": "the mean of each {f}x{f} cell",
    "area": "area-averaged",
}


class KVHooks(HookGroup):
    name = "kv"

    def __init__(self, patch: Any) -> None:
        super().__init__(patch)
        # Refuses kv_levels beyond the network's transformer stages before anything changes.
        self.stages = patch.arch.kv_stages(patch.config.kv_levels)

    def paths(self) -> list[tuple[int, str]]:
        """(down stage, module path) of every stage, down and up, whose self-attention this group shrinks."""
        arch = self.patch.arch
        out = []
        for k in self.stages:
            out += [(k, f"down_blocks.{k}"), (k, f"up_blocks.{arch.up_index(k)}")]
        return out

    def attach(self, unet: nn.Module) -> None:
        for stage, path in self.paths():
            for transformer in unet.get_submodule(path).attentions:
                self.pre(transformer, "record_map")
                for sub in transformer.modules():
                    if is_transformer_block(sub) and not getattr(sub, "only_cross_attention", False):
                        self.pre(sub.attn1, "shrink", transformer, stage)

    def describe(self, unet: nn.Module) -> dict[str, str]:
        config = self.patch.config
        factor = config.kv_downsample
        names: dict[str, str] = {}
        for stage, path in self.paths():
            windowed = config.window_attn and stage == self.patch.arch.window_stage
            for name, module in unet.get_submodule(path).named_modules():
                if name.count(".") == 1 and name.startswith("attentions."):
                    names[f"{path}.{name}"] = "token map size recorded (read only)"
                if is_transformer_block(module) and not getattr(module, "only_cross_attention", False):
                    key = f"{path}.{name}.attn1"
                    where = "each window's" if windowed else "the"
                    what = (
                        f"keys/values from {where} token map downsampled {factor}x per side "
                        f"({_METHOD_WORDS[ops.KV_METHOD].format(f=factor)}), queries at full resolution"
                    )
                    if windowed:
                        what = f"self-attention in shifted 2x2 windows; {what}"
                    elif stage != self.patch.arch.window_stage:
                        what = f"{what} (kv level {stage - self.patch.arch.window_stage + 1})"
                    names[key] = what
        return names

    # ------------------------------------------------------------------ hooks
    def shrink(
        self, transformer: nn.Module, stage: int, module: nn.Module, args: tuple, kwargs: dict
    ) -> Optional[tuple]:
        call = self.call()
        if call is None or call.plan.kv <= 1 or stage not in call.plan.kv_stages:
            return None
        x = arg(args, kwargs, 0, "hidden_states")
        if not isinstance(x, torch.Tensor) or x.ndim != 3 or kwargs.get("encoder_hidden_states") is not None:
            return None  # not a self-attention over the token map
        if len(args) > 1:
            return None  # encoder_hidden_states passed positionally: not the transformer block's call
        mask = kwargs.get("attention_mask")
        stack = call.open_windows.get(id(module))
        win = stack[-1] if stack else None
        valid = None
        if win is not None and win.tokens is x:
            height, width = ops.window_sides(win.height, win.width)  # each (padded) window
            if win.key_bias is not None:
                if mask is not win.key_bias:
                    return None  # someone else's mask over the keys: leave this call whole
                valid = win.key_bias[:, 0, :] == 0
                mask = None
        else:
            hw = call.maps.get(id(transformer))
            if hw is None or x.shape[1] != hw[0] * hw[1]:
                return None
            height, width = hw
        if mask is not None or min(height, width) < 2:
            return None  # an attention mask over the full-size keys cannot follow them
        kv = ops.kv_downsample(x, height, width, call.plan.kv, valid=valid)
        new = {**kwargs, "encoder_hidden_states": kv.tokens}
        if kv.valid is not None:
            new["attention_mask"] = ops.key_bias(kv.valid, x.dtype)
        call.record.kv_calls += 1
        call.record.kv_maps.append(((height, width), (kv.height, kv.width)))
        call.record.kv_at.append(stage)
        return args, new
