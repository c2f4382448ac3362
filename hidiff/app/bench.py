"""``hidiff bench``: what HiDiffusion costs and saves, side by side in one run.

Random-weight U-Nets built from the published configs (speed does not depend on the
weight values) run the denoising loop (U-Net + DDIM step) in each mode, interleaved
(baseline, hidiff, raunet, msw, published, baseline, ...) so that machine drift hits
every mode alike. Per mode: median seconds per step in each phase (RAU-Net active or
not), total time, speed-up over baseline, peak memory, and the FLOP count of the same
schedule (counted per step with torch's FlopCounterMode on a weightless copy of the
model), so that the measured speed-up stands next to the FLOP bound.

With ``model`` (``--model``: a hub id, diffusers folder or single file, loaded as
``hidiff generate`` loads it) the modes run that model's own U-Net, and its text
encoders and VAE are timed once each, on their own: their cost does not depend on the
mode, and it is what a whole generation adds to the loop.

The ``published`` mode runs the published ``hidiffusion`` package in another Python
(``--reference-python``; it needs diffusers 0.27.x) on the same saved weights and
inputs, timed by the same loop code (``timing.py``), in a subprocess that stays alive
and runs one repetition whenever its turn in the interleaving comes.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any, Optional

import torch

from ..diffusers import patch as adapter
from ..diffusers.testing import make_unet, tiny_unet_config
from ..diffusers.unet_configs import FULL_UNET_CONFIGS
from .args import (
    ALL,
    BASELINE,
    DEFAULT_BENCH_MODES,
    DTYPES,
    FAMILY_NAMES,
    HIDIFF_METHODS,
    PUBLISHED,
    add_kv_flag,
    add_method_flags,
    add_threads_flag,
    file_name,
    flag,
    image_side,
    names,
    non_negative,
    png_file,
    positive,
)
from .bench_published import PublishedRunner, sigterm_as_exit
from .reference import check_reference_python
from .timing import loop_flops, move, timed_loop, timed_phases

#: Mode name -> apply_hidiffusion options (None: stock U-Net); ``published`` (the published
#: package, run by ``--reference-python``) comes on top.
MODES: dict[str, Optional[dict]] = {BASELINE: None, **HIDIFF_METHODS}
#: What a plain ``hidiff bench`` runs (plus ``published`` given a reference Python): the
#: comparison a user asks for. The one-part modes are ablations, asked for by name or
#: with ``all``; at SD 1.5 1024x1024 batch 2 each costs minutes on a 2-core CPU.
DEFAULT_MODES = DEFAULT_BENCH_MODES


def kv_mode(factor: int, levels: int = 1) -> str:
    """The bench mode of hidiff with ``kv_downsample`` ``factor`` at ``levels`` (``hidiff-kv2``, ``hidiff-kv2-l2``)."""
    return f"hidiff-kv{factor}" + (f"-l{levels}" if levels > 1 else "")


#: hidiff with key/value downsampling: named in ``--modes`` or added by ``--kv-downsample`` / ``--kv-levels``.
KV_MODES: dict[str, dict] = {
    kv_mode(f, levels): {"kv_downsample": f, **({"kv_levels": levels} if levels > 1 else {})}
    for f in (2, 4)
    for levels in (1, 2)
}
#: Every mode; ``--modes`` may also name ``all`` (alone) for all of :data:`MODES` (the kv modes by name).
RUN_MODES = (*MODES, *KV_MODES, PUBLISHED)


def add_arguments(parser: Any) -> None:
    """The ``hidiff bench`` flags (their dests are :func:`run_bench`'s parameters)."""
    parser.add_argument("--family", choices=FAMILY_NAMES, help="random-weight U-Net of this family (default sd15)")
    parser.add_argument(
        "--model",
        help="a real model instead (hub id, diffusers folder or single file): its U-Net, "
        "and its text encoders and VAE timed on their own",
    )
    parser.add_argument(
        "--config",
        dest="config_folder",
        metavar="FOLDER",
        help="component configs for a single-file --model (a local diffusers folder)",
    )
    parser.add_argument("--width", type=flag(image_side), default=1024, help="a positive multiple of 8")
    parser.add_argument("--height", type=flag(image_side), default=1024, help="a positive multiple of 8")
    parser.add_argument("--steps", type=flag(positive), default=4)
    parser.add_argument(
        "--batch", type=flag(positive), default=2, help="U-Net batch (classifier-free guidance doubles it)"
    )
    parser.add_argument("--repeats", type=flag(positive), default=1)
    parser.add_argument(
        "--warmup",
        type=flag(non_negative),
        default=1,
        help="warm-up runs per mode (one step each; with --per-phase one call per phase)",
    )
    add_method_flags(parser, "--modes", (*MODES, *KV_MODES, ALL), ",".join(DEFAULT_MODES))
    add_kv_flag(parser)  # N > 1 adds the mode hidiff-kvN (with --kv-levels 2: hidiff-kvN-l2)
    parser.add_argument(
        "--per-phase",
        action="store_true",
        help="time one U-Net call per distinct phase of the schedule (RAU-Net / windows / kv state) and compose "
        "the run's time from the schedule, instead of running every step (docs/speed.md)",
    )
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N, mps, or auto")
    parser.add_argument("--dtype", default=DTYPES[0], choices=DTYPES)
    add_threads_flag(parser)
    parser.add_argument("--tiny", action="store_true", help="tiny widths (for a quick check, not for timing)")
    parser.add_argument(
        "--json",
        nargs="?",
        const="-",
        type=file_name,
        metavar="FILE",
        help="print JSON instead of the table; with FILE: write it there and print the table",
    )
    parser.add_argument(
        "--plot", metavar="FILE.png", type=png_file, help="also write a chart of the times and speed-ups"
    )


def _inputs(config: dict, batch: int, latent: tuple[int, int]) -> dict:
    """The loop's inputs, on the CPU in float32 (saved as such for the published mode)."""
    g = torch.Generator().manual_seed(0)
    inputs = {"sample": torch.randn(batch, config.get("in_channels", 4), *latent, generator=g)}
    inputs["encoder_hidden_states"] = torch.randn(batch, 77, config["cross_attention_dim"], generator=g)
    if config.get("addition_embed_type") == "text_time":
        pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
        h, w = 8 * latent[0], 8 * latent[1]
        inputs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, pooled, generator=g),
            "time_ids": torch.tensor([[h, w, 0, 0, h, w]] * batch, dtype=torch.float32),
        }
    return inputs


def count_flops(config: dict, options: Optional[dict], batch: int, latent: tuple[int, int], steps: int) -> dict:
    """FLOPs of one loop under a mode: one weightless (meta) U-Net call per distinct phase.

    ``by_module`` has each step's count per module path (``"down_blocks.0.downsamplers.0"``;
    ``""`` is the whole U-Net call), ``per_step`` the whole calls, ``total`` their sum.
    """
    from diffusers import DDIMScheduler, UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    scheduler = DDIMScheduler()

    def phase_key(t: Any) -> Any:
        patch = adapter.get_patch(unet)
        if patch is None:
            return "stock"
        progress = patch.run_state().tracker.locate(t, scheduler)
        plan = patch.plan(latent, progress.index, progress.total)
        return plan.conv, plan.pool

    if options is not None:
        # window shifts do not change the count; a fixed seed avoids reading meta values
        adapter.apply_hidiffusion(unet, scheduler=scheduler, window_seed=0, **options)
    by_module = loop_flops(unet, scheduler, move(_inputs(config, batch, latent), "meta"), steps, phase_key)
    per_step = [step[""] for step in by_module]
    return {"total": sum(per_step), "per_step": per_step, "by_module": by_module}


#: The family name a loaded model is benchmarked (and shown to the published package) as.
_LAYOUT_FAMILIES = {"sd1": "sd15", "sd2": "sd21", "sd": "sd15", "sdxl": "sdxl", "sdxl-refiner": "sdxl-refiner"}


def load_model(model: str, config_folder: Optional[str], dtype: torch.dtype) -> tuple[Any, str]:
    """A real pipeline (hub id, folder or single file, as ``hidiff generate`` loads it) and its family name."""
    from ..diffusers.model import detect_architecture, find_unet
    from .loading import load_base_pipeline, torch_dtype_accepted

    with torch_dtype_accepted():
        pipe = load_base_pipeline(model, config_folder, dtype)
    layout = detect_architecture(find_unet(pipe)[0])
    return pipe, _LAYOUT_FAMILIES[layout.family]


def time_components(pipe: Any, batch: int, latent: tuple[int, int], device: torch.device, dtype: torch.dtype) -> dict:
    """Seconds of the text encoders on ``batch`` prompts (what classifier-free guidance gives
    the U-Net: the negative and positive prompt of batch / 2 images) and of the VAE decoding
    batch / 2 latents of the benchmark's size; each once, after a one-prompt / one-small-latent warm-up."""

    images = max(1, batch // 2)
    prompts = ["a photograph of a lighthouse on a cliff at dusk"] * batch
    encoders = [
        (getattr(pipe, t, None), getattr(pipe, e, None))
        for t, e in (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"))
    ]
    encoders = [(t, e.to(device)) for t, e in encoders if t is not None and e is not None]

    def encode(texts: list) -> None:
        for tokenizer, encoder in encoders:
            ids = tokenizer(
                texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
            ).input_ids
            encoder(ids.to(device))

    vae = getattr(pipe, "vae", None)  # None: a pixel-space model (the toy) decodes nothing
    vae = vae.to(device, dtype) if vae is not None else None
    g = torch.Generator().manual_seed(0)

    def decode(n: int, size: tuple[int, int]) -> None:
        if vae is None:
            return
        z = torch.randn(n, vae.config.latent_channels, *size, generator=g).to(device, dtype)
        vae.decode(z / vae.config.scaling_factor)

    with torch.no_grad():
        encode(prompts[:1])
        decode(1, (8, 8))
        start = time.perf_counter()
        encode(prompts)
        text_s = time.perf_counter() - start
        start = time.perf_counter()
        decode(images, latent)
        vae_s = time.perf_counter() - start
    return {
        "text_encoders_s": text_s,
        "prompts": batch,
        "text_encoders": len(encoders),
        "vae_decode_s": vae_s,
        "images": images,
    }


def run_bench(
    family: Optional[str] = None,
    height: int = 1024,
    width: int = 1024,
    steps: int = 4,
    batch: int = 2,
    repeats: int = 1,
    warmup: int = 1,
    modes: Optional[tuple] = None,
    device: str = "cpu",
    dtype: str = "float32",
    tiny: bool = False,
    reference_python: Optional[str] = None,
    model: Optional[str] = None,
    config_folder: Optional[str] = None,
    kv_downsample: Optional[int] = None,
    per_phase: bool = False,
    kv_levels: Optional[int] = None,
) -> dict:
    """Time each mode side by side; the result is what ``hidiff bench --json`` prints.

    ``modes`` defaults to :data:`DEFAULT_MODES`; ``("all",)`` is every mode (``published``
    only with ``reference_python``, which adds it to either). ``family`` (default ``sd15``)
    picks a random-weight U-Net; ``model`` a real one instead (not both). ``kv_downsample``
    2 or 4 adds the mode ``hidiff-kv2`` / ``hidiff-kv4``: hidiff with key/value downsampling
    (``kv_levels`` 2: ``hidiff-kv2-l2``, also one stage deeper); the kv modes can also be named
    in ``modes``.
    ``per_phase``: each step's time is that of one U-Net call (plus the scheduler step) timed
    once per distinct phase (:func:`_phase_run`), so a long schedule costs a few calls.
    """
    if model is not None and (family is not None or tiny):
        raise ValueError("give --model (a real model) or --family/--tiny (a random-weight U-Net), not both")
    if config_folder is not None and model is None:
        raise ValueError("--config gives the component configs of a single-file --model; it needs --model")
    family = family or "sd15"
    modes = _check(family, height, width, steps, repeats, warmup, modes, reference_python)
    modes = _with_kv_mode(modes, kv_downsample, kv_levels)
    dev, dt = torch.device(device), getattr(torch, dtype)
    from .loading import pixels_per_cell

    cell = pixels_per_cell(model) if model is not None else 8
    latent = (height // cell, width // cell)
    bench = _bench_unet(family, model, config_folder, tiny, batch, latent, dev, dt)
    runs = Runs(bench, modes, batch, latent, steps, per_phase, reference_python, device, dtype)
    with sigterm_as_exit(), runs:
        samples = runs.interleaved(steps, warmup, repeats)
    setting = {"tiny": tiny, "height": height, "width": width, "steps": steps, "batch": batch, "repeats": repeats}
    result = _result(bench, setting, warmup, dev, dtype, per_phase, samples, runs)
    if bench.components is not None:
        result["model"] = model
    return result


def _result(
    bench: BenchUNet,
    setting: dict,
    warmup: int,
    device: torch.device,
    dtype: str,
    per_phase: bool,
    samples: dict[str, list],
    runs: Runs,
) -> dict:
    """What ``hidiff bench --json`` prints: the setting, each mode's summary, and what the real model's
    other parts and the published package reported."""
    result = {
        "family": bench.family,
        **setting,
        "warmup": warmup,
        "device": str(device),
        "dtype": dtype,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "per_phase": per_phase,
        "modes": _compare(samples, runs.flops),
    }
    if bench.components is not None:
        result["unet_parameters"] = sum(p.numel() for p in bench.unet.parameters())
        result["components"] = bench.components
    if runs.published is not None:
        result["published"] = {**runs.published.info, "unet_calls": [s["unet_calls"] for s in samples[PUBLISHED]]}
    return result


def _with_kv_mode(modes: tuple, kv_downsample: Optional[int], kv_levels: Optional[int]) -> tuple:
    """``modes`` with the kv mode that --kv-downsample / --kv-levels ask for."""
    if kv_levels is not None and kv_levels > 1 and (kv_downsample or 1) == 1:
        raise ValueError("--kv-levels 2 says where key/value downsampling acts: give --kv-downsample 2 or 4 with it")
    if kv_downsample is not None and kv_downsample > 1:
        modes = tuple(dict.fromkeys((*modes, kv_mode(kv_downsample, kv_levels or 1))))
    return modes


@dataclass
class BenchUNet:
    """The U-Net every mode runs, its config and family, and a real model's other parts' times."""

    unet: Any
    config: dict
    family: str
    components: Optional[dict] = None


def _bench_unet(
    family: str,
    model: Optional[str],
    config_folder: Optional[str],
    tiny: bool,
    batch: int,
    latent: tuple[int, int],
    device: torch.device,
    dtype: torch.dtype,
) -> BenchUNet:
    """A real model's U-Net (its text encoders and VAE timed once), or a random-weight one of ``family``."""
    if model is not None:
        pipe, family = load_model(model, config_folder, dtype)
        unet = pipe.unet.to(device, dtype).eval()
        return BenchUNet(unet, dict(unet.config), family, time_components(pipe, batch, latent, device, dtype))
    config = tiny_unet_config(family) if tiny else dict(FULL_UNET_CONFIGS[family])
    return BenchUNet(make_unet(config, dtype=dtype).to(device), config, family)


class Runs:
    """One timed run per mode over the same U-Net and inputs (the published mode in its own Python),
    with each mode's FLOPs per step; a context that ends the published runner however it is left."""

    def __init__(
        self,
        bench: BenchUNet,
        modes: tuple,
        batch: int,
        latent: tuple[int, int],
        steps: int,
        per_phase: bool,
        reference_python: Optional[str],
        device: str,
        dtype: str,
    ) -> None:
        self.modes, self.per_phase = modes, per_phase
        self.config, self.batch, self.latent, self.steps = bench.config, batch, latent, steps
        self.cpu_inputs = _inputs(bench.config, batch, latent)
        self.inputs = move(self.cpu_inputs, torch.device(device), getattr(torch, dtype))
        self.unet, self.family = bench.unet, bench.family
        self.reference = (reference_python, device, dtype)
        self.published: Optional[PublishedRunner] = None
        self.flops: dict[str, list] = {}
        self.runs: dict[str, Any] = {}

    def __enter__(self) -> Runs:
        try:
            self._start()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _start(self) -> None:
        from diffusers import DDIMScheduler

        python, device, dtype = self.reference
        if PUBLISHED in self.modes:
            assert python is not None
            self.published = PublishedRunner(python, self.family, self.unet, self.cpu_inputs, self.steps, device, dtype)
        # counted while the runner loads: its FLOPs come with its ready message
        for m in self.modes:
            if m != PUBLISHED:
                self.flops[m] = count_flops(self.config, mode_options(m), self.batch, self.latent, self.steps)[
                    "per_step"
                ]
        scheduler, local = DDIMScheduler(), _phase_run if self.per_phase else _local_run
        for m in self.modes:
            self.runs[m] = local(m, self.unet, scheduler, self.inputs) if m != PUBLISHED else self._published_run
        if self.published is not None:
            self.flops[PUBLISHED] = self.published.info["flops_per_step"]

    def _published_run(self, steps: int) -> dict:
        assert self.published is not None
        return self.published.run(steps, per_phase=self.per_phase)

    def __exit__(self, kind: Any, error: Any, trace: Any) -> None:
        if self.published is not None:
            self.published.close(kill=kind is not None)

    def interleaved(self, steps: int, warmup: int, repeats: int) -> dict[str, list]:
        """Each mode's samples: ``repeats`` timed runs of ``steps``, the modes interleaved, after
        ``warmup`` untimed runs each."""
        # warm-up: first calls pay for allocation and kernel selection. Per phase, one pass
        # calls every phase once: a one-step warm-up would warm only the first phase, and a
        # cold phase's time is multiplied by its number of steps
        for m in self.modes:
            for _ in range(warmup):
                self.runs[m](steps if self.per_phase else 1)
        # Every other repetition runs the modes in reverse order: this machine's speed drifts
        # by 5% to 20% over minutes, and a fixed order would hand that drift to the later modes
        samples: dict[str, list] = {m: [] for m in self.modes}
        for r in range(repeats):
            for m in self.modes if r % 2 == 0 else self.modes[::-1]:
                samples[m].append(self.runs[m](steps))
        return samples


def _compare(samples: dict[str, list], flops: dict[str, list]) -> dict[str, dict]:
    """Each mode's summary, with its speed-up over the baseline, measured and by FLOPs."""
    results = {m: _summary(samples[m], flops[m]) for m in samples}
    base = results[BASELINE]
    for r in results.values():
        r["speedup"] = base["total_s"] / r["total_s"]
        r["flop_speedup"] = base["flops"] / r["flops"]
    return results


def _check(
    family: str,
    height: int,
    width: int,
    steps: int,
    repeats: int,
    warmup: int,
    modes: Optional[tuple],
    reference_python: Optional[str],
) -> tuple:
    """The modes to run, baseline first; ValueError for input the user has to fix."""
    names([family], FAMILY_NAMES, "family")
    if height <= 0 or width <= 0 or height % 8 or width % 8:
        raise ValueError(f"height and width must be positive multiples of 8, got {height}x{width}")
    if steps < 1 or repeats < 1 or warmup < 0:
        raise ValueError(
            f"steps and repeats must be at least 1 and warmup at least 0, got {steps}, {repeats}, {warmup}"
        )
    if modes is None or tuple(modes) == (ALL,):
        modes = (DEFAULT_MODES if modes is None else tuple(MODES)) + ((PUBLISHED,) if reference_python else ())
    names(modes, RUN_MODES, "mode")
    if PUBLISHED in modes:
        check_reference_python(reference_python, f"mode {PUBLISHED!r}")
    return (BASELINE,) + tuple(m for m in dict.fromkeys(modes) if m != BASELINE)


def _local_run(mode: str, unet: Any, scheduler: Any, inputs: dict) -> Any:
    options = mode_options(mode)

    def run(steps: int) -> dict:
        if options is not None:
            adapter.apply_hidiffusion(unet, scheduler=scheduler, window_seed=0, **options)
        try:
            return timed_loop(unet, scheduler, inputs, steps)
        finally:
            adapter.remove_hidiffusion(unet)

    return run


def _phase_run(mode: str, unet: Any, scheduler: Any, inputs: dict) -> Any:
    """Like :func:`_local_run`, but one timed U-Net call (and scheduler step) per distinct phase:
    the plan's (conv, pool, windows, kv) of each step; every step of a phase gets that time."""
    options = mode_options(mode)

    def run(steps: int) -> dict:
        x = inputs["sample"]
        latent = (int(x.shape[-2]), int(x.shape[-1]))
        if options is not None:
            adapter.apply_hidiffusion(unet, scheduler=scheduler, window_seed=0, **options)
        try:
            scheduler.set_timesteps(steps)
            patch = adapter.get_patch(unet)
            plans = [patch.plan(latent, i, steps) if patch is not None else None for i in range(steps)]
            keys = [(p.conv, p.pool, p.windows, p.kv) if p is not None else "stock" for p in plans]
            return timed_phases(unet, scheduler, inputs, steps, keys)
        finally:
            adapter.remove_hidiffusion(unet)

    return run


def mode_options(mode: str) -> Optional[dict]:
    """apply_hidiffusion options of a local mode (None: the stock U-Net)."""
    if mode in KV_MODES:
        return KV_MODES[mode]
    return MODES[mode]


def _summary(samples: list, flops_per_step: list) -> dict:
    per_phase = {}
    for name, active in (("rau", True), ("plain", False)):
        values = [t for s in samples for t, p in zip(s["times"], s["phases"]) if p == active]
        per_phase[name] = statistics.median(values) if values else None
    totals = [sum(s["times"]) for s in samples]
    return {
        "total_s": statistics.median(totals),
        "totals_s": totals,
        "step_s": per_phase,
        "rau_steps": sum(samples[0]["phases"]),
        "peak_memory_bytes": max(s["peak"] for s in samples),
        "flops": sum(flops_per_step),
    }
