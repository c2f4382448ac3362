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
    # its transformer blocks attend to the text in place of self-attention (diffusers' only_cross_attention,
    # ComfyUI's disable_self_attentions, as in the SD x4 upscaler): nothing there for MSW-MSA to window
    cross_only: bool = False


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
    # What the time embedding takes besides the timestep: "" nothing, "vector" (a vector projected
    # into it: SDXL's pooled text and size ids, unCLIP's image embedding), "class" (class labels, e.g.
    # the x4 upscaler's noise level), or another kind by its host's name; None where the host does not say.
    embedding: Optional[str] = None


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
    # The whole structure a network must have to be this family (empty: not checked). Widths,
    # layers per stage and transformer depths are not part of it: fine-tunes and distillations
    # change them and the placement follows the structure (see docs/reliability.md).
    attention_stages: tuple[int, ...] = ()  # down stages with cross-attention (the up path mirrors them)
    in_channels: tuple[int, ...] = ()
    embeddings: tuple[str, ...] = ()


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
        attention_stages=(0, 1, 2),
        # latents (4), depth-to-image (5), InstructPix2Pix (8), inpainting (9); 3: in pixel space (the toy model)
        in_channels=(3, 4, 5, 8, 9),
        embeddings=("",),
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
        attention_stages=(1, 2),
        in_channels=(4, 8, 9),  # latents, InstructPix2Pix, inpainting
        embeddings=("vector",),  # pooled text and size ids
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
        attention_stages=(1, 2),
        in_channels=(4,),
        embeddings=("vector",),  # pooled text, size ids and the aesthetic score
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
    candidates = [r for r in registry if len(stages) == r.num_stages and attention[0] == r.first_attention_stage]
    if not candidates:
        known = "; ".join(r.description or r.kind for r in registry)
        raise UnsupportedModelError(
            f"{name} has {len(stages)} down stages with cross-attention at stages {attention}, a layout HiDiffusion "
            f"has no record for (it knows: {known}). {SUPPORTED}"
        )
    mismatches = {r.name: structure_mismatches(network, r) for r in candidates}
    record = next((r for r in candidates if not mismatches[r.name]), None)
    if record is None:
        nearest = candidates[0]
        raise UnsupportedModelError(
            f"{name} is not a network HiDiffusion knows: by its layout it is nearest the {family_name(nearest)} "
            f"({nearest.description.partition(': ')[2] or nearest.kind}), but "
            + "; ".join(mismatches[nearest.name])
            + ". HiDiffusion's placement and presets are made for a family's whole structure, so it is not applied "
            f"to this one. {SUPPORTED}"
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
    if not problems and record.attention_stages:
        up = [k for k, a in enumerate(network.up_cross_attention) if a]
        expected = sorted(record.num_stages - 1 - k for k in record.attention_stages)
        if up != expected:
            problems.append(
                f"its up path has cross-attention at stages {up} where the {family_name(record)}'s has it at {expected}"
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


_EMBEDDINGS = {
    "": "nothing but the timestep",
    "vector": "a projected vector (as SDXL's pooled text and size ids)",
    "class": "class labels",
}


def family_name(record: ArchitectureRecord) -> str:
    return record.description.partition(":")[0] or record.name


def _either(values: Sequence[object]) -> str:
    words = [str(v) for v in values]
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]


def structure_mismatches(network: NetworkDescription, record: ArchitectureRecord) -> list[str]:
    """How ``network`` differs from the whole structure of ``record``'s family, in words (empty: it matches)."""
    family, stages, found = family_name(record), network.stages, []
    attention = [k for k, s in enumerate(stages) if s.cross_attention]
    if record.attention_stages and tuple(attention) != record.attention_stages:
        found.append(
            f"it has cross-attention at down stages {attention} where the {family} has it at "
            f"{list(record.attention_stages)}"
        )
    cross_only = [k for k, s in enumerate(stages) if s.cross_only]
    if cross_only:
        found.append(
            f"its transformer blocks at stages {cross_only} attend to the text in place of self-attention "
            "(as in the SD x4 upscaler), where MSW-MSA windows a self-attention"
        )
    if record.in_channels and network.in_channels not in record.in_channels:
        found.append(
            f"it takes {network.in_channels} input channels where the {family} takes {_either(record.in_channels)}"
        )
    if record.embeddings and network.embedding is not None and network.embedding not in record.embeddings:
        has = _EMBEDDINGS.get(network.embedding, f"a {network.embedding!r} embedding")
        wants = _either([_EMBEDDINGS.get(e, repr(e)) for e in record.embeddings])
        found.append(f"its time embedding takes {has} where the {family}'s takes {wants}")
    return found
