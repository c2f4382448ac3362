"""RAU-Net on a diffusers U-Net: the strided conv, the pooling, and the up path's sizes.

* a pre/post hook pair on the conv stage's downsampler re-runs its 3x3 stride-2 convs
  with stride 4, padding 2, dilation 2 for this call (restored right after, even on
  error; a lock keeps another thread's call of the same conv from seeing the geometry);
* a post-hook on the first attention of the pool stage avg-pools its output, and one on
  the mirrored up stage's attention that consumes the last pooled skip resizes it back;
* pre-hooks on every downsampler record its input size and pre-hooks on the upsamplers
  land each one on its skip, so any size works.
"""

from __future__ import annotations

import threading
from typing import Any, Optional

import torch
from torch import nn

from ..core import ops
from .hooks import HookGroup, first_tensor, replace_first


class RAUNetHooks(HookGroup):
    name = "raunet"

    def __init__(self, patch: Any) -> None:
        super().__init__(patch)
        self.lock = threading.RLock()

    def __getstate__(self) -> dict:
        return {k: v for k, v in vars(self).items() if k != "lock"}

    def __setstate__(self, state: dict) -> None:
        vars(self).update(state)
        self.lock = threading.RLock()

    def attach(self, unet: nn.Module) -> None:
        arch, down, up = self.patch.arch, unet.down_blocks, unet.up_blocks
        for k in range(arch.num_stages - 1):
            self.pre(down[k].downsamplers[0], "record_skip", k)
            self.pre(up[k].upsamplers[0], "land_on_skip", arch.num_stages - 2 - k)
        conv = down[arch.conv_stage].downsamplers[0]
        self.pre(conv, "conv_start")
        self.post(conv, "conv_end")
        self.post(down[arch.pool_stage].attentions[0], "pool")
        self.post(up[arch.up_index(arch.pool_stage)].attentions[arch.unpool_layer], "unpool")

    def describe(self, unet: nn.Module) -> dict[str, str]:
        arch = self.patch.arch
        names = {
            f"down_blocks.{arch.conv_stage}.downsamplers.0": "conv re-run with stride 4, padding 2, dilation 2",
            f"down_blocks.{arch.pool_stage}.attentions.0": "output avg-pooled 2x2 (ceil), size recorded",
            f"up_blocks.{arch.up_index(arch.pool_stage)}.attentions.{arch.unpool_layer}": "output resized back "
            "(bicubic)",
        }
        for k in range(arch.num_stages - 1):
            if k != arch.conv_stage:
                names[f"down_blocks.{k}.downsamplers.0"] = "input size recorded (read only)"
            names[f"up_blocks.{k}.upsamplers.0"] = "output size forced to its skip connection"
        return names

    # ------------------------------------------------------------------ hooks
    def record_skip(self, stage: int, module: nn.Module, args: tuple, kwargs: dict) -> None:
        call = self.call()
        if call is not None:
            x = args[0] if args else kwargs["hidden_states"]
            call.record.skip_sizes[stage] = (int(x.shape[-2]), int(x.shape[-1]))

    def land_on_skip(self, stage: int, module: nn.Module, args: tuple, kwargs: dict) -> Optional[tuple]:
        call = self.call()
        # Only while RAU-Net shrinks a stage: otherwise the U-Net's own sizes are right.
        size = call.record.skip_sizes.get(stage) if call is not None and call.plan.resizes else None
        if size is None:
            return None
        if len(args) > 1:
            return (args[0], size) + tuple(args[2:]), kwargs
        return args, {**kwargs, "output_size": size}

    def conv_start(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        call = self.call()
        if call is None:
            return
        # Every call of this conv takes the lock, striding or not: the geometry is the
        # module's, and another thread's call must not run while it is changed.
        self.lock.acquire()
        call.conv_locked += 1
        if not call.plan.conv:
            return
        # Every 3x3 stride-2 conv inside: the layer itself and, with PEFT LoRA, its
        # wrapped base layer and lora_A, so that a LoRA delta keeps the same geometry.
        for conv in module.modules():
            if isinstance(conv, nn.Conv2d) and tuple(conv.stride) == (2, 2):
                call.conv_saved.append((conv, conv.stride, conv.padding, conv.dilation))
                conv.stride = ops.RAU_CONV_GEOMETRY["stride"]
                conv.padding = ops.RAU_CONV_GEOMETRY["padding"]
                conv.dilation = ops.RAU_CONV_GEOMETRY["dilation"]

    def conv_end(self, module: nn.Module, args: tuple, output: Any) -> None:
        call = self.call()
        if call is not None:
            if call.conv_saved and isinstance(output, torch.Tensor):  # not an error unwinding
                call.record.strided((int(output.shape[-2]), int(output.shape[-1])))
            self.release(call)

    def release(self, call: Any) -> None:
        """Put the conv geometry back and let other calls in (also after an error)."""
        while call.conv_saved:
            conv, stride, padding, dilation = call.conv_saved.pop()
            conv.stride, conv.padding, conv.dilation = stride, padding, dilation
        while call.conv_locked:
            call.conv_locked -= 1
            self.lock.release()

    def pool(self, module: nn.Module, args: tuple, output: Any) -> Any:
        call = self.call()
        if call is None or not call.plan.pool:
            return None
        x = first_tensor(output)
        pooled = ops.rau_pool(x)
        call.record.pooled_map((int(x.shape[-2]), int(x.shape[-1])), (int(pooled.shape[-2]), int(pooled.shape[-1])))
        return replace_first(output, pooled)

    def unpool(self, module: nn.Module, args: tuple, output: Any) -> Any:
        call = self.call()
        if call is None or not call.plan.pool or call.record.pooled_from is None:
            return None
        x = first_tensor(output)
        call.record.unpooled = ((int(x.shape[-2]), int(x.shape[-1])), call.record.pooled_from)
        return replace_first(output, ops.rau_unpool(x, call.record.pooled_from))
