"""HiDiffusion on a WebUI's ldm-layout U-Net, for one sampling run.

A :class:`SamplingRun` lives exactly as long as one call of the WebUI's sampling function
(txt2img, the hires-fix second pass, img2img: each its own run). It is made from what
the run really samples: the sigmas (or, for the timestep samplers, the timesteps) handed
to the sampling function, and each image's initial noise for the window seeds. While it
is installed it puts, on the live U-Net module,

* a pre/post hook on the U-Net: per call, the noise level the denoiser was called with is
  found in the run's schedule (:func:`hidiff.core.progress.progress_from_sigmas`: every
  sampler and scheduler, img2img strength and second-order steps land on the right step)
  and :func:`hidiff.core.planner.plan_call` gives the call's plan;
* the conv stage's ``Downsample``: while the plan says so, its conv runs with stride 4,
  padding 2, dilation 2 (the conv module's own forward, so the WebUI's LoRA and casting
  run as usual; the geometry is put back right after, also on error);
* a post-hook that avg-pools the pool stage's first block and one that grows the map back
  in the mirrored up stage; every ``Upsample`` lands on the size of the skip it meets;
* the self-attentions of the window stage and its mirror (and the next stage with
  kv_levels 2): the core's windowed attention (:func:`hidiff.core.rules.self_attention`)
  with the module's own projections, where the plan makes them act; elsewhere the WebUI's
  own attention (its optimisations included) runs untouched.

:meth:`SamplingRun.remove` takes every hook and every instance attribute off again; the
sampling wrapper calls it in a ``finally``, so an interrupt or an error leaves the model as
it was. Nothing is set on a class and nothing outlives the run.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

from ..core import ops, rules
from ..core.compose import check_planned_size
from ..core.config import HiDiffusionConfig
from ..core.planner import Plan, Progress, Task, plan_call
from ..core.progress import progress_from_sigmas
from .options import WHERE
from .structure import LdmNetwork

Size = tuple[int, int]


@dataclass
class CallState:
    plan: Plan
    seeds: list[int]
    record: rules.CallRecord


class SamplingRun:
    """HiDiffusion for one sampling run on one U-Net module (see the module docstring)."""

    def __init__(
        self,
        unet: torch.nn.Module,
        network: LdmNetwork,
        config: HiDiffusionConfig,
        schedule: Sequence[float],
        image_seeds: Sequence[int],
        timesteps: bool = False,
        recorder: Optional[Callable[[rules.CallRecord], None]] = None,
        warn: Callable[[str], None] = warnings.warn,
        controlnet: Optional[bool] = None,
        img2img: bool = False,
    ) -> None:
        self.unet = unet
        # Whether a ControlNet guides this run (the published schedule has its own SDXL text-to-image
        # ControlNet preset): None reads it per call from the U-Net's ``control`` argument (Forge,
        # reForge); AUTOMATIC1111's sd-webui-controlnet adds its residuals itself, so its host says so.
        self.controlnet = controlnet
        self.img2img = img2img
        self.network = network
        self.arch = network.architecture
        self.config = config
        values = [float(v) for v in schedule]
        # The timestep samplers list their timesteps rising; sampling walks them downwards.
        self.levels = sorted(values, reverse=True) if timesteps else values
        self.timesteps = timesteps
        self.image_seeds = list(image_seeds)
        self.recorder = recorder
        self.warn = warn
        self.level: Optional[float] = None  # the noise level of the denoiser call in progress
        self.call: Optional[CallState] = None
        self.maps: dict[int, Size] = {}  # id(transformer) -> (H, W) of the map it runs on, this call
        self._handles: list[Any] = []
        self._overridden: list[tuple[torch.nn.Module, Optional[Callable[..., Any]]]] = []
        self._token_warned: set[int] = set()
        self._last = -1
        self._warned = False

    # ------------------------------------------------------------ install / remove
    def install(self) -> None:
        unet, net = self.unet, self.network
        inputs, outputs = unet.input_blocks, unet.output_blocks
        try:
            self._handles.append(unet.register_forward_pre_hook(self._start, with_kwargs=True))
            self._handles.append(unet.register_forward_hook(self._end))
            for block, stage in net.downsample_blocks:  # the size each downsampler meets (recorded)
                self._handles.append(inputs[block][0].register_forward_pre_hook(self._skip_size(stage)))
            if self.config.raunet:
                self._override(inputs[net.conv_block][0], self._downsample)
                # On the block's last layer: ComfyUI-derived U-Nets (reForge) run a block's layers
                # one by one, so a hook on the block itself would never fire there.
                self._handles.append(inputs[net.pool_block][-1].register_forward_hook(self._pool))
                self._handles.append(outputs[net.unpool_block][-1].register_forward_hook(self._unpool))
                for block, stage in net.upsample_blocks:
                    self._override(outputs[block][-1], self._upsample(stage))
            if self.config.window_attn or self.config.kv_downsample > 1:
                for ordinal, (kind, block, index, stage) in enumerate(net.attentions):
                    container = (inputs if kind == "input" else outputs)[block]
                    transformer = _transformer_at(container, index)
                    tb = _transformer_block(container, index)
                    if transformer is None or tb is None:
                        continue
                    self._handles.append(transformer.register_forward_pre_hook(self._map_size))
                    self._override(tb.attn1, self._attention(ordinal, stage, id(transformer)))
        except BaseException:
            self.remove()
            raise

    def remove(self) -> None:
        """Every hook and instance attribute off the model (idempotent)."""
        while self._handles:
            self._handles.pop().remove()
        while self._overridden:
            module, previous = self._overridden.pop()
            if previous is None:
                module.__dict__.pop("forward", None)
            else:  # another extension's wrapper (A1111's HyperTile keeps one on every attention): put it back
                module.forward = previous
        self.call = None
        self.maps.clear()

    def _override(
        self, module: torch.nn.Module, make: Callable[[torch.nn.Module, Callable[..., Any]], Callable[..., Any]]
    ) -> None:
        """Replace ``module.forward`` for this run; ``make(module, own)`` gets what the layer ran before.

        ``own`` is the forward the layer had: another extension's instance-level wrapper where
        there is one (A1111's HyperTile wraps every attention and leaves its wrappers on the
        model), else the class's. Calls HiDiffusion does not change go through it, so that
        extension still acts there; :meth:`remove` puts it back.
        """
        previous = module.__dict__.get("forward")
        if getattr(previous, "__hidiff_run__", False):
            raise RuntimeError(
                f"HiDiffusion: {type(module).__name__}.forward is already replaced by another HiDiffusion run that "
                "was not removed; reload the model (Settings > Actions > Unload / reload the checkpoint)"
            )
        own = previous if previous is not None else functools.partial(type(module).forward, module)
        forward = make(module, own)
        forward.__hidiff_run__ = True  # type: ignore[attr-defined]
        module.forward = forward  # type: ignore[method-assign]
        self._overridden.append((module, previous))

    # ------------------------------------------------------------ the denoiser and the U-Net call
    def denoiser(self, model: Any) -> Any:
        """``model`` (the WebUI's CFG denoiser) with each call's noise level noted for the U-Net hooks."""
        return _NotingDenoiser(model, self)

    def progress(self) -> Progress:
        steps = len(self.levels) if self.timesteps else len(self.levels) - 1
        if self.level is None or steps < 1:
            return rules.off_schedule_progress(0.0, self.levels, max(1, steps))
        if self.timesteps:
            found = rules.schedule_progress(self.level, self.levels, self._last)
        else:
            found = progress_from_sigmas(self.level, self.levels, self._last)
        if found is None:
            if not self._warned:
                self._warned = True
                self.warn(
                    f"HiDiffusion: a U-Net call at noise level {self.level:g} is not in the sampled schedule; it is "
                    "planned at the step whose interval of levels holds it (hidiff's rule for calls off the sampled "
                    "schedule, docs/how-it-works.md)."
                )
            return rules.off_schedule_progress(self.level, self.levels, steps)
        self._last = found.index
        return found

    def _start(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> Optional[tuple[tuple, dict]]:
        x = args[0] if args else kwargs.get("x")
        self.maps.clear()
        if not isinstance(x, torch.Tensor):
            self.call = None
            return None
        latent = (int(x.shape[-2]), int(x.shape[-1]))
        control = kwargs.get("control")
        guided = self.controlnet if self.controlnet is not None else isinstance(control, dict)
        task = Task(inpainting=self.arch.inpainting, text2img_controlnet=guided and not self.img2img)
        plan = plan_call(self.arch, latent, self.config, self.progress(), task)
        if not plan.active:
            self.call = None
            return None
        rows = int(x.shape[0])
        self.call = CallState(
            plan, rules.row_seeds(self.config, rows, self.image_seeds), rules.CallRecord.of(plan, rows)
        )
        if isinstance(control, dict):  # Forge / reForge: ControlNet residuals made at the stock sizes
            return args, {**kwargs, "control": self._fit_control(control, self.call)}
        return None

    def _fit_control(self, control: dict, call: CallState) -> dict:
        """ControlNet residuals resized to this call's features (Forge's and reForge's U-Nets pop
        them from the end: ``output`` entry i meets input block i's skip, ``input`` entry j the
        output of input block len-1-j, after RAU-Net pooled it, ``middle`` the mid block)."""
        skips = call.plan.skip_sizes
        fitted = dict(control)

        def fit(entries: list, size_of: Callable[[int], Optional[Size]]) -> list:
            out = []
            for i, residual in enumerate(entries):
                size = size_of(i)
                if isinstance(residual, torch.Tensor) and residual.ndim == 4 and size is not None:
                    residual = ops.resize_to(residual, size)
                out.append(residual)
            return out

        if control.get("output") is not None:
            fitted["output"] = fit(list(control["output"]), lambda i: skips[i] if i < len(skips) else None)
        if control.get("middle") is not None:
            fitted["middle"] = fit(list(control["middle"]), lambda i: call.plan.mid_size)
        if control.get("input") is not None:
            count = len(control["input"])
            fitted["input"] = fit(
                list(control["input"]), lambda j: skips[count - 1 - j] if count - 1 - j < len(skips) else None
            )
        for kind in ("input", "middle", "output"):
            if fitted.get(kind) is not None:
                call.record.residual_sizes[kind] = [
                    _hw(r) if isinstance(r, torch.Tensor) and r.ndim == 4 else None for r in fitted[kind]
                ]
        return fitted

    def _end(self, module: torch.nn.Module, args: tuple, output: Any) -> None:
        call, self.call = self.call, None
        if call is not None and self.recorder is not None:
            self.recorder(call.record)

    # ------------------------------------------------------------ RAU-Net
    def _skip_size(self, stage: int) -> Callable[[torch.nn.Module, tuple], None]:
        def record(module: torch.nn.Module, args: tuple) -> None:
            call = self.call
            if call is not None and args and isinstance(args[0], torch.Tensor):
                size = call.record.skip_sizes[stage] = _hw(args[0])
                planned = call.plan.downsample_inputs[stage] if stage < len(call.plan.downsample_inputs) else None
                check_planned_size(self.config, stage, size, planned, where=WHERE)

        return record

    def _downsample(self, module: torch.nn.Module, own: Callable[..., Any]) -> Callable[..., Any]:
        def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            call = self.call
            conv = getattr(module, "op", None)
            if call is None or not call.plan.conv or not isinstance(conv, torch.nn.Conv2d):
                return own(x, *args, **kwargs)
            saved = conv.stride, conv.padding, conv.dilation
            g = ops.RAU_CONV_GEOMETRY
            conv.stride, conv.padding, conv.dilation = g["stride"], g["padding"], g["dilation"]
            try:
                out = conv(x)
            finally:
                conv.stride, conv.padding, conv.dilation = saved
            call.record.strided((int(out.shape[-2]), int(out.shape[-1])))
            return out

        return forward

    def _pool(self, module: torch.nn.Module, args: tuple, output: Any) -> Any:
        call = self.call
        if call is None or not call.plan.pool or not isinstance(output, torch.Tensor):
            return None
        pooled = ops.rau_pool(output)
        call.record.pooled_map(_hw(output), _hw(pooled))
        return pooled

    def _unpool(self, module: torch.nn.Module, args: tuple, output: Any) -> Any:
        call = self.call
        if (
            call is None
            or not call.plan.pool
            or call.record.pooled_from is None
            or not isinstance(output, torch.Tensor)
        ):
            return None
        call.record.unpooled = (_hw(output), call.record.pooled_from)
        return ops.rau_unpool(output, call.record.pooled_from)

    def _upsample(self, stage: int) -> Callable[[torch.nn.Module, Callable[..., Any]], Callable[..., Any]]:
        def make(module: torch.nn.Module, own: Callable[..., Any]) -> Callable[..., Any]:
            def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
                call = self.call
                if call is None:
                    return own(x, *args, **kwargs)
                # Land on the skip this upsampler meets (nearest, then the layer's conv), as
                # diffusers and ComfyUI do; ldm's own Upsample doubles and A1111 resizes at the
                # concatenation, which differs on odd sides.
                size = call.plan.downsample_inputs[stage]
                out = F.interpolate(x, size=size, mode="nearest")
                conv = getattr(module, "conv", None)
                return conv(out) if getattr(module, "use_conv", conv is not None) and conv is not None else out

            return forward

        return make

    # ------------------------------------------------------------ MSW-MSA and key/value downsampling
    def _map_size(self, module: torch.nn.Module, args: tuple) -> None:
        x = args[0] if args else None
        if isinstance(x, torch.Tensor) and x.ndim == 4:
            self.maps[id(module)] = _hw(x)

    def _attention(
        self, ordinal: int, stage: int, transformer: int
    ) -> Callable[[torch.nn.Module, Callable[..., Any]], Callable[..., Any]]:
        def make(module: torch.nn.Module, own: Callable[..., Any]) -> Callable[..., Any]:
            def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
                call = self.call
                hw = self.maps.get(transformer)
                context = kwargs.get("context") if not args else args[0]
                if call is None or hw is None or context is not None or kwargs.get("value") is not None:
                    return own(x, *args, **kwargs)
                rule = rules.layer_rule(call.plan, self.arch, stage)
                if not rule.acts or min(hw) < 2:
                    return own(x, *args, **kwargs)
                if hw[0] * hw[1] != x.shape[1]:
                    self._tokens_not_the_map(ordinal, int(x.shape[1]), hw)
                    return own(x, *args, **kwargs)
                shift = None
                if rule.windowed:
                    shift = rules.window_shifts(self.config, call.seeds, call.plan.step, ordinal, hw)
                q, k, v = module.to_q(x), module.to_k(x), module.to_v(x)
                out = rules.self_attention(
                    q, k, v, hw, rule, _heads_attention(int(module.heads)), shift, record=call.record, layer=ordinal
                )
                return module.to_out(out)

            return forward

        return make

    def _tokens_not_the_map(self, ordinal: int, tokens: int, hw: Size) -> None:
        """Another patch merged or tiled the tokens before this self-attention (token merging,
        tiled attention run at the block level): windows need the whole map, so this layer
        runs as it was; said once per layer and run."""
        if ordinal in self._token_warned:
            return
        self._token_warned.add(ordinal)
        self.warn(
            f"HiDiffusion: self-attention layer {ordinal} received {tokens} tokens, not its {hw[0]}x{hw[1]} feature "
            "map: another extension or setting merges or tiles tokens before it (token merging / ToMe, a tiled "
            "attention). HiDiffusion's windowed attention is skipped on that layer (RAU-Net still runs); turn that "
            "option off to get the windows."
        )


class _NotingDenoiser:
    """The WebUI's denoiser, noting each call's sigma (or timestep) for the U-Net hooks."""

    def __init__(self, model: Any, run: SamplingRun) -> None:
        self._model = model
        self._run = run

    def __call__(self, x: Any, level: Any, *args: Any, **kwargs: Any) -> Any:
        self._run.level = float(torch.as_tensor(level).reshape(-1).max())
        return self._model(x, level, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)


def _heads_attention(heads: int) -> rules.Attention:
    def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        b, lq, c = q.shape
        d = c // heads
        qh, kh, vh = (t.reshape(t.shape[0], t.shape[1], heads, d).transpose(1, 2) for t in (q, k, v))
        mask = bias.unsqueeze(1).to(q.dtype) if bias is not None else None
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask)
        return out.transpose(1, 2).reshape(b, lq, c)

    return attention


def _hw(x: torch.Tensor) -> Size:
    return int(x.shape[-2]), int(x.shape[-1])


def _transformer_at(block: Any, index: int) -> Optional[torch.nn.Module]:
    for layer in block:
        if type(layer).__name__ == "SpatialTransformer":
            return layer if index < len(layer.transformer_blocks) else None
    return None


def _transformer_block(block: Any, index: int) -> Optional[torch.nn.Module]:
    transformer = _transformer_at(block, index)
    return None if transformer is None else transformer.transformer_blocks[index]
