"""ControlNet and T2I-Adapter residuals under RAU-Net.

RAU-Net shrinks the U-Net's features, so the residuals a ControlNet or T2I-Adapter
computes no longer fit them. Two treatments (``HiDiffusionConfig.controlnet``):

* ``"resize"``: the ControlNets run at full size at every step; a U-Net pre-hook
  resizes their residuals to the plan's feature sizes;
* ``"native"`` (the published treatment for SDXL text-to-image): a pre-hook on each
  ControlNet runs it at the model's native size for the first ``controlnet_steps_ratio``
  of the steps, and the U-Net ignores it after that.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from ..core import ops, rules
from ..core.planner import Plan
from ..core.rules import CallRecord
from .hooks import HookGroup, arg, replace_arg

RESIDUALS = ("down_block_additional_residuals", "mid_block_additional_residual", "down_intrablock_additional_residuals")


def controlnets(pipe: Any) -> list:
    """The ControlNet models of a pipeline (one, or each of a MultiControlNetModel)."""
    root = getattr(pipe, "controlnet", None)
    if not isinstance(root, nn.Module):
        return []
    return [m for m in root.modules() if hasattr(m, "controlnet_cond_embedding")]


class ControlNetHooks(HookGroup):
    name = "controlnet"

    def attach(self, unet: nn.Module) -> None:
        for index, controlnet in enumerate(controlnets(self.patch.pipe)):
            self.pre(controlnet, "run_native", index)

    def describe(self, unet: nn.Module) -> dict[str, str]:
        if self.mode == "native":
            what = "run at the native size for the first steps, then ignored"
        else:
            what = "residuals resized to the U-Net's features"
        return {f"controlnet.{i}": what for i, _ in enumerate(controlnets(self.patch.pipe))}

    @property
    def mode(self) -> str:
        if self.patch.config.controlnet is not None:
            return self.patch.config.controlnet
        return "native" if self.patch.arch.kind == "sdxl" and self.patch.task.text2img_controlnet else "resize"

    def active(self, step: int, total: int) -> bool:
        return step < total * self.patch.config.controlnet_steps_ratio

    def fit(self, plan: Plan, kwargs: dict, record: Optional[CallRecord] = None) -> dict:
        """The U-Net call's keywords with residuals fitted to the plan's features (sizes: the core's)."""
        if self.mode == "native" and not self.active(plan.step, plan.total):
            kwargs = {**kwargs, RESIDUALS[0]: None, RESIDUALS[1]: None}
        if all(kwargs.get(name) is None for name in RESIDUALS):
            return kwargs
        kwargs = dict(kwargs)
        sizes = rules.residual_sizes(plan, self.patch.arch)
        down, mid, adapter = (kwargs.get(name) for name in RESIDUALS)
        if down is not None:
            kwargs[RESIDUALS[0]] = tuple(ops.resize_to(r, s) for r, s in zip(down, sizes.down))
        if mid is not None:
            kwargs[RESIDUALS[1]] = ops.resize_to(mid, sizes.mid)
        if adapter is not None:
            # the U-Net pop()s from this list: hand it a new one
            kwargs[RESIDUALS[2]] = [ops.resize_to(r, s) for r, s in zip(adapter, sizes.adapter)]
        if record is not None:
            for kind, name in zip(("down", "mid", "adapter"), RESIDUALS):
                value = kwargs.get(name)
                if value is not None:
                    record.residual_sizes[kind] = [
                        tuple(r.shape[-2:]) for r in ([value] if isinstance(value, torch.Tensor) else value)
                    ]
        return kwargs

    def run_native(self, index: int, module: nn.Module, args: tuple, kwargs: dict) -> Any:
        """Under "native", run the ControlNet at the model's native size (published treatment)."""
        if self.mode != "native":
            return None
        sample = arg(args, kwargs, 0, "sample")
        latent = (int(sample.shape[-2]), int(sample.shape[-1]))
        plan = self.patch.plan_for(sample, arg(args, kwargs, 1, "timestep"))
        native = self.patch.arch.native
        factor = max(latent[0] / native[0], latent[1] / native[1])
        if not plan.active or factor <= 1:
            return None
        if self.active(plan.step, plan.total):
            small = tuple(max(8, int(side / factor) // 8 * 8) for side in latent)
        else:
            # Past the ControlNet phase the U-Net ignores its residuals (the published code
            # skips the call). A pre-hook cannot skip a call, so make it nearly free: the
            # smallest map its down path can take.
            side = 2 ** (len(module.down_blocks) - 1)
            small = (side, side)
        sample = torch.nn.functional.interpolate(sample, size=small, mode="nearest")
        args, kwargs = replace_arg(args, kwargs, 0, "sample", sample)
        cond = arg(args, kwargs, 3, "controlnet_cond")
        if isinstance(cond, torch.Tensor):
            cond = torch.nn.functional.interpolate(
                cond, size=(8 * small[0], 8 * small[1]), mode="bilinear", antialias=True
            )
            args, kwargs = replace_arg(args, kwargs, 3, "controlnet_cond", cond)
        return args, kwargs
