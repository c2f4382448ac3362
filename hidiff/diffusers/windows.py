"""MSW-MSA on a diffusers U-Net: the top stage's self-attention in shifted 2x2 windows.

A pre-hook on each windowed ``Transformer2DModel`` records its H x W (its input is still
(B, C, H, W), which is exact on odd sizes where N alone is not), and a pre/post hook pair
on each self-attention (``attn1``) packs the tokens into windows and unpacks them.

Windows on odd-sized maps are uneven and padded; the padding is masked through the
attention's mask argument. diffusers' own attention processors honour it; a processor
from elsewhere may not, so on an odd map such a processor runs the whole map, unwindowed
(exact, only not faster), and the call record counts it in ``unwindowed``.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from ..core import ops
from .hooks import HookGroup, arg
from .model import is_transformer_block


def windowed_stages(arch: Any) -> tuple[str, str]:
    return f"down_blocks.{arch.window_stage}", f"up_blocks.{arch.up_index(arch.window_stage)}"


def masks_honoured(attention: nn.Module) -> bool:
    """Whether the processor of ``attention`` is one of diffusers' own, which apply ``attention_mask``."""
    processor = getattr(attention, "processor", None)
    return processor is not None and type(processor).__module__.startswith("diffusers.")


class WindowHooks(HookGroup):
    name = "windows"

    def attach(self, unet: nn.Module) -> None:
        layer = 0
        for path in windowed_stages(self.patch.arch):
            for transformer in unet.get_submodule(path).attentions:
                self.pre(transformer, "record_map")
                for sub in transformer.modules():
                    if is_transformer_block(sub):
                        # The block itself, not its id: a deep copy or a pickle of the model
                        # maps it to the copy's block, so the copy's windows find their maps.
                        self.pre(sub.attn1, "open", transformer, layer)
                        self.post(sub.attn1, "close", with_kwargs=True)
                        layer += 1

    def describe(self, unet: nn.Module) -> dict[str, str]:
        names: dict[str, str] = {}
        for path in windowed_stages(self.patch.arch):
            for name, _ in unet.get_submodule(path).named_modules():
                if name.count(".") == 1 and name.startswith("attentions."):
                    names[f"{path}.{name}"] = "token map size recorded (read only)"
                if name.endswith(".attn1") and ".transformer_blocks." in name:
                    names[f"{path}.{name}"] = "self-attention in shifted 2x2 windows"
        return names

    # ------------------------------------------------------------------ hooks
    def open(self, transformer: nn.Module, layer: int, module: nn.Module, args: tuple, kwargs: dict) -> Optional[tuple]:
        call = self.call()
        if call is None or not call.plan.windows:
            return None
        hw = call.maps.get(id(transformer))
        x = arg(args, kwargs, 0, "hidden_states")
        if hw is None or x is None or x.ndim != 3 or x.shape[1] != hw[0] * hw[1] or min(hw) < 2:
            return None  # not the token map of the recorded block (e.g. hidden states under another name)
        odd = hw[0] % 2 or hw[1] % 2
        if odd and not masks_honoured(module):
            call.record.unwindowed += 1
            return None
        shift = self.patch.shifts(call, layer, hw, x.shape[0])
        win = ops.window_partition(x, hw[0], hw[1], shift)
        if win.key_bias is not None:
            if kwargs.get("attention_mask") is not None:
                raise ValueError(
                    "hidiff: MSW-MSA on an odd-sized map needs the self-attention mask slot, but an attention_mask "
                    "was passed to attn1; disable window attention (window_attn=False) for this model."
                )
            kwargs = {**kwargs, "attention_mask": win.key_bias}
        call.open_windows.setdefault(id(module), []).append(win)
        rec = call.record
        rec.window_calls += 1
        rec.windows = True
        rec.window_maps.append(hw)
        rec.shifts.append(win.shift)
        if args:
            return (win.tokens,) + tuple(args[1:]), kwargs
        return args, {**kwargs, "hidden_states": win.tokens}

    def close(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        call = self.call()
        stack = call.open_windows.get(id(module)) if call is not None else None
        if not stack:
            return None
        win = stack.pop()
        if not isinstance(output, torch.Tensor):
            return None
        return ops.window_merge(output, win)
