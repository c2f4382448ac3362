"""What HiDiffusion does in one U-Net call: a pure function of the architecture, the latent
size, the options and where the call stands in its run.

Hosts call :func:`plan_call` once per U-Net call and act on the :class:`Plan` it returns;
nothing here keeps state between calls.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from . import ops
from .architecture import Architecture
from .config import HiDiffusionConfig
from .presets import PRESETS, Preset, choose_preset, in_range

Size = tuple[int, int]


@dataclass(frozen=True)
class Progress:
    """Where a U-Net call stands in its run: step ``index`` of ``total`` (0-based)."""

    index: int
    total: int
    new_run: bool = False


@dataclass(frozen=True)
class Task:
    """What the host knows about the run beyond the network: it selects among the presets."""

    inpainting: bool = False  # an inpainting pipeline (the U-Net itself may be a 4-channel one)
    edm: bool = False  # an EDM-parametrised scheduler (Playground v2.5)
    text2img_controlnet: bool = False  # a text-to-image ControlNet run


@dataclass(frozen=True)
class Plan:
    """HiDiffusion for one call. ``preset`` None: nothing changes (at or below native size)."""

    latent: Size
    step: int
    total: int
    preset: Optional[str]
    conv: bool  # the conv stage's downsampler runs with stride 4
    pool: bool  # the pool stage's first pair output is avg-pooled, grown back in the up path
    windows: bool  # MSW-MSA at the window stage and its mirror
    skip_sizes: tuple[Size, ...]  # skip features in ControlNet residual order
    mid_size: Size
    adapter_sizes: tuple[Size, ...]  # where each down stage, then the mid block, takes a T2I-Adapter residual
    downsample_inputs: tuple[Size, ...]  # per down stage with a downsampler: its input, where the mirror lands
    kv: int = 1  # key/value downsampling factor of the self-attention at kv_stages (1: off)
    kv_stages: tuple[int, ...] = ()  # down stages (and their mirrors) whose self-attention keys/values shrink

    @property
    def active(self) -> bool:
        return self.preset is not None

    @property
    def resizes(self) -> bool:
        """Whether RAU-Net changes a feature size in this call (so the up path must be told its sizes)."""
        return self.conv or self.pool


def choose(arch: Architecture, latent: Size, config: HiDiffusionConfig, total: int, task: Task) -> Optional[Preset]:
    """The preset of a call, or None where HiDiffusion leaves it alone."""
    if config.at_native == "skip" and latent[0] <= arch.native[0] and latent[1] <= arch.native[1]:
        return None
    if config.preset:
        return PRESETS[config.preset]
    return choose_preset(
        arch.kind,
        latent,
        arch.native,
        total,
        inpainting=arch.inpainting or task.inpainting,
        edm=task.edm,
        text2img_controlnet=task.text2img_controlnet,
        aggressive=config.aggressive,
    )


def plan_call(
    arch: Architecture, latent: Size, config: HiDiffusionConfig, progress: Progress, task: Task = Task()
) -> Plan:
    """The plan of one call at ``progress`` on a ``latent``-sized input."""
    preset = choose(arch, latent, config, progress.total, task)
    conv = pool = False
    if preset is not None and config.raunet:
        t1, t2 = config.ratios(preset)
        a = config.aggressive_step_ratio
        conv = in_range(preset.conv, progress.index, progress.total, t1, t2, a)
        pool = in_range(preset.pool, progress.index, progress.total, t1, t2, a)
    skips, mid, adapter, inputs = feature_sizes(arch, latent, conv, pool)
    kv = config.kv_downsample if preset is not None else 1
    return Plan(
        latent=latent,
        step=progress.index,
        total=progress.total,
        preset=preset.name if preset else None,
        conv=conv,
        pool=pool,
        windows=preset is not None and config.window_attn,
        skip_sizes=skips,
        mid_size=mid,
        adapter_sizes=adapter,
        downsample_inputs=inputs,
        kv=kv,
        kv_stages=arch.kv_stages(config.kv_levels) if kv > 1 else (),
    )


def feature_sizes(
    arch: Architecture, latent: Size, conv: bool, pool: bool
) -> tuple[tuple[Size, ...], Size, tuple[Size, ...], tuple[Size, ...]]:
    """Feature sizes under a RAU-Net state, from the network's real structure: (skip features
    in ControlNet residual order, the mid block's, where each down stage then the mid block
    takes a T2I-Adapter residual, each downsampler's input)."""
    network = arch.network
    if network is None:
        raise ValueError("feature sizes need the architecture's network description")
    size, skips, adapter, inputs = latent, [latent], [], []
    for k, stage in enumerate(network.stages):
        for j in range(stage.layers):
            if pool and k == arch.pool_stage and j == 0:
                size = (-(-size[0] // 2), -(-size[1] // 2))
            skips.append(size)
        stage_out = size
        if stage.downsample:
            inputs.append(size)
            side = ops.rau_conv_side if conv and k == arch.conv_stage else ops.stock_downsample_side
            size = (side(size[0]), side(size[1]))
            skips.append(size)
        # Stages with attention add the adapter residual inside, after their last pair;
        # the others after their downsampler.
        adapter.append(stage_out if stage.cross_attention else size)
    # A residual left over after the down stages goes to the mid block (SDXL adapters).
    adapter.append(size)
    return tuple(skips), size, tuple(adapter), tuple(inputs)
