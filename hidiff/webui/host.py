"""The WebUI side of the extension: where the U-Net is in each WebUI, and one sampling run.

The three WebUIs (AUTOMATIC1111 v1.10, Forge, reForge) share A1111's sampling front end:
a per-generation sampler object ``p.sampler`` whose sampling function ``p.sampler.func``
is called once per sampling (txt2img, the hires-fix pass, img2img) with the CFG denoiser,
the starting latent and the sigmas (k-diffusion samplers) or timesteps (DDIM/PLMS/UniPC)
it really samples. :func:`prepare_sampling` wraps that function on this generation's
sampler object only: the wrapper builds a :class:`hidiff.webui.patch.SamplingRun` from
those arguments, installs it on the U-Net and removes it in a ``finally``. Where the
U-Net lives differs per WebUI (:func:`find_unet`); nothing else does.

Nothing here imports a WebUI module: ``p`` is duck-typed, so the glue is testable alone.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
from collections.abc import Sequence
from typing import Any, Callable, Optional

from ..core.architecture import UnsupportedModelError
from ..core.compose import check_composition
from .options import WHERE, Settings

LOG = logging.getLogger("hidiff.webui")
#: Set to a file path to have each sampling run's per-call records appended there as JSON lines
#: (the end-to-end tests read it; off by default).
RECORD_ENV = "HIDIFF_WEBUI_RECORD"


def which_webui(sd_model: Any) -> str:
    """ "forge", "reforge" or "a1111", from where the loaded model keeps its U-Net."""
    objects = getattr(sd_model, "forge_objects", None)
    if objects is None:
        return "a1111"
    module = type(getattr(objects, "unet", None)).__module__
    return "forge" if module.startswith("backend") else "reforge"


def find_unet(sd_model: Any) -> tuple[Any, bool, str]:
    """(U-Net module, v-prediction, model name) of the loaded model in any of the three WebUIs."""
    objects = getattr(sd_model, "forge_objects", None)
    if objects is not None:  # Forge and reForge: the patcher's model holds the U-Net
        model = getattr(objects.unet, "model", None)
        unet = getattr(model, "diffusion_model", None)
        predictor = getattr(model, "predictor", None)  # Forge's k-prediction
        v_pred = getattr(predictor, "prediction_type", "") == "v_prediction"
        v_pred = v_pred or getattr(getattr(model, "model_type", None), "name", "") in (
            "V_PREDICTION",
            "V_PREDICTION_EDM",
        )
        name = type(getattr(model, "model_config", None) or model).__name__
    else:  # AUTOMATIC1111: ldm's / sgm's wrapper around the U-Net
        unet = getattr(getattr(sd_model, "model", None), "diffusion_model", None)
        v_pred = getattr(sd_model, "parameterization", "eps") == "v"
        name = type(sd_model).__name__
    if unet is None:
        raise UnsupportedModelError(
            f"HiDiffusion: the loaded model ({type(sd_model).__name__}) has no U-Net. HiDiffusion is for SD 1.x, "
            "SD 2.x and SDXL; the image is generated without it."
        )
    return unet, v_pred, name


def image_seeds_of(noise: Any) -> list[int]:
    from ..core.ops import image_seeds

    return image_seeds(noise) if noise is not None and getattr(noise, "ndim", 0) == 4 else []


def prepare_sampling(
    p: Any,
    settings: Settings,
    noise: Any,
    notify: Callable[[str], None],
    recorder: Optional[Callable[[Any], None]] = None,
    opts: Any = None,
) -> bool:
    """Wrap this generation's sampling function so HiDiffusion runs inside it (True when it will).

    A model HiDiffusion is not for is announced through ``notify`` and left alone; a config the
    library refuses, or another patch it cannot run beside (:func:`other_patches`, read when the
    sampling starts, after every script has patched), makes the sampling raise its message (the
    WebUI answers with that error). ``opts``: the WebUI's settings (``modules.shared.opts``).
    """
    sampler = getattr(p, "sampler", None)
    func = getattr(sampler, "func", None)
    if func is None:
        notify("HiDiffusion: this WebUI's sampler has no sampling function to wrap; generating without HiDiffusion.")
        return False
    original = getattr(func, "__hidiff_original__", func)
    if settings.config is None:
        return False
    from .structure import describe

    try:
        unet, v_prediction, name = find_unet(p.sd_model)
        network = describe(unet, v_prediction, name)
        settings.config.check_ratios(network.architecture.kind)
        network.architecture.kv_stages(settings.config.kv_levels)
    except UnsupportedModelError as e:
        notify(str(e))
        return False
    except ValueError as e:
        _refuse(sampler, original, f"HiDiffusion: {e}")
        return True
    config = settings.config
    seeds = image_seeds_of(noise)
    sink = os.environ.get(RECORD_ENV)

    @functools.wraps(original)
    def sampling(model: Any, x: Any, *args: Any, **kwargs: Any) -> Any:
        from .patch import SamplingRun

        timesteps = kwargs.get("timesteps")
        schedule = kwargs.get("sigmas") if timesteps is None else timesteps
        if schedule is None:
            schedule = solver_levels(kwargs, getattr(p, "steps", None))
        if schedule is None:
            notify("HiDiffusion: this sampler does not say which sigmas it samples; generating without HiDiffusion.")
            return original(model, x, *args, **kwargs)
        resizers, token_patches = other_patches(p, opts)
        check_composition(config, resizers=resizers, token_patches=token_patches, where=WHERE)
        records: list[Any] = []
        run = SamplingRun(
            unet,
            network,
            config,
            [float(v) for v in _floats(schedule)],
            seeds,
            timesteps=timesteps is not None,
            recorder=_both(records.append if sink else None, recorder),
            # Forge / reForge hand ControlNet residuals to the U-Net (read per call); A1111's
            # sd-webui-controlnet adds them inside its own forward, so its units say it.
            controlnet=a1111_controlnet(p) if which_webui(p.sd_model) == "a1111" else None,
            img2img=getattr(p, "init_images", None) is not None,
        )
        run.install()
        try:
            return original(run.denoiser(model), x, *args, **kwargs)
        finally:
            run.remove()
            if sink:
                _write_records(sink, records, network.architecture.family, tuple(int(s) for s in x.shape[-2:]))

    sampling.__hidiff_original__ = original  # type: ignore[attr-defined]
    sampler.func = sampling
    return True


def solver_levels(kwargs: dict, steps: Optional[int]) -> Optional[list[float]]:
    """The schedule of a sampler handed only its noise range (DPM fast: sigma_min, sigma_max and its
    model-call budget n; DPM adaptive: the range alone, its steps its own): the n steps (else the
    generation's step count) evenly spaced in log sigma from sigma_max to sigma_min, as k-diffusion's
    DPM-Solver spaces its steps. Calls between two levels belong to the step they fall in."""
    low, high = kwargs.get("sigma_min"), kwargs.get("sigma_max")
    count = kwargs.get("n") or steps
    try:
        low, high, count = float(low), float(high), int(count)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    if count < 1 or not 0 < low < high:
        return None
    a, b = math.log(high), math.log(low)
    return [math.exp(a + (b - a) * i / count) for i in range(count + 1)]


def other_patches(p: Any, opts: Any = None) -> tuple[list[str], list[str]]:
    """(feature resizers, token patches) active for this sampling, as the user knows them.

    Forge's and reForge's patchers keep ComfyUI's ``input_block_patch_after_skip`` (their Kohya
    hires fix / Deep Shrink); every WebUI has token merging (``p.get_token_merging_ratio``), and
    AUTOMATIC1111 HyperTile for the U-Net (its settings). Resizers set any other way are caught
    when they act (:class:`hidiff.webui.patch.SamplingRun` checks the sizes the downsamplers meet).
    """
    unet = getattr(getattr(getattr(p, "sd_model", None), "forge_objects", None), "unet", None)
    model_options = getattr(unet, "model_options", None)
    transformer_options = model_options.get("transformer_options") if isinstance(model_options, dict) else None
    patches = (transformer_options or {}).get("patches") or {}
    resizers = [_patch_name(f) for f in patches.get("input_block_patch_after_skip") or ()]
    second_pass = bool(getattr(p, "is_hr_pass", False))
    token_patches = []
    ratio_of = getattr(p, "get_token_merging_ratio", None)
    ratio = ratio_of(for_hr=second_pass) if callable(ratio_of) else 0
    if isinstance(ratio, (int, float)) and ratio > 0:
        token_patches.append(f"token merging (ratio {ratio:g}, Settings > Optimizations)")
    # A1111's HyperTile tiles the U-Net with its first setting, and the hires-fix pass also with its second.
    flags = ("hypertile_enable_unet", "hypertile_enable_unet_secondpass") if second_pass else ("hypertile_enable_unet",)
    if opts is not None and any(getattr(opts, flag, False) is True for flag in flags):
        token_patches.append("HyperTile for the U-Net (Settings > HyperTile)")
    return resizers, token_patches


def a1111_controlnet(p: Any) -> bool:
    """Whether an enabled ControlNet unit with a model guides this generation in AUTOMATIC1111's
    sd-webui-controlnet: its units are its script's arguments in ``p.script_args`` (what its
    ``external_code.get_all_units_in_processing`` reads; units are dicts from the API, objects
    from the UI), read duck-typed so nothing of the extension is imported."""
    runner = getattr(p, "scripts", None)
    values = list(getattr(p, "script_args", None) or ())
    for script in getattr(runner, "alwayson_scripts", None) or ():
        title = getattr(script, "title", None)
        if not callable(title) or str(title()).lower() != "controlnet":
            continue
        for unit in values[getattr(script, "args_from", 0) : getattr(script, "args_to", 0)]:
            fields = unit if isinstance(unit, dict) else getattr(unit, "__dict__", {})
            if fields.get("enabled") and str(fields.get("model") or "None") != "None":
                return True
    return False


def _patch_name(fn: Any) -> str:
    """A patch function as its extension: the module (a WebUI script file) and the function."""
    target = getattr(fn, "__func__", fn)
    module = (getattr(target, "__module__", "") or "").rsplit(".", 1)[-1]
    name = (getattr(target, "__qualname__", "") or type(fn).__qualname__).split(".<locals>")[0]
    return f"{module}.{name}" if module else name


def _both(*recorders: Optional[Callable[[Any], None]]) -> Optional[Callable[[Any], None]]:
    active = [r for r in recorders if r is not None]
    if not active:
        return None

    def record(call: Any) -> None:
        for r in active:
            r(call)

    return record


def refuse(p: Any, message: str) -> None:
    """Make this generation's sampling fail with ``message`` (a bad option: the WebUI answers with it)."""
    sampler = getattr(p, "sampler", None)
    func = getattr(sampler, "func", None)
    if func is None:
        raise ValueError(message)
    _refuse(sampler, getattr(func, "__hidiff_original__", func), message)


def _refuse(sampler: Any, original: Callable[..., Any], message: str) -> None:
    @functools.wraps(original)
    def refused(*args: Any, **kwargs: Any) -> Any:
        raise ValueError(message)

    refused.__hidiff_original__ = original  # type: ignore[attr-defined]
    sampler.func = refused


def _floats(values: Any) -> Sequence[float]:
    tolist = getattr(values, "tolist", None)
    return [float(v) for v in (tolist() if tolist is not None else values)]


def _write_records(path: str, records: list[Any], family: str, latent: tuple[int, ...]) -> None:
    lines = [
        {
            "family": family,
            "latent": list(latent),
            "step": r.step,
            "total": r.total,
            "preset": r.preset,
            "conv": r.conv,
            "conv_out": list(r.conv_out) if r.conv_out else None,
            "pool": r.pool,
            "windows": r.window_calls,
            "kv": r.kv_calls,
            # ControlNet residuals handed to the U-Net, as resized to the features they met
            "residuals": {kind: [list(hw) if hw else None for hw in sizes] for kind, sizes in r.residual_sizes.items()},
        }
        for r in records
    ]
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps({"run": lines}) + "\n")


def what_happens(settings: Settings, width: int, height: int, steps: int, sd_model: Any = None) -> str:
    """The accordion's line: what HiDiffusion will do at this size with the loaded model."""
    if not settings.enable or settings.config is None:
        return "HiDiffusion is off."
    from ..core.planner import Progress, Task, plan_call
    from .structure import describe

    if sd_model is None or (
        getattr(sd_model, "forge_objects", None) is None and getattr(sd_model, "model", None) is None
    ):
        # Forge holds a placeholder (FakeInitialModel) until the first generation loads the checkpoint.
        return "HiDiffusion: no model is loaded yet (the WebUI loads it at the first generation); this line then says what HiDiffusion does at this size."
    try:
        unet, v_prediction, name = find_unet(sd_model)
        arch = describe(unet, v_prediction, name).architecture
    except UnsupportedModelError as e:
        return str(e)
    latent = (max(1, int(height) // 8), max(1, int(width) // 8))
    total = max(1, int(steps))
    plans = [plan_call(arch, latent, settings.config, Progress(i, total), Task()) for i in range(total)]
    native_px = f"{arch.native[1] * 8}x{arch.native[0] * 8}"
    if not plans[0].active:
        return f"At {width}x{height} ({arch.family}, native {native_px}): nothing changes (HiDiffusion acts above native size)."
    conv = [i + 1 for i, plan in enumerate(plans) if plan.conv]
    pool = [i + 1 for i, plan in enumerate(plans) if plan.pool]
    windows = sum(plan.windows for plan in plans)
    return (
        f"At {width}x{height} ({arch.family}, native {native_px}), preset {plans[0].preset}: "
        f"strided conv on steps {_span(conv)}, pooling on steps {_span(pool)}, windows on {windows} of {total} steps."
    )


def _span(steps: list[int]) -> str:
    if not steps:
        return "none"
    return f"{steps[0]}-{steps[-1]}" if len(steps) > 1 else str(steps[0])
