"""Memory: the estimate of a run from its model and request, the plan ``hidiff generate`` makes
from it (tiled VAE decode, attention slicing, model offload, or a refusal), and the measurement
the estimate is validated against.

The estimate itself is :mod:`hidiff.core.memory`; this module reads its inputs from a loaded
(or weightless) diffusers pipeline and decides what the device needs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from .args import UsageError


def allocator_peak(fn: Callable[[], Any]) -> int:
    """The peak of memory allocated through PyTorch's CPU allocator while ``fn`` runs, above what was
    allocated when it started (the CPU counterpart of CUDA's ``max_memory_allocated``), from the
    profiler's allocation events: every tensor and every kernel workspace that goes through the
    allocator, nothing of the Python heap or the allocator's caching."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = prof.profiler.kineto_results.events()
    changes = sorted(
        (e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]" and e.device_type().name == "CPU"
    )
    current = peak = 0
    for _, nbytes in changes:
        current += nbytes
        peak = max(peak, current)
    return peak


# ------------------------------------------------------------------ the estimate of a pipeline
def parse_bytes(text: str) -> int:
    """``8GB``, ``24 GiB``, ``512MB``, ``1e9`` -> bytes; ValueError naming the forms it takes."""
    import re

    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmgt]i?b?|b)?\s*", str(text).lower())
    if not match:
        raise ValueError(f"{text!r} is not a memory size; write e.g. 8GB, 24GiB, 512MB or a number of bytes")
    number, unit = float(match.group(1)), (match.group(2) or "b").rstrip("b") or "b"
    scale = {
        "b": 1,
        "k": 10**3,
        "m": 10**6,
        "g": 10**9,
        "t": 10**12,
        "ki": 2**10,
        "mi": 2**20,
        "gi": 2**30,
        "ti": 2**40,
    }
    value = int(number * scale[unit])
    if value <= 0:
        raise ValueError(f"a memory budget must be positive, got {text!r}")
    return value


def check_budget(value: str) -> str:
    """A ``--memory-budget`` value, checked (kept as written, so the metadata re-runs it as given)."""
    parse_bytes(value)
    return value


def default_attention(pipe: Any, device: Any) -> str:
    """The attention backend the pipeline's U-Net runs: "sliced" under attention slicing, "flash" with
    PyTorch's fused scaled-dot-product attention (diffusers' default on torch 2), "math" otherwise."""
    processors = list(getattr(pipe.unet, "attn_processors", {}).values())
    names = {type(p).__name__ for p in processors}
    if any("Sliced" in n for n in names):
        return "sliced"
    if processors and all(n in ("AttnProcessor2_0", "FusedAttnProcessor2_0") for n in names):
        return "flash"
    return "math"


def pipeline_estimate(
    pipe: Any,
    layout: Any,
    width: int,
    height: int,
    batch: int,
    config: Any,
    steps: int,
    guidance: bool,
    attention: str,
    vae_tiling: bool,
    offload: bool = False,
    dtype: Optional[str] = None,
) -> Any:
    """:func:`hidiff.core.memory.estimate` of a loaded (or weightless) diffusers pipeline (in ``dtype``
    instead of its own when given)."""
    from ..core.memory import estimate
    from ..diffusers.memory import unet_shape, vae_shape

    dtype = dtype or str(pipe.unet.dtype).replace("torch.", "")
    vae = getattr(pipe, "vae", None)
    text = sum(
        sum(p.numel() for p in module.parameters())
        for name in ("text_encoder", "text_encoder_2", "controlnet")
        if isinstance(module := getattr(pipe, name, None), torch.nn.Module)
    )
    return estimate(
        layout,
        unet_shape(pipe.unet),
        height,
        width,
        batch=batch,
        dtype=dtype,
        config=config,
        steps=steps,
        guidance=guidance,
        attention=attention,
        vae=vae_shape(vae) if vae is not None else None,
        vae_tiling=vae_tiling,
        text_params=text,
        pixels_per_latent=int(getattr(pipe, "vae_scale_factor", 8)),
        offload=offload,
    )


def gb(n: float) -> str:
    """Bytes in GB (MB below 1 GB)."""
    return f"{n / 1e9:.1f} GB" if n >= 1e9 or n == 0 else f"{n / 1e6:.1f} MB"


# ------------------------------------------------------------------ the memory plan of hidiff generate
BUDGET_ENV = "HIDIFF_MEMORY_BUDGET"
FREE_SHARE = 0.8  # of the memory free after loading, what a run may plan to take (the rest: allocator slack)


@dataclass
class MemoryPlan:
    """What ``hidiff generate`` turned on for a run to fit, and the estimates before and after."""

    budget: Optional[int]
    budget_source: str  # "--memory-budget", the environment variable, or "free memory"
    first: int  # estimated peak as the pipeline was loaded
    peak: int  # estimated peak with what the plan turned on
    vae_tiling: bool = False
    attention_slicing: bool = False
    offload: bool = False
    actions: list = field(default_factory=list)  # what it turned on, and why, in words

    def turned_on(self) -> list:
        on = [("VAE tiling", self.vae_tiling), ("attention slicing", self.attention_slicing)]
        return [name for name, value in on + [("model offload", self.offload)] if value]

    def to_dict(self) -> dict[str, Any]:
        return {
            "budget_bytes": self.budget,
            "budget_source": self.budget_source,
            "estimate_bytes": self.first,
            "planned_bytes": self.peak,
            "vae_tiling": self.vae_tiling,
            "attention_slicing": self.attention_slicing,
            "model_offload": self.offload,
            "actions": list(self.actions),
        }


def budget_of(flag_value: Optional[str], device: Any, free: Optional[int], weights: int) -> tuple[Optional[int], str]:
    """The bytes a run may take at its peak: ``--memory-budget``, else $HIDIFF_MEMORY_BUDGET, else the
    weights already loaded plus a share of the memory still free (None: unknown)."""
    if flag_value:
        return parse_bytes(flag_value), "--memory-budget"
    if os.environ.get(BUDGET_ENV):
        try:
            return parse_bytes(os.environ[BUDGET_ENV]), BUDGET_ENV
        except ValueError as error:
            raise UsageError(f"${BUDGET_ENV}: {error}") from None
    if free is None:
        return None, "unknown"
    return weights + int(FREE_SHARE * free), "free memory"


def make_memory_plan(
    pipe: Any,
    layout: Any,
    device: Any,
    width: int,
    height: int,
    batch: int,
    config: Any,
    steps: int,
    guidance: bool,
    vae_tiling: str,
    budget_flag: Optional[str],
    free: Optional[int],
) -> MemoryPlan:
    """Decide tiled VAE decoding, attention slicing and model offload for a run, each only when the
    estimate says the device is short; raise UsageError (before anything runs) when nothing makes it fit
    under an explicit budget or on an accelerator. Changes nothing on ``pipe``: see :func:`apply_memory_plan`."""
    attention = default_attention(pipe, device)

    def peak_of(tiling: bool, att: str, offload: bool, **over: Any) -> Any:
        args = dict(width=width, height=height, batch=batch, config=config, steps=steps, guidance=guidance)
        args.update(over)
        return pipeline_estimate(pipe, layout, attention=att, vae_tiling=tiling, offload=offload, **args)

    tiling = vae_tiling == "on"
    first = peak_of(tiling, attention, False)
    budget, source = budget_of(budget_flag, device, free, first.weights)
    memory_plan = MemoryPlan(budget, source, first.peak, first.peak, vae_tiling=tiling)
    if tiling:
        memory_plan.actions.append("VAE tiling on (as asked)")
    if budget is None:
        return memory_plan
    current = first
    if vae_tiling == "auto" and current.weights + current.vae > budget and getattr(pipe, "vae", None) is not None:
        memory_plan.vae_tiling = True
        memory_plan.actions.append(
            f"VAE tiling on: {width}x{height} x{batch} ({_why_tiling(current, memory_plan, free)})"
        )
        current = peak_of(True, attention, False)
    if current.peak > budget and attention == "math":
        memory_plan.attention_slicing = True
        attention = "sliced"
        after = peak_of(memory_plan.vae_tiling, attention, False)
        memory_plan.actions.append(
            f"attention slicing on: the U-Net's attention scores need about {gb(current.unet - after.unet)} more "
            f"than one head at a time"
        )
        current = after
    if current.peak > budget:
        current = _offload(memory_plan, current, lambda: peak_of(memory_plan.vae_tiling, attention, True), device)
    memory_plan.peak = current.peak
    if current.peak > budget:
        fits = what_fits(peak_of, budget, width, height, batch, str(pipe.unet.dtype), memory_plan, attention)
        _refuse_or_warn(memory_plan, current, f"{width}x{height} x{batch}", fits, device)
    return memory_plan


def _why_tiling(current: Any, memory_plan: MemoryPlan, free: Optional[int]) -> str:
    if memory_plan.budget_source == "free memory":
        return f"decoding in one piece needs about {gb(current.vae)}, {gb(free)} free"
    return (
        f"decoding in one piece needs about {gb(current.vae)} on top of {gb(current.weights)} of weights, "
        f"budget {gb(memory_plan.budget)} ({memory_plan.budget_source})"
    )


def _offload(memory_plan: MemoryPlan, current: Any, offloaded: Any, device: Any) -> Any:
    """Model offload where it helps (a CUDA device with accelerate): the estimate after it, else ``current``."""
    if device.type == "cuda" and _has_accelerate():
        memory_plan.offload = True
        after = offloaded()
        memory_plan.actions.append(
            f"model offload on: weights {gb(current.weights)} -> {gb(after.weights)} on the GPU at a time"
        )
        return after
    if device.type == "cpu":
        memory_plan.actions.append("model offload: nothing to gain on CPU (the weights are in host memory already)")
    return current


def _refuse_or_warn(memory_plan: MemoryPlan, current: Any, run: str, fits: str, device: Any) -> None:
    """A run that still does not fit: refused (UsageError) under an explicit budget or on an accelerator;
    on the CPU with only the free memory as its budget, a warning in the plan's actions."""
    turned_on = memory_plan.turned_on()
    message = (
        f"{run} needs about {gb(current.peak)} at its peak (weights {gb(current.weights)}, "
        f"U-Net {gb(current.unet)}, VAE decode {gb(current.vae)}"
        f"{', with ' + ', '.join(turned_on) if turned_on else ''}), "
        f"more than the {gb(memory_plan.budget)} budget ({memory_plan.budget_source}); {fits}"
    )
    if memory_plan.budget_source != "free memory" or device.type != "cpu":
        raise UsageError(message)
    memory_plan.actions.append(
        f"warning: {message}; it may swap or be stopped (pass --memory-budget to refuse such runs)"
    )


def what_fits(
    peak_of: Callable[..., Any],
    budget: int,
    width: int,
    height: int,
    batch: int,
    dtype: str,
    memory_plan: MemoryPlan,
    att: str,
) -> str:
    """What would make a run fit: a smaller size at the same aspect, float16, one image at a time."""
    options = []
    scale = 1.0
    while scale > 0.1:
        scale *= 0.9
        w, h = max(64, int(width * scale) // 64 * 64), max(64, int(height * scale) // 64 * 64)
        if peak_of(memory_plan.vae_tiling, att, memory_plan.offload, width=w, height=h).peak <= budget:
            options.append(f"{w}x{h}")
            break
    if batch > 1 and peak_of(memory_plan.vae_tiling, att, memory_plan.offload, batch=1).peak <= budget:
        options.append("--batch 1")
    if "float32" in dtype and peak_of(memory_plan.vae_tiling, att, memory_plan.offload, dtype="float16").peak <= budget:
        options.append("--dtype float16")
    if not memory_plan.vae_tiling:
        options.append("--vae-tiling on")
    return "would fit: " + ", or ".join(options) if options else "no smaller size, batch or dtype fits that budget"


def apply_memory_plan(pipe: Any, memory_plan: MemoryPlan, device: Any) -> None:
    """Turn on what the memory_plan says, and print it."""
    if memory_plan.vae_tiling and not getattr(pipe.vae, "use_tiling", False):
        pipe.vae.enable_tiling()
    if memory_plan.attention_slicing:
        pipe.enable_attention_slicing(1)
    if memory_plan.offload:
        pipe.enable_model_cpu_offload(device=device)
    for action in memory_plan.actions:
        print(action)


def _has_accelerate() -> bool:
    import importlib.util

    return importlib.util.find_spec("accelerate") is not None


# ------------------------------------------------------------------ hidiff info
def info_rows(
    unet: Any,
    layout: Any,
    factor: int,
    height: int,
    width: int,
    steps: int,
    config: Any,
    batch: int,
    dtype: str,
    attention: str,
) -> list[dict[str, Any]]:
    """The estimate table of ``hidiff info``: without HiDiffusion, with the given options, with windows only
    and with key/value downsampling 2, each decoding in one piece and tiled. The VAE and text encoders
    are the family's (SD's VAE; SDXL's, decoded in float32); a pixel-space model has neither."""
    import dataclasses

    from ..core import memory
    from ..diffusers.memory import unet_shape

    shape = unet_shape(unet)
    vae, text = _family_parts(layout, factor)
    modes = [
        ("without HiDiffusion", None),
        ("HiDiffusion (as given)", config),
        ("windows only", dataclasses.replace(config, raunet=False)),
        ("HiDiffusion, kv 2", dataclasses.replace(config, kv_downsample=2)),
    ]
    rows = []
    for label, cfg in modes:
        for tiled in (False, True) if vae is not None else (False,):
            e = memory.estimate(
                layout,
                shape,
                height,
                width,
                batch=batch,
                dtype=dtype,
                config=cfg,
                steps=steps,
                attention=attention,
                vae=vae,
                vae_tiling=tiled,
                text_params=text,
                pixels_per_latent=factor,
            )
            rows.append({"mode": label, "vae_tiling": tiled, **_estimate_fields(e)})
    return rows


def _family_parts(layout: Any, factor: int) -> tuple[Any, int]:
    """The family's VAE (SD's; SDXL's) and text encoders' parameter count; none for a pixel-space model."""
    from ..core import memory

    if factor == 1:
        return None, 0
    sdxl = layout.kind == "sdxl"
    text = memory.TEXT_ENCODER_PARAMS.get(layout.family, memory.TEXT_ENCODER_PARAMS["sdxl" if sdxl else "sd1"])
    return (memory.SDXL_VAE if sdxl else memory.SD_VAE), text


def _estimate_fields(e: Any) -> dict[str, Any]:
    return {
        "weights_bytes": e.weights,
        "unet_bytes": e.unet,
        "vae_bytes": e.vae,
        "peak_bytes": e.peak,
        "unet_by_phase": e.unet_by_phase,
        "unet_by_stage": e.unet_by_stage,
    }


def format_info(rows: list[dict[str, Any]], batch: int, dtype: str, attention: str) -> list[str]:
    lines = [
        f"memory    estimated peak, batch {batch} (x2 for guidance), {dtype}, attention {attention}:",
        f"  {'mode':<24} {'VAE':<9} {'weights':>8} {'U-Net':>8} {'decode':>8} {'peak':>8}",
    ]
    for r in rows:
        lines.append(
            f"  {r['mode']:<24} {'tiled' if r['vae_tiling'] else 'one piece':<9} {gb(r['weights_bytes']):>8} "
            f"{gb(r['unet_bytes']):>8} {gb(r['vae_bytes']):>8} {gb(r['peak_bytes']):>8}"
        )
    worst = next(r for r in rows if r["mode"] == "HiDiffusion (as given)")["unet_by_stage"]
    lines.append("  U-Net peak per stage (as given): " + ", ".join(f"{k} {gb(v)}" for k, v in worst.items()))
    return lines


# ------------------------------------------------------------------ validation
def measure_unet_call(
    unet_config: dict, side: int, batch: int, config: Any, attention: str, rss: bool = False, time_ids: int = 6
) -> dict[str, int]:
    """One U-Net call at a ``side`` x ``side`` latent, random weights from ``unet_config``: the allocator peak
    measured (see :func:`allocator_peak`; after one call that pays one-time allocations), the estimate of
    :mod:`hidiff.core.memory` for the same call and, with ``rss``, the process's resident memory sampled
    every 20 ms over a third call, its peak minus its level before that call."""
    from diffusers import DDIMScheduler
    from diffusers.models.attention_processor import AttnProcessor, SlicedAttnProcessor

    import hidiff

    from ..core import memory
    from ..core.config import HiDiffusionConfig
    from ..core.planner import Progress, plan_call
    from ..diffusers.memory import unet_shape
    from ..diffusers.model import detect_architecture
    from ..diffusers.testing import make_unet
    from .timing import PeakMemory

    unet = make_unet(unet_config)
    if attention == "math":
        unet.set_attn_processor(AttnProcessor())
    elif attention == "sliced":
        unet.set_attn_processor(SlicedAttnProcessor(1))
    scheduler = DDIMScheduler()
    scheduler.set_timesteps(10)
    x = torch.randn(batch, unet.config.in_channels, side, side)
    text = torch.randn(batch, 77, unet.config.cross_attention_dim)
    extra: dict[str, Any] = {}
    if unet.config.addition_embed_type == "text_time":
        pooled = unet.config.projection_class_embeddings_input_dim - time_ids * unet.config.addition_time_embed_dim
        added = {"text_embeds": torch.randn(batch, pooled), "time_ids": torch.randn(batch, time_ids)}
        extra = {"added_cond_kwargs": added}
    if config is not None:
        hidiff.apply_hidiffusion(unet, config=config, scheduler=scheduler)
    t = scheduler.timesteps[0]
    out: dict[str, int] = {}
    with torch.no_grad():
        unet(x, t, text, **extra)
        out["measured"] = allocator_peak(lambda: unet(x, t, text, **extra))
        if rss:
            with PeakMemory(torch.device("cpu")) as sampled:
                before = sampled.peak
                unet(x, t, text, **extra)
            out["rss_delta"] = sampled.peak - before
    arch = detect_architecture(unet)
    plan = plan_call(arch, (side, side), config or HiDiffusionConfig(raunet=False, window_attn=False), Progress(0, 10))
    elements, _ = memory.unet_activation_elements(
        arch, unet_shape(unet), plan, batch, attention, windows=config is not None and plan.windows
    )
    out["estimated"] = elements * 4
    return out
