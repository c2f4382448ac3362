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
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from ..core import compose, ops, rules
from ..core.architecture import UnsupportedModelError
from ..core.compose import CompositionError, names
from ..core.config import HiDiffusionConfig
from ..core.planner import Plan, Progress, Task, plan_call
from ..core.progress import progress_from_sigmas
from ..core.rules import CallRecord
from .structure import ComfyNetwork, describe

#: Keys under which a patch's run and call state travel in ``transformer_options``.
_RUN_KEY = "hidiff_run"
_CALL_KEY = "hidiff_call"
#: Key of this pack's wrappers in ComfyUI's wrapper registry (one HiDiffusion per model).
WRAPPER_KEY = "hidiff.hidiffusion"


class ComfyVersionError(RuntimeError):
    """The running ComfyUI lacks an API the node needs."""


@dataclass
class CallState:
    """One U-Net call in progress (the record is the core's :class:`hidiff.core.rules.CallRecord`)."""

    plan: Plan
    seeds: list[int]  # window seed of each row of the batch (hidiff.core.rules.row_seeds)
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
        self.deep_of = {key: count + n for n, key in enumerate(network.blocks.kv_deep)}
        self.layer_kwargs: dict = {}  # per-layer attention keywords (layer_attention_kwargs), set by apply_hidiffusion
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
            check_composition(extra_args.get("model_options") or {}, self.config)
            self.check_window_masks(extra_args.get("model_options") or {}, noise)
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
        record = CallRecord.of(plan, int(x.shape[0])) if self.recorder is not None else None
        state = CallState(plan=plan, seeds=self._row_seeds(x, transformer_options), record=record)
        if isinstance(control, dict):
            _put(args, kwargs, control_at, self._fit_control(control, plan, record))
        calls = {**transformer_options.get(_CALL_KEY, {}), self.key: state}
        _put(args, kwargs, options_at, self.route_attention({**transformer_options, _CALL_KEY: calls}, plan))
        out = executor(x, *args, **kwargs)
        if record is not None:
            self.recorder(record)
        return out

    def _row_seeds(self, x: torch.Tensor, transformer_options: dict) -> list:
        """The window seed of each row: rows are chunks of the latent batch (one per cond)."""
        rows = int(x.shape[0])
        images = transformer_options.get(_RUN_KEY, {}).get(self.key)
        if not images and self.config.window_seed is None:
            # No run wrapper saw the noise (a U-Net call outside a sampler): seed from the input.
            chunks = max(1, len(transformer_options.get("cond_or_uncond", ()) or ()) or 1)
            images = ops.image_seeds(x[: rows // chunks if rows % chunks == 0 else rows])
        return rules.row_seeds(self.config, rows, images or [])

    def _state(self, transformer_options: dict) -> Optional[CallState]:
        return (transformer_options.get(_CALL_KEY) or {}).get(self.key)

    def _fit_control(self, control: dict, plan: Plan, record: Optional[CallRecord]) -> dict:
        """ControlNet / T2I-Adapter residuals (made at full size) resized to the plan's features.

        ComfyUI pops them from the end: ``output`` entry i is added to the skip of input block
        i, ``input`` entry j to the output of input block len-1-j, ``middle`` to the mid block.
        """
        sizes = rules.residual_sizes(plan, self.network.architecture)
        down, outputs = sizes.down, sizes.block_outputs
        fitted = dict(control)
        if control.get("output") is not None:
            fitted["output"] = [_fit(r, down[i]) if i < len(down) else r for i, r in enumerate(control["output"])]
        if control.get("middle") is not None:
            fitted["middle"] = [_fit(r, sizes.mid) for r in control["middle"]]
        if control.get("input") is not None:
            entries = list(control["input"])
            blocks = [len(entries) - 1 - j for j in range(len(entries))]
            fitted["input"] = [_fit(r, outputs[b]) if b < len(outputs) else r for r, b in zip(entries, blocks)]
        if record is not None:
            for kind, name in (("down", "output"), ("mid", "middle"), ("adapter", "input")):
                if fitted.get(name) is not None:
                    record.residual_sizes[kind] = [None if r is None else tuple(r.shape[-2:]) for r in fitted[name]]
        return fitted

    # ------------------------------------------------------------ RAU-Net
    def downsample(
        self, layer: Any, x: torch.Tensor, emb: Any, context: Any, transformer_options: dict, *rest: Any
    ) -> torch.Tensor:
        state = self._state(transformer_options)
        block = tuple(transformer_options.get("block", ()))
        if state is not None and len(block) == 2 and block[0] == "input":
            stages = rules.input_block_stages(self.network.architecture)
            if block[1] < len(stages) and stages[block[1]][1] == "downsample":
                stage, size = stages[block[1]][0], (int(x.shape[-2]), int(x.shape[-1]))
                if state.record is not None:
                    state.record.skip_sizes[stage] = size
                planned = state.plan.downsample_inputs
                # Deep Shrink before the skip (input_block_patch) and any other resizer, found when it acts.
                others = ((transformer_options.get("patches") or {}).get("input_block_patch")) or ()
                compose.check_planned_size(
                    self.config,
                    stage,
                    size,
                    planned[stage] if stage < len(planned) else None,
                    _names([p for p in others if getattr(p, "__self__", None) is not self]),
                )
        if state is None or not state.plan.conv or block != ("input", self.network.blocks.conv_block):
            return layer(x)
        out = strided_conv(layer.op, x)
        if state.record is not None:
            state.record.strided((int(out.shape[-2]), int(out.shape[-1])))
        return out

    def input_block(self, h: torch.Tensor, transformer_options: dict) -> torch.Tensor:
        state = self._state(transformer_options)
        if state is None:
            return h
        block = transformer_options.get("block", ("", -1))[1]
        if state.plan.pool and block == self.network.blocks.pool_block:
            pooled = ops.rau_pool(h)
            if state.record is not None:
                state.record.pooled_map(
                    (int(h.shape[-2]), int(h.shape[-1])), (int(pooled.shape[-2]), int(pooled.shape[-1]))
                )
            h = pooled
        return h

    def output_block(self, h: torch.Tensor, hsp: torch.Tensor, transformer_options: dict) -> tuple:
        state = self._state(transformer_options)
        if state is None or not state.plan.pool:
            return h, hsp
        block = transformer_options.get("block", ("", -1))[1]
        if block != self.network.blocks.unpool_block:
            return h, hsp
        if hsp is None:  # an earlier patch joined the skip itself: the skip's size is the plan's
            skips = state.plan.skip_sizes
            size = tuple(skips[len(skips) - 1 - block])
        else:
            size = (int(hsp.shape[-2]), int(hsp.shape[-1]))
        grown = ops.rau_unpool(h, size)
        if state.record is not None:
            state.record.unpooled = ((int(h.shape[-2]), int(h.shape[-1])), (int(size[0]), int(size[1])))
        return grown, hsp

    # ------------------------------------------------------------ MSW-MSA
    def attention_layers(self, plan: Plan) -> tuple:
        """The self-attention layers (ComfyUI's (block, id, index) keys) this call's plan changes."""
        layers: tuple = ()
        if plan.windows or plan.kv > 1:
            layers += tuple(self.network.blocks.windowed)
        below = self.network.architecture.window_stage + 1
        if plan.kv > 1 and below in plan.kv_stages:
            layers += tuple(self.network.blocks.kv_deep)
        return layers

    def check_window_masks(self, model_options: dict, noise: Any) -> None:
        """Before a run: an odd-sized top map needs masked (padded) windows, which another patch's
        attn1 replacement on a windowed layer cannot take; refuse that now, not at its first call."""
        if not self.config.window_attn or not isinstance(noise, torch.Tensor) or noise.ndim != 4:
            return
        arch = self.network.architecture
        h, w = int(noise.shape[-2]), int(noise.shape[-1])
        if self.config.at_native == "skip" and h <= arch.native[0] and w <= arch.native[1]:
            return
        for _ in range(arch.window_stage):
            h, w = -(-h // 2), -(-w // 2)
        if h % 2 == 0 and w % 2 == 0:
            return
        replaces = ((model_options.get("transformer_options") or {}).get("patches_replace") or {}).get("attn1") or {}
        found = (replaces.get(k) or replaces.get(k[:2]) for k in self.network.blocks.windowed)
        others = [fn for fn in found if fn is not None]
        if others:
            names = _names(others)
            raise CompositionError(
                f"HiDiffusion: the windowed attention on this size's {h}x{w} top-stage map needs masked windows, "
                f"which {names} (also replacing that self-attention) cannot take. Use a width and height whose "
                f"top-stage latent sides are even (multiples of {16 * 2**arch.window_stage} px), remove {names}, "
                "or turn window_attn off."
            )

    def route_attention(self, transformer_options: dict, plan: Plan) -> dict:
        """``transformer_options`` for one U-Net call with this patch's ``attn1`` replacement on
        exactly the layers the plan changes; every other layer (and every layer of a call the plan
        leaves alone) keeps ComfyUI's own attention path. A replacement another patch put on such a
        layer (found now, so patches applied after this node count too) runs inside ours."""
        transformer_options = self._output_patch_first(transformer_options, plan)
        layers = self.attention_layers(plan)
        if not layers:
            return transformer_options
        patches_replace = dict(transformer_options.get("patches_replace") or {})
        replaces = dict(patches_replace.get("attn1") or {})
        token_patches = tuple(patch_name(p) for p in (transformer_options.get("patches") or {}).get("attn1_patch", ()))
        for key in layers:
            previous = replaces.get(key) or replaces.get(key[:2])
            replaces[key] = _LayerAttention(self, previous, self.layer_kwargs.get(key, {}), token_patches)
        patches_replace["attn1"] = replaces
        return {**transformer_options, "patches_replace": patches_replace}

    def _output_patch_first(self, transformer_options: dict, plan: Plan) -> dict:
        """While RAU-Net pools, this patch's output-block patch runs before every other one in the
        call, so those (FreeU, SUPIR's, ...) see the map grown back to its skip connection's size,
        as on a U-Net without RAU-Net, whichever node came first; and one that returns
        ``hsp=None`` (it concatenated the skip itself) runs after the unpool."""
        patches = transformer_options.get("patches") or {}
        outputs = list(patches.get("output_block_patch") or ())
        if not plan.pool or len(outputs) < 2:
            return transformer_options
        ours = [p for p in outputs if p == self.output_block]
        others = [p for p in outputs if p != self.output_block]
        return {**transformer_options, "patches": {**patches, "output_block_patch": ours + others}}

    def attn1(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict, route: Optional[Any] = None
    ) -> torch.Tensor:
        """HiDiffusion's self-attention on one layer; ``route`` (a :class:`_LayerAttention`) carries
        what that layer's own attention call would get besides q, k, v and ``extra_options``."""
        block = extra_options.get("block") or ("", -1)
        key = (block[0], block[1], extra_options.get("block_index", 0))
        state = self._state(extra_options)
        _check_token_layout(q, k, extra_options, route)
        heads = extra_options["n_heads"]

        def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
            return _attention(q, k, v, heads, bias, extra_options, route)

        hw = _map_size(q.shape[1], extra_options)
        # Windowed layers are numbered first, the next stage's (kv_levels 2) on after them.
        arch = self.network.architecture
        layer, stage = self.layer_of.get(key), arch.window_stage
        if layer is None:
            layer, stage = self.deep_of.get(key), arch.window_stage + 1
        if state is None or layer is None or hw is None or min(hw) < 2:
            return attention(q, k, v, None)
        rule = rules.layer_rule(state.plan, arch, stage)
        shift = rules.window_shifts(self.config, state.seeds, state.plan.step, layer, hw) if rule.windowed else None
        return rules.self_attention(q, k, v, hw, rule, attention, shift, record=state.record, layer=layer)


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
    if rules.ascending(levels):
        # Rising sigmas (an inversion / unsampling): planned as the sampling they mirror.
        levels.reverse()
    progress = progress_from_sigmas(sigma, levels)
    if progress is None:
        # A call outside the sampled schedule (e.g. a model call made by another node): the
        # one off-schedule rule of every host (docs/how-it-works.md), and a warning.
        warnings.warn(OFF_SCHEDULE_WARNING, stacklevel=2)
        return rules.off_schedule_progress(sigma, levels, max(1, len(levels) - 1))
    return progress


#: The warning for a U-Net call whose sigma is not in the run's sampled sigmas.
OFF_SCHEDULE_WARNING = (
    "HiDiffusion: the model was called at a sigma outside the sigmas being sampled (a model call from outside "
    "the sampling loop?): it is planned at the sampled step whose interval holds its noise level (hidiff's rule for calls off "
    "the sampled schedule), so RAU-Net's step ranges may not fit this call."
)


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


class _LayerAttention:
    """HiDiffusion's ``attn1`` replacement on one layer for one call: around ``previous`` (another
    patch's replacement on that layer, or None for ComfyUI's attention function), passing on
    ``kwargs`` (what the layer's own attention call passes beyond q, k, v, heads, attn_precision
    and transformer_options: see :data:`LAYER_ATTENTION_ATTRIBUTES`)."""

    __slots__ = ("patch", "previous", "kwargs", "token_patches")

    def __init__(self, patch: HiDiffusionPatch, previous: Any, kwargs: dict, token_patches: tuple = ()):
        self.patch, self.previous, self.kwargs = patch, previous, kwargs
        self.token_patches = token_patches  # names of the call's attn1_patch functions (for messages)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict) -> torch.Tensor:
        return self.patch.attn1(q, k, v, extra_options, self)


#: Attributes of a self-attention module that its own forward passes to ComfyUI's attention
#: function as keywords of the same name (a per-layer attention preference in newer ComfyUI);
#: read from each layer HiDiffusion replaces and passed on where present.
LAYER_ATTENTION_ATTRIBUTES = ("preferred_attention",)


def layer_attention_kwargs(model_patcher: Any, layers: Any) -> dict:
    """{layer key: keywords its own attention call passes} for the layers that have any."""
    found = {}
    for key in layers:
        module = _attn1_module(getattr(getattr(model_patcher, "model", None), "diffusion_model", None), key)
        kwargs = {n: getattr(module, n) for n in LAYER_ATTENTION_ATTRIBUTES if getattr(module, n, None) is not None}
        if kwargs:
            found[key] = kwargs
    return found


def _attn1_module(diffusion_model: Any, key: tuple) -> Any:
    """The ``attn1`` module at ComfyUI's (block kind, block id, transformer index) key, or None."""
    kind, block, index = key
    try:
        if kind == "middle":
            container = diffusion_model.middle_block
        else:
            container = {"input": diffusion_model.input_blocks, "output": diffusion_model.output_blocks}[kind][block]
        for part in container:
            if hasattr(part, "transformer_blocks"):
                return part.transformer_blocks[index].attn1
    except (AttributeError, IndexError, KeyError, TypeError):
        return None
    return None


#: ComfyUI's own patches by module, for messages; patches of other modules are named by their function.
KNOWN_PATCHES = {
    "comfy_extras.nodes_hypertile": "HyperTile",
    "comfy_extras.nodes_tomesd": "ToMe (TomePatchModel)",
    "comfy_extras.nodes_model_downscale": "Deep Shrink (PatchModelAddDownscale)",
    "comfy_extras.nodes_freelunch": "FreeU",
    "comfy_extras.nodes_sag": "Self-Attention Guidance",
    "comfy_extras.nodes_pag": "Perturbed-Attention Guidance",
    "comfy_extras.nodes_hypernetwork": "a hypernetwork",
}
#: Modules whose attn1_patch changes the self-attention's token layout (tiles or merges tokens).
TOKEN_LAYOUT_MODULES = ("comfy_extras.nodes_hypertile", "comfy_extras.nodes_tomesd")


def patch_name(fn: Any) -> str:
    """A model patch function as a user knows it (its node for ComfyUI's own, else module.function)."""
    target = getattr(fn, "__func__", fn)
    module = getattr(target, "__module__", "") or ""
    if module in KNOWN_PATCHES:
        return KNOWN_PATCHES[module]
    name = getattr(target, "__qualname__", None) or type(fn).__qualname__
    return f"{module}.{name}" if module else name


def _names(fns: list) -> str:
    return names([patch_name(f) for f in fns])


def check_composition(model_options: dict, config: HiDiffusionConfig) -> None:
    """Refuse, before anything runs, another patch on the model that HiDiffusion cannot work with
    (the rule and its messages: :mod:`hidiff.core.compose`). Called when the node is applied (for
    patches already on its input) and at the start of every sampling run (patches added after it).

    Here the feature resizers are the ``input_block_patch_after_skip`` patches (Deep Shrink) and the
    token patches the known ``attn1_patch`` modules that tile or merge tokens (HyperTile, ToMe); any
    other ``attn1_patch`` that changes a windowed layer's tokens is refused at its first windowed call
    by the token check in the attention (:func:`_check_token_layout`).
    """
    patches = (model_options.get("transformer_options") or {}).get("patches") or {}
    resizers = [patch_name(p) for p in patches.get("input_block_patch_after_skip") or ()]
    tilers = [patch_name(p) for p in patches.get("attn1_patch") or () if _module_of(p) in TOKEN_LAYOUT_MODULES]
    compose.check_composition(config, resizers=resizers, token_patches=tilers)


def _module_of(fn: Any) -> str:
    return getattr(getattr(fn, "__func__", fn), "__module__", "") or ""


def _check_token_layout(q: torch.Tensor, k: torch.Tensor, extra_options: dict, route: Any) -> None:
    """The tokens HiDiffusion's attention gets must be the layer's feature map, one per position
    (an ``attn1_patch`` that tiles, merges or adds tokens breaks that): refuse clearly otherwise."""
    shape = extra_options.get("activations_shape")
    if shape is None or len(shape) != 4:
        return  # a ComfyUI that does not say the map's shape: only the known patches are refused
    tokens = int(shape[2]) * int(shape[3])
    if int(q.shape[1]) == tokens and int(k.shape[1]) == tokens:
        return
    names = " and ".join(dict.fromkeys(getattr(route, "token_patches", ()) or ("another patch",)))
    raise CompositionError(
        f"HiDiffusion: {names} changed the tokens of a self-attention HiDiffusion windows ({int(q.shape[1])} "
        f"queries and {int(k.shape[1])} keys for a {int(shape[2])}x{int(shape[3])} map), so the windows would "
        f"cut the wrong tokens. Remove {names}, or set window_attn off and kv_downsample 1 on the HiDiffusion node."
    )


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


def _attention(q, k, v, heads, key_bias, extra_options, route):
    """The attention of (windowed / key-value-shrunk) tokens, as the layer itself would run it: the
    earlier replacement on the layer if any, else ComfyUI's attention function with what the layer's
    own call passes (``attn_precision``, ``transformer_options`` so overrides and wrappers apply,
    per-layer keywords)."""
    previous = getattr(route, "previous", None)
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
    accepted = _parameters(attention.optimized_attention)
    if "transformer_options" in accepted:
        kwargs["transformer_options"] = extra_options
    for name, value in (getattr(route, "kwargs", None) or {}).items():
        if name in accepted or "**" in accepted:
            kwargs[name] = value
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
        return set(params) | {"transformer_options", "**"}
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

    check_composition(model_patcher.model_options, cfg)
    patch = HiDiffusionPatch(network, cfg, recorder)
    patch.layer_kwargs = layer_attention_kwargs(model_patcher, (*network.blocks.windowed, *network.blocks.kv_deep))
    clone = model_patcher.clone()
    clone.add_wrapper_with_key(wrappers.SAMPLER_SAMPLE, WRAPPER_KEY, patch.sampler_sample)
    clone.add_wrapper_with_key(wrappers.DIFFUSION_MODEL, WRAPPER_KEY, patch.diffusion_model)
    if cfg.raunet:
        clone.set_model_forward_timestep_embed_patch((Downsample, patch.downsample))
        clone.set_model_input_block_patch(patch.input_block)
        clone.set_model_output_block_patch(patch.output_block)
    # The attn1 replacements are put on per U-Net call, on the layers that call's plan changes
    # (HiDiffusionPatch.route_attention), so nothing is registered for them here.
    clone.hidiffusion = patch  # for inspection (tests, other nodes); the clone owns it
    return clone


__all__ = [
    "apply_hidiffusion",
    "check_comfy_api",
    "CallRecord",
    "ComfyVersionError",
    "CompositionError",
    "HiDiffusionPatch",
    "UnsupportedModelError",
]
