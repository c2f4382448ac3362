"""Which network is this, and where does HiDiffusion act on it? One record per family.

A host reads its model into a :class:`NetworkDescription` (channel widths, layers and
attention per stage, what the up path looks like): plain numbers, no framework types.
:func:`recognise` matches it against :data:`REGISTRY` and returns the
:class:`Architecture`: which stage's downsampler RAU-Net strides, which stage it pools,
where the windows act, and the native size. Stage indices in a record are relative to
the first stage with cross-attention, so a record states the published placement once
for every model of its layout (fine-tunes, distillations with other transformer depths
or other numbers of layers per stage).

Adding a family is one :class:`ArchitectureRecord` in :data:`REGISTRY` plus its tests
(see docs/architecture.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Optional


class UnsupportedModelError(TypeError):
    """The object is not a U-Net that HiDiffusion can be applied to."""


@dataclass(frozen=True)
class Stage:
    """One resolution level of the down path."""

    channels: int
    layers: int  # resnets (each followed by its transformer where the stage has attention)
    cross_attention: bool  # transformer blocks with self- and cross-attention
    downsample: bool  # ends in a 3x3 stride-2 conv downsampler
    other_attention: str = ""  # what attention the stage has instead of transformer blocks, if any


@dataclass(frozen=True)
class NetworkDescription:
    """A U-Net as HiDiffusion needs to know it, read by a host from its own model.

    ``up_layers`` and ``up_cross_attention`` describe the up path, deepest stage first
    (the order in which the network runs it).
    """

    stages: tuple[Stage, ...]
    up_layers: tuple[int, ...]
    up_cross_attention: tuple[bool, ...]
    in_channels: int = 4
    cross_attention_dim: Optional[int] = None
    native: Optional[tuple[int, int]] = None  # native latent (height, width), when the host knows it
    name: str = "model"


@dataclass(frozen=True)
class ArchitectureRecord:
    """A family: how it is recognised and where HiDiffusion acts on it."""

    name: str  # the family's name where the cross-attention width names no more precise one
    kind: str  # selects the presets ("sd" or "sdxl")
    num_stages: int
    first_attention_stage: int
    conv_offset: int  # stage whose downsampler RAU-Net strides, counted from the first attention stage
    pool_offset: int  # stage whose first (resnet, attention) pair RAU-Net pools
    default_native: int  # native latent side when the model does not say
    families: dict[int, str] = field(default_factory=dict)  # cross-attention width -> family name
    description: str = ""


#: The known families. Order matters only when two records match one network.
REGISTRY: tuple[ArchitectureRecord, ...] = (
    ArchitectureRecord(
        "sd",
        "sd",
        num_stages=4,
        first_attention_stage=0,
        conv_offset=0,
        pool_offset=1,
        default_native=64,
        families={768: "sd1", 1024: "sd2"},
        description="SD 1.x/2.x: 4 stages, cross-attention in the first three",
    ),
    ArchitectureRecord(
        "sdxl",
        "sdxl",
        num_stages=3,
        first_attention_stage=1,
        conv_offset=0,
        pool_offset=0,
        default_native=128,
        description="SDXL: 3 stages, cross-attention in the last two",
    ),
    # The SDXL refiner: a fourth, deepest stage without attention below SDXL's layout.
    # HiDiffusion acts where it acts on SDXL: the first attention stage strides or pools
    # and its windows run at that stage's resolution.
    ArchitectureRecord(
        "sdxl-refiner",
        "sdxl",
        num_stages=4,
        first_attention_stage=1,
        conv_offset=0,
        pool_offset=0,
        default_native=128,
        description="SDXL refiner: 4 stages, cross-attention in the middle two",
    ),
)


#: What every refusal ends with: what to use instead.
SUPPORTED = (
    "Use a Stable Diffusion U-Net (SD 1.x, SD 2.x, SDXL, SDXL Turbo or a fine-tune of one), or run this model "
    "without HiDiffusion."
)


@dataclass(frozen=True)
class Architecture:
    """Where HiDiffusion acts on one network (indices into the down / up stages)."""

    family: str  # sd1, sd2, sd (other SD-layout widths), sdxl, sdxl-refiner
    kind: str  # selects the presets
    native: tuple[int, int]  # native latent size (height, width)
    num_stages: int
    conv_stage: int
    pool_stage: int
    window_stage: int
    inpainting: bool
    network: Optional[NetworkDescription] = None

    def kv_stages(self, levels: int) -> tuple[int, ...]:
        """The down stages whose self-attention key/value downsampling acts on at ``levels``
        (their mirrors too): the window stage, then the next lower-resolution stages. Raises
        ValueError when the network has no transformer stage there."""
        stages = tuple(range(self.window_stage, self.window_stage + levels))
        if self.network is not None:
            network = self.network
            for k in stages[1:]:
                up = self.up_index(k)
                if (
                    k >= len(network.stages)
                    or not network.stages[k].cross_attention
                    or up < 0
                    or not network.up_cross_attention[up]
                ):
                    raise ValueError(
                        f"kv_levels={levels}: this {self.family} network has no transformer blocks at down stage {k} "
                        f"and its mirror, the level below the top one; use kv_levels=1"
                    )
        return stages

    def up_index(self, down_index: int) -> int:
        """The up stage that mirrors down stage ``down_index`` (same resolution)."""
        return self.num_stages - 1 - down_index

    @property
    def unpool_layer(self) -> int:
        """The layer of the mirrored up stage after which a pooled map is grown back: the last
        one that still consumes a pooled skip (the up stage's final layer takes the previous
        stage's downsampler output, which was never pooled)."""
        if self.network is None:
            return 1
        return self.network.up_layers[self.up_index(self.pool_stage)] - 2


def recognise(network: NetworkDescription, registry: Sequence[ArchitectureRecord] = REGISTRY) -> Architecture:
    """The architecture of ``network``; raises :class:`UnsupportedModelError` naming what was found."""
    name, stages = network.name, network.stages
    attention = [k for k, s in enumerate(stages) if s.cross_attention]
    if not attention:
        other = [(k, s.other_attention) for k, s in enumerate(stages) if s.other_attention]
        found = f"stage {other[0][0]} has {other[0][1]}" if other else "none has attention"
        raise UnsupportedModelError(
            f"{name} has {len(stages)} down stages: {found}, and none has the cross-attention transformer blocks of "
            "a Stable Diffusion U-Net, "
            f"which HiDiffusion's windows and schedule are made for. {SUPPORTED}"
        )
    for record in registry:
        if len(stages) == record.num_stages and attention[0] == record.first_attention_stage:
            break
    else:
        known = "; ".join(r.description or r.kind for r in registry)
        raise UnsupportedModelError(
            f"{name} has {len(stages)} down stages with cross-attention at stages {attention}, a layout HiDiffusion "
            f"has no record for (it knows: {known}). {SUPPORTED}"
        )
    first = record.first_attention_stage
    conv_stage, pool_stage = first + record.conv_offset, first + record.pool_offset
    up_pool = record.num_stages - 1 - pool_stage
    problems = []
    if not stages[conv_stage].downsample:
        problems.append(f"stage {conv_stage} has no 3x3 stride-2 conv downsampler for RAU-Net to stride")
    if not stages[pool_stage].cross_attention:
        problems.append(f"stage {pool_stage} has no attention for RAU-Net to pool after")
    if len(network.up_layers) != record.num_stages or len(network.up_cross_attention) != record.num_stages:
        problems.append(f"the up path has {len(network.up_layers)} stages, not {record.num_stages}")
    elif network.up_layers[up_pool] < 2 or not network.up_cross_attention[up_pool]:
        problems.append(f"up stage {up_pool} needs two attention layers to undo RAU-Net's pooling")
    elif not network.up_cross_attention[record.num_stages - 1 - first]:
        problems.append(f"up stage {record.num_stages - 1 - first} has no attention for MSW-MSA")
    elif network.up_layers[up_pool] != stages[pool_stage].layers + 1:
        problems.append(
            f"up stage {up_pool} has {network.up_layers[up_pool]} layers where its down stage's "
            f"{stages[pool_stage].layers} skips need {stages[pool_stage].layers + 1}"
        )
    if problems:
        raise UnsupportedModelError(
            f"{name} looks like the {record.name} layout, but " + "; ".join(problems) + f". {SUPPORTED}"
        )
    native = network.native or (record.default_native, record.default_native)
    width = network.cross_attention_dim if network.cross_attention_dim is not None else -1
    return Architecture(
        family=record.families.get(width, record.name),
        kind=record.kind,
        native=(int(native[0]), int(native[1])),
        num_stages=record.num_stages,
        conv_stage=conv_stage,
        pool_stage=pool_stage,
        window_stage=first,
        inpainting=network.in_channels == 9,
        network=network,
    )
