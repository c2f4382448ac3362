"""HiDiffusion on a ComfyUI ``ModelPatcher``: patches as data on a clone.

:func:`apply_hidiffusion` returns a clone of the given ``ModelPatcher`` carrying:

* a ``SAMPLER_SAMPLE`` wrapper: once per sampling run, it hashes each image's initial
  noise into that image's window seed and hands it down in the run's
  ``transformer_options`` (a copy made for the run);
* a ``DIFFUSION_MODEL`` wrapper: once per U-Net call, it finds the step from the sigma of
  the call in ``transformer_options["sample_sigmas"]`` (the sigmas ComfyUI actually
  samples: KSampler, KSamplerAdvanced start/end, denoise < 1 and custom sigmas all land on
  the right step), asks :func:`hidiff.core.planner.plan_call` what to do, resizes ControlNet
  / T2I-Adapter residuals to the plan's feature sizes, and passes a per-call
  :class:`CallState` down in a copy of ``transformer_options``;
* a ``forward_timestep_embed_patch`` for ``Downsample``: in the conv stage's block, while
  the plan says so, the downsampler's conv runs with stride 4 / padding 2 / dilation 2
  (:func:`strided_conv`: the model's own weights, taken through ComfyUI's cast path where
  its op would cast, so LoRA weight functions, low-VRAM offload and dynamic VRAM apply; the
  module is never changed or copied);
* an ``input_block_patch`` (avg-pool the pool stage's first block output) and an
  ``output_block_patch`` (grow the map back to its skip connection's size);
* ``attn1`` replacements on every self-attention of the top stage and its mirror: shifted
  2x2 windows (:func:`hidiff.core.ops.window_partition`) around ComfyUI's own attention
  function (with ``kv_downsample``, keys/values shrunk inside each window); with
  ``kv_levels`` 2 also on the next stage's, which shrink keys/values over the whole map.

ComfyUI hands every upsampler the size of the skip it meets (``output_shape``), so the up
path lands on the right sizes by itself. Nothing global is changed: the original
``ModelPatcher`` keeps its options, and dropping the clone drops every patch.
"""

from __future__ import annotations

import dataclasses
import math
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from ..core import ops
from ..core.architecture import UnsupportedModelError
from ..core.config import HiDiffusionConfig
from ..core.planner import Plan, Progress, Task, plan_call
from ..core.progress import progress_from_sigmas
from .structure import ComfyNetwork, describe

#: Keys under which a patch's run and call state travel in ``transformer_options``.
_RUN_KEY = "hidiff_run"
_CALL_KEY = "hidiff_call"
#: Key of this pack's wrappers in ComfyUI's wrapper registry (one HiDiffusion per model).
WRAPPER_KEY = "hidiff.hidiffusion"


class ComfyVersionError(RuntimeError):
    """The running ComfyUI lacks an API the node needs."""


@dataclass
class CallRecord:
    """What HiDiffusion did in one U-Net call (handed to a ``recorder``; for tests and debugging)."""

    plan: Plan
    batch: int
    block_sizes: dict = field(default_factory=dict)  # input block id -> (H, W) of its output (after pooling)
    conv_out: Optional[tuple[int, int]] = None  # size after the strided conv
    pooled: Optional[tuple[tuple[int, int], tuple[int, int]]] = None  # (from, to)
    unpooled: Optional[tuple[tuple[int, int], tuple[int, int]]] = None
    windows: list = field(default_factory=list)  # (layer ordinal, (H, W), shifts per row)
    control_sizes: dict = field(default_factory=dict)  # kind -> [sizes after resizing]
    kv: list = field(default_factory=list)  # (layer ordinal, (H, W) shrunk, factor) of key/value downsampling


@dataclass
class CallState:
    plan: Plan
    seeds: list  # window seed of each row of the batch
    record: Optional[CallRecord]


class HiDiffusionPatch:
    """The options and the network of one patched model; its methods are the patches."""

    def __init__(self, network: ComfyNetwork, config: HiDiffusionConfig, recorder: Optional[Callable] = None):
        self.network = network
        self.config = config
        self.recorder = recorder
        self.layer_of = {key: n for n, key in enumerate(network.blocks.windowed)}
        # kv_levels 2: the next stage's self-attentions, numbered on after the windowed ones
        count = len(network.blocks.windowed)
        self.deep_of = {key: count + n for n, key in enumerate(getattr(network.blocks, "kv_deep", ()))}
        self.previous_attn1: dict = {}
        # ComfyUI deep-copies model_options (where the block patches live) on every clone but
        # not the wrappers: per-run and per-call state is found by this key, not by identity.
        self.key = uuid.uuid4().hex

    def __deepcopy__(self, memo: dict) -> HiDiffusionPatch:
        # Options and network only, no state: a clone of the model shares this object.
        return self

    # ------------------------------------------------------------ per run
    def sampler_sample(self, executor: Any, *args: Any, **kwargs: Any) -> Any:
        """Wraps ``KSAMPLER.sample(guider, sigmas, extra_args, callback, noise, ...)``."""
        args, kwargs = list(args), dict(kwargs)
        extra_args, where = _argument(args, kwargs, 2, "extra_args")
        noise, _ = _argument(args, kwargs, 4, "noise")
        if isinstance(extra_args, dict):
            model_options = dict(extra_args.get("model_options", {}))
            transformer_options = dict(model_options.get("transformer_options", {}))
            transformer_options[_RUN_KEY] = {**transformer_options.get(_RUN_KEY, {}), self.key: _noise_seeds(noise)}
            model_options["transformer_options"] = transformer_options
            _put(args, kwargs, where, {**extra_args, "model_options": model_options})
        return executor(*args, **kwargs)

    # ------------------------------------------------------------ per call
    def plan(self, x: torch.Tensor, transformer_options: dict, control: Any) -> Plan:
        latent = (int(x.shape[-2]), int(x.shape[-1]))
        arch = self.network.architecture
        progress = _progress(transformer_options)
        task = Task(inpainting=arch.inpainting, edm=self.network.edm, text2img_controlnet=control is not None)
        return plan_call(arch, latent, self.config, progress, task)

    def diffusion_model(self, executor: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        """Wraps ``UNetModel._forward(x, timesteps, context, y, control, transformer_options, ...)``."""
        args, kwargs = list(args), dict(kwargs)
        control, control_at = _argument(args, kwargs, 3, "control")
        transformer_options, options_at = _argument(args, kwargs, 4, "transformer_options")
        transformer_options = transformer_options if isinstance(transformer_options, dict) else {}
        plan = self.plan(x, transformer_options, control)
        if not plan.active:
            return executor(x, *args, **kwargs)
        record = CallRecord(plan=plan, batch=int(x.shape[0])) if self.recorder is not None else None
        state = CallState(plan=plan, seeds=self._row_seeds(x, transformer_options), record=record)
        if isinstance(control, dict):
            _put(args, kwargs, control_at, self._fit_control(control, plan, record))
        calls = {**transformer_options.get(_CALL_KEY, {}), self.key: state}
        _put(args, kwargs, options_at, {**transformer_options, _CALL_KEY: calls})
        out = executor(x, *args, **kwargs)
        if record is not None:
            self.recorder(record)
        return out

    def _row_seeds(self, x: torch.Tensor, transformer_options: dict) -> list:
        """The window seed of each row: rows are chunks of the latent batch (one per cond)."""
        rows = int(x.shape[0])
        if self.config.window_seed is not None:
            return [int(self.config.window_seed)] * rows
        run = transformer_options.get(_RUN_KEY, {}).get(self.key)
        if run:
            return [run[r % len(run)] for r in range(rows)]
        # No run wrapper saw the noise (a U-Net call outside a sampler): seed from the input.
        chunks = max(1, len(transformer_options.get("cond_or_uncond", ()) or ()) or 1)
        images = rows // chunks if rows % chunks == 0 else rows
        seeds = ops.image_seeds(x[:images])
        return [seeds[r % images] for r in range(rows)]

    def _state(self, transformer_options: dict) -> Optional[CallState]:
        return (transformer_options.get(_CALL_KEY) or {}).get(self.key)

    def _fit_control(self, control: dict, plan: Plan, record: Optional[CallRecord]) -> dict:
        """ControlNet / T2I-Adapter residuals (made at full size) resized to the plan's features.

        ComfyUI pops them from the end: ``output`` entry i is added to the skip of input block
        i, ``input`` entry j to the output of input block len-1-j, ``middle`` to the mid block.
        """
        skips, blocks = plan.skip_sizes, self.network.blocks
        fitted = dict(control)
        if control.get("output") is not None:
            fitted["output"] = [_fit(r, skips[i]) if i < len(skips) else r for i, r in enumerate(control["output"])]
        if control.get("middle") is not None:
            fitted["middle"] = [_fit(r, plan.mid_size) for r in control["middle"]]
        if control.get("input") is not None:
            entries = list(control["input"])
            out = []
            for j, r in enumerate(entries):
                block = len(entries) - 1 - j
                size = (
                    skips[block - 1]
                    if block == blocks.pool_block and plan.pool
                    else (skips[block] if block < len(skips) else None)
                )
                out.append(_fit(r, size) if size is not None else r)
            fitted["input"] = out
        if record is not None:
            for kind in ("input", "middle", "output"):
                if fitted.get(kind) is not None:
                    record.control_sizes[kind] = [None if r is None else tuple(r.shape[-2:]) for r in fitted[kind]]
        return fitted

    # ------------------------------------------------------------ RAU-Net
    def downsample(
        self, layer: Any, x: torch.Tensor, emb: Any, context: Any, transformer_options: dict, *rest: Any
    ) -> torch.Tensor:
        state = self._state(transformer_options)
        if (
            state is None
            or not state.plan.conv
            or tuple(transformer_options.get("block", ())) != ("input", self.network.blocks.conv_block)
        ):
            return layer(x)
        out = strided_conv(layer.op, x)
        if state.record is not None:
            state.record.conv_out = (int(out.shape[-2]), int(out.shape[-1]))
        return out

    def input_block(self, h: torch.Tensor, transformer_options: dict) -> torch.Tensor:
        state = self._state(transformer_options)
        if state is None:
            return h
        block = transformer_options.get("block", ("", -1))[1]
        if state.plan.pool and block == self.network.blocks.pool_block:
            pooled = ops.rau_pool(h)
            if state.record is not None:
                state.record.pooled = (tuple(h.shape[-2:]), tuple(pooled.shape[-2:]))
            h = pooled
        if state.record is not None:
            state.record.block_sizes[block] = (int(h.shape[-2]), int(h.shape[-1]))
        return h

    def output_block(self, h: torch.Tensor, hsp: torch.Tensor, transformer_options: dict) -> tuple:
        state = self._state(transformer_options)
        if state is None or not state.plan.pool:
            return h, hsp
        if transformer_options.get("block", ("", -1))[1] != self.network.blocks.unpool_block:
            return h, hsp
        size = (int(hsp.shape[-2]), int(hsp.shape[-1]))
        grown = ops.rau_unpool(h, size)
        if state.record is not None:
            state.record.unpooled = (tuple(h.shape[-2:]), size)
        return grown, hsp

    # ------------------------------------------------------------ MSW-MSA
    def attn1(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict) -> torch.Tensor:
        block = extra_options.get("block") or ("", -1)
        key = (block[0], block[1], extra_options.get("block_index", 0))
        previous = self.previous_attn1.get(key) or self.previous_attn1.get((block[0], block[1]))
        state = self._state(extra_options)
        layer = self.layer_of.get(key)
        heads = extra_options["n_heads"]
        hw = _map_size(q.shape[1], extra_options)
        deep = self.deep_of.get(key) if layer is None else None
        if deep is not None and state is not None and hw is not None and min(hw) >= 2:
            # kv_levels 2: the level below the windows shrinks its keys/values over its whole map
            factor = int(getattr(state.plan, "kv", 1) or 1)
            below = self.network.architecture.window_stage + 1
            if factor > 1 and below in getattr(state.plan, "kv_stages", ()):
                k, v = (ops.kv_downsample(t, hw[0], hw[1], factor).tokens for t in (k, v))
                if state.record is not None:
                    state.record.kv.append((deep, hw, factor))
            return _attention(q, k, v, heads, None, extra_options, previous)
        if state is None or layer is None or hw is None or min(hw) < 2:
            return _attention(q, k, v, heads, None, extra_options, previous)
        factor = int(getattr(state.plan, "kv", 1) or 1)
        if not state.plan.windows:
            if factor <= 1:
                return _attention(q, k, v, heads, None, extra_options, previous)
            # ToDo-style: keys and values from the map shrunk by `factor` per side (k and v are
            # per-token linear maps of the tokens, so shrinking them equals shrinking the tokens).
            k, v = (ops.kv_downsample(t, hw[0], hw[1], factor).tokens for t in (k, v))
            if state.record is not None:
                state.record.kv.append((layer, hw, factor))
            return _attention(q, k, v, heads, None, extra_options, previous)
        shifts = [self._shift(seed, state.plan.step, layer, hw) for seed in state.seeds]
        wq, wk, wv = (ops.window_partition(t, hw[0], hw[1], shifts) for t in (q, k, v))
        keys, values, bias = wk.tokens, wv.tokens, wq.key_bias
        if factor > 1:
            # Each (padded) window shrinks on its own; padding never enters a key.
            side = ops.window_sides(hw[0], hw[1])
            valid = bias[:, 0, :] == 0 if bias is not None else None
            small_k = ops.kv_downsample(keys, side[0], side[1], factor, valid=valid)
            small_v = ops.kv_downsample(values, side[0], side[1], factor, valid=valid)
            keys, values = small_k.tokens, small_v.tokens
            bias = ops.key_bias(small_k.valid, q.dtype) if small_k.valid is not None else None
            if state.record is not None:
                state.record.kv.append((layer, side, factor))
        out = _attention(wq.tokens, keys, values, heads, bias, extra_options, previous)
        if state.record is not None:
            state.record.windows.append((layer, hw, shifts))
        return ops.window_merge(out, wq)

    def _shift(self, seed: int, step: int, layer: int, hw: tuple[int, int]) -> tuple[int, int]:
        mode = self.config.window_shift
        if mode == "none":
            return (0, 0)
        if mode == "reference":
            return ops.shift_from_uniform(float(torch.rand(1)), hw[0], hw[1])
        return ops.shift_for(seed, step, layer, hw[0], hw[1])


# ---------------------------------------------------------------- helpers
def _argument(args: list, kwargs: dict, index: int, name: str) -> tuple[Any, Any]:
    """(value, where) of a wrapped call's argument, passed by position or by name."""
    if len(args) > index:
        return args[index], index
    return kwargs.get(name), name


def _put(args: list, kwargs: dict, where: Any, value: Any) -> None:
    if isinstance(where, int):
        args[where] = value
    else:
        kwargs[where] = value


def _progress(transformer_options: dict) -> Progress:
    sigmas = transformer_options.get("sigmas")
    schedule = transformer_options.get("sample_sigmas")
    if schedule is None:
        raise ComfyVersionError(
            "HiDiffusion: this ComfyUI does not pass transformer_options['sample_sigmas'] to the model, so the "
            "denoising step cannot be read from the schedule. Update ComfyUI (0.3.x from 2025 has it)."
        )
    if sigmas is None:
        raise ComfyVersionError("HiDiffusion: no current sigma in transformer_options['sigmas'].")
    sigma = float(torch.as_tensor(sigmas).reshape(-1).max())
    levels = [float(s) for s in torch.as_tensor(schedule).reshape(-1).tolist()]
    progress = progress_from_sigmas(sigma, levels)
    if progress is None:
        # A call outside the sampled schedule (e.g. a model call made by another node): treat
        # it as the last step, where HiDiffusion changes nothing but windows.
        steps = max(1, len(levels) - 1)
        return Progress(steps - 1, steps)
    return progress


def _noise_seeds(noise: Any) -> Optional[list]:
    if not isinstance(noise, torch.Tensor) or noise.ndim < 1 or noise.shape[0] == 0:
        return None
    return ops.image_seeds(noise)


def _fit(residual: Any, size: tuple[int, int]) -> Any:
    if not isinstance(residual, torch.Tensor) or residual.ndim != 4:
        return residual
    return ops.resize_to(residual, tuple(size))


def strided_conv(conv: Any, x: torch.Tensor) -> torch.Tensor:
    """The downsampler's 3x3 stride-2 ``conv`` applied to ``x`` with RAU-Net's geometry (stride 4,
    padding 2, dilation 2), its weight and bias taken the way the module's own forward takes them.

    Where ComfyUI's op would cast (``comfy_cast_weights``: low-VRAM / partially loaded / dynamic-VRAM
    modules; or weight functions: LoRA patches kept off the weights), the weight and bias come from
    ``comfy.ops.cast_bias_weight`` on the model's own module, so the device move, dtype cast, LoRA
    functions and offload streams are ComfyUI's, and ``uncast_bias_weight`` releases them after use;
    otherwise the module's parameters are used as they are. The module is neither changed nor copied
    (ComfyUI keeps per-module bookkeeping on it that a copy would fork).
    """
    if not isinstance(conv, torch.nn.Conv2d):
        raise UnsupportedModelError(
            f"HiDiffusion: the conv stage's downsampler is a {type(conv).__name__}, not a Conv2d; RAU-Net's "
            "strided conv cannot run on it. Turn raunet off for this model."
        )
    g = ops.RAU_CONV_GEOMETRY

    def run(weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        return torch.nn.functional.conv2d(x, weight, bias, g["stride"], g["padding"], g["dilation"], conv.groups)

    casts = bool(getattr(conv, "comfy_cast_weights", False)) or bool(getattr(conv, "weight_function", ()))
    if not (casts or getattr(conv, "bias_function", ())):
        return run(conv.weight, conv.bias)
    import comfy.ops

    every_op = getattr(comfy.ops, "run_every_op", None)
    if every_op is not None:
        every_op()  # what ComfyUI's ops do first (an interrupt check)
    uncast = getattr(comfy.ops, "uncast_bias_weight", None)
    if uncast is None or "offloadable" not in _parameters(comfy.ops.cast_bias_weight):
        weight, bias = comfy.ops.cast_bias_weight(conv, x)  # ComfyUI before offload streams
        return run(weight, bias)
    weight, bias, offload = comfy.ops.cast_bias_weight(conv, x, offloadable=True)
    try:
        return run(weight, bias)
    finally:
        uncast(conv, weight, bias, offload)


def _map_size(tokens: int, extra_options: dict) -> Optional[tuple[int, int]]:
    """H x W of the token map a self-attention runs on."""
    shape = extra_options.get("activations_shape")
    if shape is not None and len(shape) == 4 and int(shape[2]) * int(shape[3]) == tokens:
        return int(shape[2]), int(shape[3])
    original = extra_options.get("original_shape")
    if original is None or len(original) != 4:
        return None
    # Every map in the network is the latent with its sides halved (rounded up) k times.
    h, w = int(original[2]), int(original[3])
    for _ in range(8):
        if h * w == tokens:
            return h, w
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    return None


def _attention(q, k, v, heads, key_bias, extra_options, previous):
    if previous is not None:
        if key_bias is not None:
            raise ValueError(
                "HiDiffusion: windowed attention on an odd-sized map needs an attention mask, which the other "
                "self-attention patch on this block cannot take. Use a width and height whose top-resolution "
                "latent sides are even, or turn window_attn off."
            )
        return previous(q, k, v, extra_options)
    from comfy.ldm.modules import attention

    kwargs = {"attn_precision": extra_options.get("attn_precision")}
    if "transformer_options" in _parameters(attention.optimized_attention):
        kwargs["transformer_options"] = extra_options
    if key_bias is None:
        return attention.optimized_attention(q, k, v, heads, **kwargs)
    return attention.optimized_attention_masked(q, k, v, heads, key_bias, **kwargs)


def _parameters(fn: Any) -> set:
    import inspect

    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return set()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return set(params) | {"transformer_options"}
    return set(params)


def check_comfy_api(model_patcher: Any) -> None:
    """Refuse, with what is missing, on a ComfyUI without the patch APIs this node needs."""
    needed = [
        "clone",
        "add_wrapper_with_key",
        "set_model_forward_timestep_embed_patch",
        "set_model_input_block_patch",
        "set_model_output_block_patch",
        "set_model_attn1_replace",
    ]
    missing = [name for name in needed if not hasattr(model_patcher, name)]
    try:
        from comfy import patcher_extension  # noqa: F401
        from comfy.ldm.modules.diffusionmodules.openaimodel import Downsample  # noqa: F401
    except ImportError as e:  # pragma: no cover - depends on the ComfyUI install
        missing.append(f"comfy module ({e})")
    if missing:
        raise ComfyVersionError(
            "HiDiffusion needs ComfyUI's model patch and wrapper APIs (ComfyUI 0.3.x from December 2024 or newer); "
            f"this ComfyUI lacks: {', '.join(missing)}. Update ComfyUI to use the HiDiffusion node."
        )


def apply_hidiffusion(
    model_patcher: Any,
    config: Optional[HiDiffusionConfig] = None,
    recorder: Optional[Callable[[CallRecord], None]] = None,
    native: Optional[tuple[int, int]] = None,
    **options: Any,
) -> Any:
    """A clone of ``model_patcher`` with HiDiffusion on it (the original is not changed).

    ``options`` are fields of :class:`HiDiffusionConfig`; ``recorder`` (optional) receives
    a :class:`CallRecord` after every U-Net call HiDiffusion acts on; ``native`` overrides
    the native latent (height, width) of the family (for a fine-tune trained at another size).
    """
    cfg = HiDiffusionConfig.from_options(config, **options)
    check_comfy_api(model_patcher)
    network = describe(model_patcher)
    if native is not None:
        arch = dataclasses.replace(network.architecture, native=(int(native[0]), int(native[1])))
        network = dataclasses.replace(network, architecture=arch)
    cfg.check_ratios(network.architecture.kind)
    network.architecture.kv_stages(cfg.kv_levels)  # refuses a kv level the network lacks
    if cfg.controlnet == "native":
        raise ValueError(
            "HiDiffusion in ComfyUI resizes ControlNet residuals to the U-Net's features (controlnet='resize'); "
            "ComfyUI runs its ControlNets itself, so the 'native' mode is not available here."
        )
    from comfy import patcher_extension
    from comfy.ldm.modules.diffusionmodules.openaimodel import Downsample

    wrappers = patcher_extension.WrappersMP
    for kind in (wrappers.SAMPLER_SAMPLE, wrappers.DIFFUSION_MODEL):
        existing = getattr(model_patcher, "wrappers", {}).get(kind, {}).get(WRAPPER_KEY)
        if existing:
            raise ValueError(
                "HiDiffusion is already applied to this model: chain one HiDiffusion node per model "
                "(change the options on the first one instead)."
            )

    patch = HiDiffusionPatch(network, cfg, recorder)
    clone = model_patcher.clone()
    replaces = clone.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn1", {})
    patch.previous_attn1 = {key: fn for key, fn in replaces.items()}
    clone.add_wrapper_with_key(wrappers.SAMPLER_SAMPLE, WRAPPER_KEY, patch.sampler_sample)
    clone.add_wrapper_with_key(wrappers.DIFFUSION_MODEL, WRAPPER_KEY, patch.diffusion_model)
    if cfg.raunet:
        clone.set_model_forward_timestep_embed_patch((Downsample, patch.downsample))
        clone.set_model_input_block_patch(patch.input_block)
        clone.set_model_output_block_patch(patch.output_block)
    elif recorder is not None:
        clone.set_model_input_block_patch(patch.input_block)
    if cfg.window_attn or getattr(cfg, "kv_downsample", 1) > 1:
        for kind, block, index in network.blocks.windowed:
            clone.set_model_attn1_replace(patch.attn1, kind, block, index)
    if getattr(cfg, "kv_downsample", 1) > 1 and getattr(cfg, "kv_levels", 1) > 1:
        for kind, block, index in network.blocks.kv_deep:
            clone.set_model_attn1_replace(patch.attn1, kind, block, index)
    clone.hidiffusion = patch  # for inspection (tests, other nodes); the clone owns it
    return clone


__all__ = [
    "apply_hidiffusion",
    "check_comfy_api",
    "CallRecord",
    "ComfyVersionError",
    "HiDiffusionPatch",
    "UnsupportedModelError",
]
