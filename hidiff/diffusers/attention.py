"""The top stages' self-attention on a diffusers U-Net: MSW-MSA windows and key/value downsampling.

What each self-attention does in a call is the core's rule (:mod:`hidiff.core.rules`):
shifted 2x2 windows at the top stage and its mirror, keys/values shrunk by
``kv_downsample`` per side (inside each padded window where windowed; over the whole map
at the next stage with ``kv_levels`` 2). This module only wires it to diffusers:

* a pre-hook on each ``Transformer2DModel`` records its H x W (its input is still
  (B, C, H, W), exact on odd sizes where N alone is not);
* a pre-hook on each self-attention (``attn1``) hands the core the token map and passes
  what it returns as the attention's inputs: the windows as ``hidden_states``, the shrunk
  map as ``encoder_hidden_states`` (diffusers' ``Attention`` projects keys and values from
  it and queries from ``hidden_states``; a self-attention has no ``norm_cross``, so any
  processor that follows that contract works), the padding bias as ``attention_mask``;
* a post-hook merges the windows back.

Windows on odd-sized maps are uneven and padded; the padding is masked through the
attention's mask argument. diffusers' own attention processors honour it; a processor
from elsewhere may not, so on an odd map such a processor runs the whole map, unwindowed
(exact, only not faster), and the call record counts it in ``unwindowed``. Blocks built
with ``only_cross_attention`` (their ``attn1`` attends to the text) keep whole keys.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from ..core import ops, rules
from .hooks import HookGroup, arg
from .model import is_transformer_block

_METHOD_WORDS = {
    "nearest": "the top-left token of each {f}x{f} cell",
    "average": "the mean of each {f}x{f} cell",
    "area": "area-averaged",
}


def masks_honoured(attention: nn.Module) -> bool:
    """Whether the processor of ``attention`` is one of diffusers' own, which apply ``attention_mask``."""
    processor = getattr(attention, "processor", None)
    return processor is not None and type(processor).__module__.startswith("diffusers.")


class SelfAttentionHooks(HookGroup):
    name = "self_attention"

    def __init__(self, patch: Any) -> None:
        super().__init__(patch)
        config, arch = patch.config, patch.arch
        # Refuses kv_levels beyond the network's transformer stages before anything changes.
        kv_stages = arch.kv_stages(config.kv_levels) if config.kv_downsample > 1 else ()
        window_stages = (arch.window_stage,) if config.window_attn else ()
        # The window stage first, then the deeper kv stages: layer ordinals run in that order.
        self.stages = tuple(sorted(set(window_stages) | set(kv_stages)))

    def paths(self) -> list[tuple[int, str]]:
        """(down stage, module path) of every stage, down and up, whose self-attention this group rewrites."""
        arch = self.patch.arch
        out = []
        for k in self.stages:
            out += [(k, f"down_blocks.{k}"), (k, f"up_blocks.{arch.up_index(k)}")]
        return out

    def attach(self, unet: nn.Module) -> None:
        layer = 0
        for stage, path in self.paths():
            for transformer in unet.get_submodule(path).attentions:
                self.pre(transformer, "record_map")
                for sub in transformer.modules():
                    if is_transformer_block(sub):
                        # The block itself, not its id: a deep copy or a pickle of the model
                        # maps it to the copy's block, so the copy's windows find their maps.
                        cross_only = bool(getattr(sub, "only_cross_attention", False))
                        self.pre(sub.attn1, "open", transformer, layer, stage, cross_only)
                        self.post(sub.attn1, "close", with_kwargs=True)
                        layer += 1

    def describe(self, unet: nn.Module) -> dict[str, str]:
        config, arch = self.patch.config, self.patch.arch
        factor = config.kv_downsample
        names: dict[str, str] = {}
        for stage, path in self.paths():
            windowed = config.window_attn and stage == arch.window_stage
            shrunk = factor > 1
            for name, module in unet.get_submodule(path).named_modules():
                if name.count(".") == 1 and name.startswith("attentions."):
                    names[f"{path}.{name}"] = "token map size recorded (read only)"
                if not is_transformer_block(module):
                    continue
                what = "self-attention in shifted 2x2 windows" if windowed else ""
                if shrunk and not getattr(module, "only_cross_attention", False):
                    where = "each window's" if windowed else "the"
                    kv = (
                        f"keys/values from {where} token map downsampled {factor}x per side "
                        f"({_METHOD_WORDS[ops.KV_METHOD].format(f=factor)}), queries at full resolution"
                    )
                    if not windowed and stage != arch.window_stage:
                        kv = f"{kv} (kv level {stage - arch.window_stage + 1})"
                    what = f"{what}; {kv}" if what else kv
                if what:
                    names[f"{path}.{name}.attn1"] = what
        return names

    # ------------------------------------------------------------------ hooks
    def open(
        self,
        transformer: nn.Module,
        layer: int,
        stage: int,
        cross_only: bool,
        module: nn.Module,
        args: tuple,
        kwargs: dict,
    ) -> Optional[tuple]:
        call = self.call()
        if call is None:
            return None
        rule = rules.layer_rule(call.plan, self.patch.arch, stage)
        if not rule.acts:
            return None
        hw = call.maps.get(id(transformer))
        x = arg(args, kwargs, 0, "hidden_states")
        if hw is None or not isinstance(x, torch.Tensor) or x.ndim != 3 or x.shape[1] != hw[0] * hw[1] or min(hw) < 2:
            return None  # not the token map of the recorded block (e.g. hidden states under another name)
        mask = kwargs.get("attention_mask")
        if (
            cross_only
            or len(args) > 1  # encoder_hidden_states passed positionally: not the transformer block's call
            or kwargs.get("encoder_hidden_states") is not None
        ):
            rule = rules.LayerRule(rule.windowed, 1, stage)  # not a self-attention over the token map
        odd = hw[0] % 2 or hw[1] % 2
        if rule.windowed and odd:
            if not masks_honoured(module):
                call.record.unwindowed += 1
                rule = rules.LayerRule(False, rule.kv, stage)
            elif mask is not None:
                raise ValueError(
                    "hidiff: MSW-MSA on an odd-sized map needs the self-attention mask slot, but an attention_mask "
                    "was passed to attn1; disable window attention (window_attn=False) for this model."
                )
        if mask is not None:
            rule = rules.LayerRule(rule.windowed, 1, stage)  # a mask over the full-size keys cannot follow them
        if not rule.acts:
            return None
        shift = rules.window_shifts(self.patch.config, call.seeds, call.plan.step, layer, hw) if rule.windowed else None
        arranged = rules.arrange_self_attention(x, hw, rule, shift, record=call.record, layer=layer)
        call.open_windows.setdefault(id(module), []).append(arranged)
        new = dict(kwargs)
        if arranged.keys is not None:
            new["encoder_hidden_states"] = arranged.keys
        if arranged.key_bias is not None:
            new["attention_mask"] = arranged.key_bias
        if args:
            return (arranged.tokens,) + tuple(args[1:]), new
        return args, {**new, "hidden_states": arranged.tokens}

    def close(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        call = self.call()
        stack = call.open_windows.get(id(module)) if call is not None else None
        if not stack:
            return None
        arranged = stack.pop()
        if not isinstance(output, torch.Tensor) or arranged.windows is None:
            return None
        return rules.merge_self_attention(output, arranged)
