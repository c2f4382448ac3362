"""Attach HiDiffusion to a diffusers U-Net with plain torch module hooks, and take it off.

No class, forward method, attribute or attention processor of the model is replaced:
everything is a forward (pre-)hook, so LoRA layers, IP-Adapter processors, FreeU, CPU
offload hooks and later diffusers releases keep working, and removing the hooks
restores the model exactly. One :class:`Patch` per U-Net holds the hooks and the state
of the current call:

* a pre-hook on the U-Net finds the step of the call (see :mod:`hidiff.schedule`) and
  decides what is active;
* RAU-Net: a pre/post hook pair on the conv downsampler of the conv stage re-runs its
  convs with stride 4 (restored right after, even on error); a post-hook on the first
  attention of the pool stage avg-pools its output, and one on the second attention of
  the mirrored up block resizes it back; pre-hooks on every downsampler record the skip
  sizes and pre-hooks on the upsamplers land each one on its skip, so any size works;
* MSW-MSA: a pre-hook on each windowed Transformer2DModel records its H x W, and a
  pre/post hook pair on each self-attention (``attn1``) packs the tokens into shifted
  2x2 windows and unpacks them.
"""

from __future__ import annotations

import contextlib
import hashlib
import random
import weakref
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import torch
from torch import nn

from ..core import ops
from ..core.config import HiDiffusionConfig
from ..core.presets import PRESETS, Preset, StepTracker, choose_preset, in_range
from .model import Layout, UnsupportedModelError, detect_layout, find_unet

_PATCHES: weakref.WeakKeyDictionary[nn.Module, Patch] = weakref.WeakKeyDictionary()


@dataclass
class CallRecord:
    """What HiDiffusion did in the most recent U-Net call (for tests, ``hidiff info`` and users)."""

    step: int = 0
    total: int = 0
    latent: tuple[int, int] = (0, 0)
    preset: Optional[str] = None
    conv: bool = False
    pool: bool = False
    windows: bool = False
    window_calls: int = 0
    window_maps: list = field(default_factory=list)  # (H, W) of each windowed self-attention call
    shifts: list = field(default_factory=list)
    skip_sizes: dict = field(default_factory=dict)
    pooled_from: Optional[tuple[int, int]] = None


class Patch:
    def __init__(self, unet: nn.Module, pipe: Any, layout: Layout, config: HiDiffusionConfig, scheduler: Any) -> None:
        self.unet = unet
        self.layout = layout
        self.config = config
        self._pipe = weakref.ref(pipe) if pipe is not None else None
        self._scheduler = scheduler
        self.tracker = StepTracker()
        self.record: Optional[CallRecord] = None
        self._handles: list = []
        self._conv_saved: list = []
        self._open_windows: dict[int, list] = {}
        self._map_of: dict[int, int] = {}  # id(attn1) -> id(parent Transformer2DModel)
        self._maps: dict[int, tuple[int, int]] = {}
        self._shift_rng: Optional[random.Random] = None
        self._inpainting_pipe = bool(pipe is not None and "Inpaint" in type(pipe).__name__)
        self._controlnet_text2img = bool(
            pipe is not None
            and getattr(pipe, "controlnet", None) is not None
            and not any(k in type(pipe).__name__ for k in ("Img2Img", "Inpaint"))
        )

    # ------------------------------------------------------------------ wiring
    def attach(self) -> None:
        unet, lay = self.unet, self.layout
        self._hook_pre(unet, self._on_unet_call)
        self._handles.append(unet.register_forward_hook(_eager(self._on_unet_done), always_call=True))
        down, up = unet.down_blocks, unet.up_blocks
        if self.config.raunet:
            for k in range(lay.num_stages - 1):
                self._hook_pre(down[k].downsamplers[0], self._make_skip_recorder(k))
                self._hook_pre(up[k].upsamplers[0], self._make_upsample_sizer(lay.num_stages - 2 - k))
            conv_module = down[lay.conv_stage].downsamplers[0]
            self._hook_pre(conv_module, self._on_conv_start)
            self._handles.append(conv_module.register_forward_hook(_eager(self._on_conv_end), always_call=True))
            self._handles.append(down[lay.pool_stage].attentions[0].register_forward_hook(_eager(self._on_pool)))
            self._handles.append(
                up[lay.up_index(lay.pool_stage)].attentions[1].register_forward_hook(_eager(self._on_unpool))
            )
        for controlnet in _controlnets(self._pipe() if self._pipe is not None else None):
            self._hook_pre(controlnet, self._on_controlnet_call)
        if self.config.window_attn:
            for block in (down[lay.window_stage], up[lay.up_index(lay.window_stage)]):
                for transformer in block.attentions:
                    self._handles.append(transformer.register_forward_pre_hook(_eager(self._on_map)))
                    for sub in transformer.modules():
                        attn1 = getattr(sub, "attn1", None)
                        if isinstance(attn1, nn.Module) and hasattr(sub, "attn2"):
                            self._map_of[id(attn1)] = id(transformer)
                            self._hook_pre(attn1, self._on_attn_start)
                            self._handles.append(
                                attn1.register_forward_hook(
                                    _eager(self._on_attn_end), with_kwargs=True, always_call=True
                                )
                            )

    def _hook_pre(self, module: nn.Module, fn: Any) -> None:
        self._handles.append(module.register_forward_pre_hook(_eager(fn), with_kwargs=True))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._restore_convs()
        self._open_windows.clear()
        self.record = None

    # ------------------------------------------------------------------ schedule
    @property
    def scheduler(self) -> Any:
        pipe = self._pipe() if self._pipe is not None else None
        if pipe is not None and getattr(pipe, "scheduler", None) is not None:
            return pipe.scheduler
        return self._scheduler

    def plan(self, latent: tuple[int, int], step: int, total: int) -> tuple[Optional[Preset], bool, bool, bool]:
        """(preset, conv, pool, windows) for a call at step ``step`` of ``total`` on a latent of size ``latent``."""
        cfg, lay = self.config, self.layout
        if cfg.at_native == "skip" and latent[0] <= lay.native[0] and latent[1] <= lay.native[1]:
            return None, False, False, False
        preset = (
            PRESETS[cfg.preset]
            if cfg.preset
            else choose_preset(
                lay.kind,
                latent,
                lay.native,
                total,
                inpainting=lay.inpainting or self._inpainting_pipe,
                edm=_is_edm(self.scheduler),
                text2img_controlnet=self._controlnet_text2img,
                aggressive=cfg.aggressive,
            )
        )
        t1, t2 = cfg.ratios(preset)
        a = cfg.aggressive_step_ratio
        conv = cfg.raunet and in_range(preset.conv, step, total, t1, t2, a)
        pool = cfg.raunet and in_range(preset.pool, step, total, t1, t2, a)
        return preset, conv, pool, cfg.window_attn

    def _on_unet_call(self, module: nn.Module, args: tuple, kwargs: dict) -> Optional[tuple]:
        sample = args[0] if args else kwargs["sample"]
        timestep = args[1] if len(args) > 1 else kwargs.get("timestep")
        latent = (int(sample.shape[-2]), int(sample.shape[-1]))
        progress = self._locate(sample, timestep)
        preset, conv, pool, windows = self.plan(latent, progress.index, progress.total)
        self.record = CallRecord(
            step=progress.index,
            total=progress.total,
            latent=latent,
            preset=preset.name if preset else None,
            conv=conv,
            pool=pool,
            windows=windows and preset is not None,
        )
        self._maps.clear()
        self._restore_convs()
        if preset is None:
            return None
        if self._controlnet_mode() == "native" and not self._controlnet_active(progress):
            kwargs = {**kwargs, "down_block_additional_residuals": None, "mid_block_additional_residual": None}
        return args, self._fit_residuals(latent, conv, pool, kwargs)

    def _locate(self, sample: torch.Tensor, timestep: Any) -> Any:
        """The step of this call; a new run reseeds the window shifts. The ControlNet of a
        step is called before the U-Net, so whichever comes first starts the run."""
        progress = self.tracker.locate(timestep, self.scheduler)
        if progress.new_run or self._shift_rng is None:
            self._shift_rng = random.Random(self._run_seed(sample))
        return progress

    # ------------------------------------------------------------------ ControlNet
    def _controlnet_mode(self) -> str:
        if self.config.controlnet is not None:
            return self.config.controlnet
        return "native" if self.layout.kind == "sdxl" and self._controlnet_text2img else "resize"

    def _controlnet_active(self, progress: Any) -> bool:
        return progress.index < progress.total * self.config.controlnet_steps_ratio

    def _on_controlnet_call(self, module: nn.Module, args: tuple, kwargs: dict) -> Optional[tuple]:
        """Under "native", run the ControlNet at the model's native size (published treatment)."""
        if self._controlnet_mode() != "native":
            return None
        sample = args[0] if args else kwargs["sample"]
        timestep = args[1] if len(args) > 1 else kwargs.get("timestep")
        latent = (int(sample.shape[-2]), int(sample.shape[-1]))
        progress = self._locate(sample, timestep)
        if self.plan(latent, progress.index, progress.total)[0] is None:
            return None
        factor = max(latent[0] / self.layout.native[0], latent[1] / self.layout.native[1])
        if factor <= 1:
            return None
        if self._controlnet_active(progress):
            small = tuple(max(8, int(side / factor) // 8 * 8) for side in latent)
        else:
            # Past the ControlNet phase the U-Net ignores its residuals (the published code
            # skips the call). A pre-hook cannot skip a call, so make it nearly free: the
            # smallest map its down path can take.
            side = 2 ** (len(module.down_blocks) - 1)
            small = (side, side)
        sample = torch.nn.functional.interpolate(sample, size=small, mode="nearest")
        args, kwargs = _replace_arg(args, kwargs, 0, "sample", sample)
        cond = args[3] if len(args) > 3 else kwargs.get("controlnet_cond")
        if isinstance(cond, torch.Tensor):
            cond = torch.nn.functional.interpolate(
                cond, size=(8 * small[0], 8 * small[1]), mode="bilinear", antialias=True
            )
            args, kwargs = _replace_arg(args, kwargs, 3, "controlnet_cond", cond)
        return args, kwargs

    # ------------------------------------------------------------------ residuals
    def feature_sizes(self, latent: tuple[int, int], conv: bool, pool: bool) -> tuple[list, tuple, list]:
        """Feature sizes under a RAU-Net state: (skip features in ControlNet residual order,
        the mid block's, and where each down block, then the mid block, takes a T2I-Adapter residual)."""
        lay = self.layout
        size, skips, adapter = latent, [latent], []
        for k, block in enumerate(self.unet.down_blocks):
            for j in range(len(block.resnets)):
                if pool and k == lay.pool_stage and j == 0:
                    size = (-(-size[0] // 2), -(-size[1] // 2))
                skips.append(size)
            stage_out = size
            if getattr(block, "downsamplers", None):
                side = ops.rau_conv_side if conv and k == lay.conv_stage else ops.stock_downsample_side
                size = (side(size[0]), side(size[1]))
                skips.append(size)
            # Blocks with attention add the adapter residual inside, after their last pair;
            # the others after their downsampler.
            adapter.append(stage_out if getattr(block, "attentions", None) else size)
        # A residual left over after the down blocks goes to the mid block (SDXL adapters).
        adapter.append(size)
        return skips, size, adapter

    def _fit_residuals(self, latent: tuple, conv: bool, pool: bool, kwargs: dict) -> dict:
        """Resize ControlNet / T2I-Adapter residuals (computed at full or native size) to the U-Net's features."""
        names = (
            "down_block_additional_residuals",
            "mid_block_additional_residual",
            "down_intrablock_additional_residuals",
        )
        if all(kwargs.get(name) is None for name in names):
            return kwargs
        skips, mid, adapter = self.feature_sizes(latent, conv, pool)
        kwargs = dict(kwargs)
        if kwargs.get(names[0]) is not None:
            kwargs[names[0]] = tuple(ops.resize_to(r, s) for r, s in zip(kwargs[names[0]], skips))
        if kwargs.get(names[1]) is not None:
            kwargs[names[1]] = ops.resize_to(kwargs[names[1]], mid)
        if kwargs.get(names[2]) is not None:
            # the U-Net pop()s from this list: hand it a new one
            kwargs[names[2]] = [ops.resize_to(r, s) for r, s in zip(kwargs[names[2]], adapter)]
        return kwargs

    def _on_unet_done(self, module: nn.Module, args: tuple, output: Any) -> None:
        self._restore_convs()
        self._open_windows.clear()

    def _run_seed(self, sample: torch.Tensor) -> int:
        if self.config.window_seed is not None:
            return self.config.window_seed
        if self.config.window_shift != "seeded":
            return 0
        # The run's first latents are a function of the pipeline's generator: seeding the
        # shifts from them makes a seeded run reproducible without the global RNG.
        head = sample.detach().reshape(-1)[:256].to("cpu", torch.float32).numpy().tobytes()
        return int.from_bytes(hashlib.blake2b(head, digest_size=8).digest(), "little")

    # ------------------------------------------------------------------ RAU-Net
    def _make_skip_recorder(self, stage: int) -> Any:
        def record_skip(module: nn.Module, args: tuple, kwargs: dict) -> None:
            rec = self.record
            if rec is not None:
                x = args[0] if args else kwargs["hidden_states"]
                rec.skip_sizes[stage] = (int(x.shape[-2]), int(x.shape[-1]))

        return record_skip

    def _make_upsample_sizer(self, stage: int) -> Any:
        def land_on_skip(module: nn.Module, args: tuple, kwargs: dict) -> Optional[tuple]:
            rec = self.record
            # Only while RAU-Net shrinks a stage: otherwise the U-Net's own sizes are right.
            size = rec.skip_sizes.get(stage) if rec is not None and (rec.conv or rec.pool) else None
            if size is None:
                return None
            if len(args) > 1:
                return (args[0], size) + tuple(args[2:]), kwargs
            return args, {**kwargs, "output_size": size}

        return land_on_skip

    def _on_conv_start(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        rec = self.record
        if rec is None or not rec.conv:
            return
        # Every 3x3 stride-2 conv inside: the layer itself and, with PEFT LoRA, its
        # wrapped base layer and lora_A, so that a LoRA delta keeps the same geometry.
        for conv in module.modules():
            if isinstance(conv, nn.Conv2d) and tuple(conv.stride) == (2, 2):
                self._conv_saved.append((conv, conv.stride, conv.padding, conv.dilation))
                conv.stride = ops.RAU_CONV_GEOMETRY["stride"]
                conv.padding = ops.RAU_CONV_GEOMETRY["padding"]
                conv.dilation = ops.RAU_CONV_GEOMETRY["dilation"]

    def _on_conv_end(self, module: nn.Module, args: tuple, output: Any) -> None:
        self._restore_convs()

    def _restore_convs(self) -> None:
        while self._conv_saved:
            conv, stride, padding, dilation = self._conv_saved.pop()
            conv.stride, conv.padding, conv.dilation = stride, padding, dilation

    def _on_pool(self, module: nn.Module, args: tuple, output: Any) -> Any:
        rec = self.record
        if rec is None or not rec.pool:
            return None
        x = _first(output)
        rec.pooled_from = (int(x.shape[-2]), int(x.shape[-1]))
        return _replace_first(output, ops.rau_pool(x))

    def _on_unpool(self, module: nn.Module, args: tuple, output: Any) -> Any:
        rec = self.record
        if rec is None or not rec.pool or rec.pooled_from is None:
            return None
        return _replace_first(output, ops.rau_unpool(_first(output), rec.pooled_from))

    # ------------------------------------------------------------------ MSW-MSA
    def _on_map(self, module: nn.Module, args: tuple) -> None:
        x = args[0] if args else None
        if isinstance(x, torch.Tensor) and x.ndim == 4:
            self._maps[id(module)] = (int(x.shape[-2]), int(x.shape[-1]))

    def _draw_shift(self, h: int, w: int) -> tuple[int, int]:
        mode = self.config.window_shift
        if mode == "reference":
            u = float(torch.rand(1))  # the published draw: global torch RNG, once per block call
        elif mode == "seeded":
            assert self._shift_rng is not None
            u = self._shift_rng.random()
        else:
            return (0, 0)
        return ops.shift_from_uniform(u, h, w)

    def _on_attn_start(self, module: nn.Module, args: tuple, kwargs: dict) -> Optional[tuple]:
        rec = self.record
        if rec is None or not rec.windows:
            return None
        hw = self._maps.get(self._map_of.get(id(module), -1))
        x = args[0] if args else kwargs.get("hidden_states")
        if hw is None or x is None or x.ndim != 3 or x.shape[1] != hw[0] * hw[1] or min(hw) < 2:
            return None
        shift = self._draw_shift(*hw)
        win = ops.window_partition(x, hw[0], hw[1], shift)
        if win.key_bias is not None:
            if kwargs.get("attention_mask") is not None:
                raise ValueError(
                    "hidiff: MSW-MSA on an odd-sized map needs the self-attention mask slot, but an attention_mask "
                    "was passed to attn1; disable window attention (window_attn=False) for this call."
                )
            kwargs = {**kwargs, "attention_mask": win.key_bias}
        self._open_windows.setdefault(id(module), []).append(win)
        rec.window_calls += 1
        rec.window_maps.append(hw)
        rec.shifts.append(shift)
        args = (win.tokens,) + tuple(args[1:]) if args else args
        if not args:
            kwargs = {**kwargs, "hidden_states": win.tokens}
        return args, kwargs

    def _on_attn_end(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        stack = self._open_windows.get(id(module))
        if not stack:
            return None
        win = stack.pop()
        if not isinstance(output, torch.Tensor):
            return None
        return ops.window_merge(output, win)


def _eager(hook: Any) -> Any:
    """Run a hook outside torch.compile: its decisions (step, shift draws, conv geometry)
    are Python state that a traced graph would freeze into constants."""
    return torch.compiler.disable(hook)


def _replace_arg(args: tuple, kwargs: dict, index: int, name: str, value: Any) -> tuple[tuple, dict]:
    if len(args) > index:
        return args[:index] + (value,) + args[index + 1 :], kwargs
    return args, {**kwargs, name: value}


def _first(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, tuple):
        return output[0]
    return output.sample


def _replace_first(output: Any, x: torch.Tensor) -> Any:
    if isinstance(output, torch.Tensor):
        return x
    if isinstance(output, tuple):
        return (x,) + tuple(output[1:])
    output.sample = x
    return output


def _controlnets(pipe: Any) -> list:
    """The ControlNet models of a pipeline (one, or each of a MultiControlNetModel)."""
    root = getattr(pipe, "controlnet", None)
    if not isinstance(root, nn.Module):
        return []
    return [m for m in root.modules() if hasattr(m, "controlnet_cond_embedding")]


def _is_edm(scheduler: Any) -> bool:
    # EDM schedulers (Playground v2.5) parametrise by sigma_data; none of the DDPM-family ones do.
    return scheduler is not None and hasattr(getattr(scheduler, "config", None), "sigma_data")


# ---------------------------------------------------------------------- public API
def apply_hidiffusion(
    pipe_or_unet: Any,
    *,
    raunet: Optional[bool] = None,
    window_attn: Optional[bool] = None,
    apply_raunet: Optional[bool] = None,
    apply_window_attn: Optional[bool] = None,
    config: Optional[HiDiffusionConfig] = None,
    scheduler: Any = None,
    **options: Any,
) -> Any:
    """Apply HiDiffusion to a diffusers pipeline or U-Net in place and return it.

    Args:
        pipe_or_unet: a Stable Diffusion pipeline (anything with a ``unet``) or a
            ``UNet2DConditionModel``.
        raunet, window_attn: turn RAU-Net / MSW-MSA on or off (default: on).
        apply_raunet, apply_window_attn: the published package's names for the same.
        config: a :class:`HiDiffusionConfig` to start from.
        scheduler: for a bare U-Net, the scheduler whose timesteps drive it (a pipeline's
            own scheduler is always used, even if swapped after this call).
        **options: fields of :class:`HiDiffusionConfig` (``t1_ratio=0.5``, ``preset=...``).

    Applying again replaces the earlier options. Every input is checked before the
    model is touched.
    """
    unet, pipe = find_unet(pipe_or_unet)
    layout = detect_layout(unet)
    for name, value in (("apply_raunet", apply_raunet), ("apply_window_attn", apply_window_attn)):
        if value is not None and not isinstance(value, bool):
            raise TypeError(f"{name} must be True or False, got {value!r}")
    if raunet is not None and apply_raunet is not None and raunet != apply_raunet:
        raise ValueError("raunet and apply_raunet disagree; pass only one of them")
    if window_attn is not None and apply_window_attn is not None and window_attn != apply_window_attn:
        raise ValueError("window_attn and apply_window_attn disagree; pass only one of them")
    if config is not None and not isinstance(config, HiDiffusionConfig):
        raise TypeError(f"config must be a hidiff.HiDiffusionConfig, got {type(config).__name__}")
    switches = {
        key: value
        for key, value in (
            ("raunet", raunet if raunet is not None else apply_raunet),
            ("window_attn", window_attn if window_attn is not None else apply_window_attn),
        )
        if value is not None
    }
    cfg = HiDiffusionConfig.from_options(config, **switches, **options)
    cfg.check_ratios(layout.kind)
    remove_hidiffusion(unet)
    patch = Patch(unet, pipe, layout, cfg, scheduler)
    try:
        patch.attach()
    except BaseException:
        patch.detach()
        raise
    _PATCHES[unet] = patch
    return pipe_or_unet


def remove_hidiffusion(pipe_or_unet: Any) -> Any:
    """Undo :func:`apply_hidiffusion` exactly; a no-op on a model that is not patched."""
    unet, _ = find_unet(pipe_or_unet)
    patch = _PATCHES.pop(unet, None)
    if patch is not None:
        patch.detach()
    return pipe_or_unet


def get_patch(pipe_or_unet: Any) -> Optional[Patch]:
    """The live :class:`Patch` of a patched pipeline or U-Net, else None."""
    unet, _ = find_unet(pipe_or_unet)
    return _PATCHES.get(unet)


def is_patched(pipe_or_unet: Any) -> bool:
    return get_patch(pipe_or_unet) is not None


def last_call(pipe_or_unet: Any) -> Optional[CallRecord]:
    """What HiDiffusion did in the latest U-Net call of a patched model (None if none)."""
    patch = get_patch(pipe_or_unet)
    return patch.record if patch is not None else None


@contextlib.contextmanager
def hidiffusion(pipe_or_unet: Any, **options: Any) -> Iterator[Any]:
    """``with hidiffusion(pipe): pipe(...)``: applied inside the block, removed on exit (also on error).

    An earlier patch of the same model is put back on exit.
    """
    previous = get_patch(pipe_or_unet)
    apply_hidiffusion(pipe_or_unet, **options)
    try:
        yield pipe_or_unet
    finally:
        remove_hidiffusion(pipe_or_unet)
        if previous is not None:
            pipe = previous._pipe() if previous._pipe is not None else None
            apply_hidiffusion(
                pipe if pipe is not None else previous.unet, config=previous.config, scheduler=previous._scheduler
            )


__all__ = [
    "apply_hidiffusion",
    "remove_hidiffusion",
    "hidiffusion",
    "get_patch",
    "is_patched",
    "last_call",
    "CallRecord",
    "Patch",
    "UnsupportedModelError",
]
