"""Peak memory of a run, estimated from the network's structure and HiDiffusion's plan.

Pure arithmetic, nothing runs. The U-Net's forward is walked layer by layer as the
inference-mode forward of diffusers keeps its tensors: the skip connections held for
the up path (at the sizes the :class:`~hidiff.core.planner.Plan` gives, so RAU-Net's
strided conv and pooling shrink them), plus the working set of the layer running now
(a resnet's norm/activation/conv maps, a transformer block's feed-forward, attention
scores where the backend materialises them). The largest sum over the walk, over the
run's phases (RAU-Net on, windows only, plain), is the U-Net's activation peak. The VAE
decode is walked the same way (in one piece, or one tile with the tiles kept), and the
weights are their parameters times the bytes of their dtype.

Attention backends:

* ``"flash"``: a fused kernel that never holds the score matrix (PyTorch's
  scaled-dot-product attention with a flash or memory-efficient kernel: CUDA fp16/bf16,
  CPU without a mask; what diffusers uses by default on torch 2);
* ``"math"``: the scores and their softmax held in full (B x heads x N x N per block;
  windows divide N by 4 and multiply the batch by 4, key/value downsampling divides the
  key count);
* ``"sliced"``: diffusers' attention slicing, the scores of one head of one image at a time.

The coefficients (maps held per layer kind) were fitted to, and are validated against,
allocator peaks measured on CPU (``tools/memory_validate.py``; docs/memory.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional

from .architecture import Architecture, Stage
from .config import HiDiffusionConfig
from .planner import Plan, Progress, Task, plan_call

Size = tuple[int, int]

ATTENTION_BACKENDS = ("flash", "math", "sliced")

#: Working set of a resnet beyond its input, in maps of its widest side (norm, activation, conv out).
RESNET_MAPS = 2.6
#: Working set of a transformer block beyond its input: the feed-forward (GEGLU: 8C projection,
#: 4C activation, 4C product) plus the normalised input, in maps of the block's width.
FEED_FORWARD_MAPS = 21.0
#: Working set of self-attention beyond the block's input (norm, q, k, v, output and its copy).
ATTENTION_MAPS = 6.0
#: Score matrices held at once by a materialising backend (scores and softmax).
SCORE_COPIES = 2.0
#: Text tokens attended by cross-attention (CLIP's 77).
TEXT_TOKENS = 77


@dataclass(frozen=True)
class UNetShape:
    """What the estimate needs of a U-Net beyond :class:`~hidiff.core.architecture.NetworkDescription`:
    per down stage the transformer depth and head count, the mid block's, and the parameter count."""

    depths: tuple[int, ...]  # transformer blocks per attention layer, per down stage (0: no attention)
    heads: tuple[int, ...]  # attention heads per down stage
    mid_depth: int
    mid_heads: int
    params: int
    out_channels: int = 4
    up_depths: Optional[tuple[int, ...]] = None  # per up stage, deepest first (default: the mirrored down depths)


@dataclass(frozen=True)
class VAEShape:
    """The decoder of a VAE: its widths (encoder order, as in diffusers' ``block_out_channels``),
    resnets per block, parameter count, whether it decodes in float32 whatever the model's dtype
    (SDXL's ``force_upcast``), and the tile side of tiled decoding, in pixels."""

    channels: tuple[int, ...]
    layers: int
    params: int
    upcast: bool = False
    tile: int = 512
    tile_overlap: float = 0.25
    out_channels: int = 3


#: Decoders and text encoders of the families (their public configs).
SD_VAE = VAEShape(channels=(128, 256, 512, 512), layers=2, params=83_653_863, tile=512)
SDXL_VAE = VAEShape(channels=(128, 256, 512, 512), layers=2, params=83_653_863, upcast=True, tile=1024)
TEXT_ENCODER_PARAMS = {"sd1": 123_060_480, "sd2": 340_387_840, "sdxl": 123_060_480 + 694_659_840}


@dataclass(frozen=True)
class Estimate:
    """Peak memory of one run, in bytes, by part (``peak`` is what the device must hold)."""

    weights: int
    unet: int  # the U-Net's activation peak over the run
    vae: int  # the decode's peak (beyond the VAE's weights)
    unet_by_phase: dict[str, int] = field(default_factory=dict)
    unet_by_stage: dict[str, int] = field(default_factory=dict)  # at the worst phase: peak while each stage runs
    offload: bool = False  # weights of the other models off the device while one runs

    @property
    def peak(self) -> int:
        return self.weights + max(self.unet, self.vae)


def _tokens(size: Size) -> int:
    return size[0] * size[1]


def unet_activation_elements(
    arch: Architecture,
    shape: UNetShape,
    plan: Plan,
    batch: int,
    attention: str = "flash",
    windows: bool = False,
) -> tuple[int, dict[str, int]]:
    """Peak elements held during one U-Net call of ``plan`` (the skips at the plan's sizes plus the
    working set of the running layer), and the peak while each stage runs ("down.K", "mid", "up.K")."""
    if attention not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend {attention!r}: choose one of {', '.join(ATTENTION_BACKENDS)}")
    network = arch.network
    if network is None:
        raise ValueError("the memory estimate needs the architecture's network description")
    stages = network.stages
    if len(shape.depths) != len(stages) or len(shape.heads) != len(stages):
        raise ValueError(f"depths and heads need one entry per down stage ({len(stages)})")
    by_stage: dict[str, int] = {}
    held: list[int] = []
    peak = 0
    window_stages = {arch.window_stage} if windows else set()
    up_window = arch.up_index(arch.window_stage) if windows else -1

    def at(name: str, transient: float) -> None:
        nonlocal peak
        value = int(sum(held) + transient)
        peak = max(peak, value)
        by_stage[name] = max(by_stage.get(name, 0), value)

    def attention_work(c: int, n: int, heads: int, windowed: bool) -> float:
        # self-attention: the score matrix where the backend keeps it
        work = ATTENTION_MAPS * c * n * batch
        keys = n // (plan.kv * plan.kv) if windowed or plan.kv > 1 else n
        if windowed:
            keys = keys // 4
            queries_per_window, groups = n // 4, 4
        else:
            queries_per_window, groups = n, 1
        if attention == "math":
            work += SCORE_COPIES * batch * heads * groups * queries_per_window * keys
        elif attention == "sliced":
            work += SCORE_COPIES * queries_per_window * keys
        if attention != "flash":
            work = max(work, ATTENTION_MAPS * c * n * batch + SCORE_COPIES * batch * heads * n * TEXT_TOKENS)
        return work

    def transformer(name: str, c: int, n: int, depth: int, heads: int, windowed: bool) -> None:
        if depth == 0:
            return
        x = c * n * batch
        # the block input stays as the transformer's residual; its blocks' working sets come on top
        at(name, x + x + max(FEED_FORWARD_MAPS * x, attention_work(c, n, heads, windowed)))

    skip_sizes = list(plan.skip_sizes)
    k_skip = 0
    c_in = stages[0].channels
    n = _tokens(skip_sizes[0])
    held.append(c_in * n * batch)  # conv_in's output, the first skip
    k_skip = 1
    for k, stage in enumerate(stages):
        c = stage.channels
        for _ in range(stage.layers):
            size = skip_sizes[k_skip]
            n_out = _tokens(size)
            # the resnet reads the previous output (held as a skip) and writes at the (maybe pooled) size
            at(f"down.{k}", RESNET_MAPS * max(c, c_in) * max(n, n_out) * batch)
            n = n_out
            transformer(
                f"down.{k}", c, n, shape.depths[k] if stage.cross_attention else 0, shape.heads[k], k in window_stages
            )
            held.append(c * n * batch)
            c_in = c
            k_skip += 1
        if stage.downsample:
            n = _tokens(skip_sizes[k_skip])
            at(f"down.{k}", c * n * batch)
            held.append(c * n * batch)
            k_skip += 1
    # mid block: resnet, transformer, resnet at the deepest size
    c = stages[-1].channels
    at("mid", RESNET_MAPS * c * n * batch)
    transformer("mid", c, n, shape.mid_depth, shape.mid_heads, False)
    at("mid", c * n * batch + RESNET_MAPS * c * n * batch)
    x = c * n * batch
    # up path, deepest first: each up stage holds its skips until it returns
    n_up = len(stages)
    up_depths = shape.up_depths or tuple(reversed(shape.depths))
    for u in range(n_up):
        k = n_up - 1 - u
        c = stages[k].channels
        count = network.up_layers[u]
        mine = held[-count:]
        del held[-count:]
        held.extend(mine)  # still held by the block
        for j in range(count):
            skip = mine[-1 - j]
            # the skip's tokens: its elements over its channels (the previous stage's width for the first)
            skip_channels = _skip_channels(stages, k, j, count)
            n = skip // (skip_channels * batch)
            x_channels = x // (n * batch) if n else c
            cat = x + skip
            at(f"up.{u}", x + cat + RESNET_MAPS * max(c, x_channels + skip_channels) * n * batch)
            x = c * n * batch
            depth = up_depths[u] if network.up_cross_attention[u] else 0
            transformer(f"up.{u}", c, n, depth, shape.heads[k], u == up_window)
        del held[-count:]
        if u < n_up - 1:
            n_next = _tokens(plan.downsample_inputs[k - 1]) if k - 1 < len(plan.downsample_inputs) else 4 * n
            # nearest-neighbour interpolate, then a conv at the larger size
            at(f"up.{u}", x + 2 * c * n_next * batch)
            x = c * n_next * batch
    at(f"up.{n_up - 1}", x + 2 * stages[0].channels * n * batch)  # norm_out, activation
    return peak, by_stage


def _skip_channels(stages: tuple[Stage, ...], k: int, j: int, count: int) -> int:
    """Width of the j-th skip (popped order) an up stage mirroring down stage k concatenates:
    its own stage's layers, then the previous stage's output (its downsampler's input width)."""
    if j < count - 1:
        return int(stages[k].channels)
    return int(stages[k - 1].channels) if k > 0 else int(stages[0].channels)


def vae_decode_elements(vae: VAEShape, height: int, width: int, batch: int, tiled: bool = False) -> int:
    """Peak elements of decoding ``batch`` images of ``height`` x ``width`` pixels (in one piece, or
    tiled: one tile at a time, every decoded tile kept until they are blended into the output)."""
    if tiled and (height > vae.tile or width > vae.tile):
        tile = vae_decode_elements(vae, min(height, vae.tile), min(width, vae.tile), 1, tiled=False)
        stride = vae.tile * (1 - vae.tile_overlap)
        rows = -(-height // int(stride))
        cols = -(-width // int(stride))
        kept = rows * cols * vae.tile * vae.tile * vae.out_channels * batch
        out = height * width * vae.out_channels * batch
        return int(max(tile + kept, kept + out))
    levels = len(vae.channels)
    factor = 2 ** (levels - 1)
    peak = 0
    for i, c in enumerate(reversed(vae.channels)):
        side_h, side_w = height * 2**i // factor, width * 2**i // factor
        n = side_h * side_w
        prev = list(reversed(vae.channels))[i - 1] if i else c
        # a resnet on the upsampled input (input, norm, activation, conv), or the upsampler's interpolate + conv
        peak = max(peak, (prev + RESNET_MAPS * max(c, prev)) * n * batch)
        if i:
            peak = max(peak, 2 * prev * n * batch)
    return int(peak)


def dtype_bytes(dtype: str) -> int:
    return {"float32": 4, "float16": 2, "bfloat16": 2}[dtype]


def phase_plans(
    arch: Architecture, latent: Size, config: HiDiffusionConfig, steps: int, task: Task = Task()
) -> dict[str, Plan]:
    """One plan per distinct phase of a run: {"conv", "pool", "windows", "plain"} -> its first plan."""
    phases: dict[str, Plan] = {}
    for i in range(steps):
        plan = plan_call(arch, latent, config, Progress(i, steps), task)
        name = "conv" if plan.conv else "pool" if plan.pool else "windows" if plan.windows else "plain"
        phases.setdefault(name, plan)
    return phases


def estimate(
    arch: Architecture,
    shape: UNetShape,
    height: int,
    width: int,
    batch: int = 1,
    dtype: str = "float16",
    config: Optional[HiDiffusionConfig] = None,
    steps: int = 50,
    guidance: bool = True,
    attention: str = "flash",
    vae: Optional[VAEShape] = None,
    vae_tiling: bool = False,
    text_params: int = 0,
    pixels_per_latent: int = 8,
    offload: bool = False,
    task: Task = Task(),
) -> Estimate:
    """The peak of one run: ``config`` None runs without HiDiffusion; ``guidance`` doubles the U-Net's batch
    (classifier-free guidance); ``offload``: only the largest model's weights on the device at a time."""
    e = dtype_bytes(dtype)
    latent = (height // pixels_per_latent, width // pixels_per_latent)
    unet_batch = batch * (2 if guidance else 1)
    off = replace(HiDiffusionConfig(), raunet=False, window_attn=False)
    plans = phase_plans(arch, latent, config or off, steps, task)
    by_phase, by_stage, worst = {}, {}, -1
    for name, plan in plans.items():
        windows = plan.windows and config is not None
        elements, stages = unet_activation_elements(arch, shape, plan, unet_batch, attention, windows)
        by_phase[name] = elements * e
        if elements * e > worst:
            worst, by_stage = elements * e, {k: v * e for k, v in stages.items()}
    unet = max(by_phase.values())
    vae_bytes = 0
    vae_weights = 0
    if vae is not None:
        ve = 4 if vae.upcast else e
        vae_bytes = vae_decode_elements(vae, height, width, batch, vae_tiling) * ve
        vae_weights = vae.params * ve  # an upcast VAE is converted to float32 for the decode
    parts = [shape.params * e, text_params * e, vae_weights]
    weights = max(parts) if offload else sum(parts)
    return Estimate(
        weights=int(weights),
        unet=int(unet),
        vae=int(vae_bytes),
        unet_by_phase=by_phase,
        unet_by_stage=by_stage,
        offload=offload,
    )
