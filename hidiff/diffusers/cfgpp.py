"""CFG++ (Chung et al., arXiv 2406.08070) for diffusers Stable Diffusion pipelines.

CFG++ changes one thing in a guided sampling step: the clean estimate is made with the
guided prediction, eps_l = eps_u + lam * (eps_c - eps_u) with lam in [0, 1], but the
re-noising towards the next step uses the unconditional prediction eps_u.

diffusers pipelines combine the two predictions before ``scheduler.step``, which only
ever sees the combination. Nothing of the pipeline is replaced to get at eps_u:

* a forward hook on the U-Net keeps its output of the current step, whose batch is
  [unconditional, conditional] (``torch.cat([negative, positive])`` in every SD
  pipeline; several calls per step are concatenated in call order);
* ``pipe.scheduler`` becomes a subclass of the stock diffusers scheduler (so the
  pipeline's ``isinstance``, ``set_timesteps``, ``scale_model_input``, ``order``,
  ``init_noise_sigma`` and signature checks see the scheduler they know) whose ``step``
  ignores the pipeline's combination and runs the CFG++ update from the kept output.

The schedulers are in :mod:`hidiff.diffusers.cfgpp_samplers`; DDIM inversion with CFG++
(:func:`~hidiff.diffusers.inversion.invert`) in :mod:`hidiff.diffusers.inversion`. This module
turns CFG++ on and off on a pipeline.
"""

from __future__ import annotations

import math
import weakref
from typing import Any, Optional

import torch

from ..core.cfgpp import DEFAULT_GUIDANCE, SAMPLERS, cfg_scale_for, check_guidance, guidance_for
from .cfgpp_samplers import sampler_classes, stock_scheduler
from .hooks import Hook, first_tensor
from .model import find_unet
from .steps import as_float


class _Session:
    """CFG++ on one pipeline: the U-Net hook, the installed scheduler, what to restore."""

    def __init__(self, pipe: Any, unet: torch.nn.Module, original: Any, scheduler: Any) -> None:
        self.pipe = weakref.ref(pipe)
        self.unet = unet
        self.original = original
        self.scheduler = scheduler
        self._handle: Any = None
        self._key: Optional[tuple] = None
        self._outputs: list = []

    def attach(self) -> None:
        self._handle = self.unet.register_forward_hook(Hook(self, "_on_unet_output"), with_kwargs=True)
        self.scheduler._session = self

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self.scheduler._session = None
        self._outputs = []

    def _on_unet_output(self, module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        pipe = self.pipe()
        if pipe is not None and pipe.scheduler is not self.scheduler:
            raise RuntimeError(
                "pipe.scheduler was replaced after hidiff.enable_cfgpp, so CFG++ would silently stop: call "
                "hidiff.disable_cfgpp(pipe) before changing the scheduler, and hidiff.enable_cfgpp(pipe, "
                "scheduler=...) to sample with CFG++ again."
            )
        timestep = args[1] if len(args) > 1 else kwargs.get("timestep")
        key = (self.scheduler.timesteps, as_float(timestep))
        if not self._same_key(key):
            self._outputs = []  # a new step: what an unfinished one left is dropped
        self._key = key
        self._outputs.append(first_tensor(output))

    def _same_key(self, key: tuple) -> bool:
        return self._key is not None and self._key[0] is key[0] and math.isclose(self._key[1], key[1], abs_tol=1e-6)

    def take(self, scheduler: Any, timestep: Any) -> list:
        """The U-Net outputs of this run at ``timestep`` (consumed)."""
        found = self._outputs if self._same_key((scheduler.timesteps, as_float(timestep))) else []
        self._outputs, self._key = [], None
        return found


_SESSIONS: weakref.WeakKeyDictionary[Any, _Session] = weakref.WeakKeyDictionary()


def check_pipeline(pipe: Any, scheduler_config: Any, forced_config: dict) -> torch.nn.Module:
    """The pipeline's U-Net, if CFG++ can run on the pipeline and a scheduler of ``scheduler_config``
    (TypeError / ValueError saying why not otherwise)."""
    unet, found_pipe = find_unet(pipe)
    if found_pipe is None:
        raise TypeError(
            "hidiff.enable_cfgpp needs the pipeline (it replaces pipe.scheduler and hooks pipe.unet), "
            f"not a bare {type(pipe).__name__}."
        )
    name = type(pipe).__name__
    if getattr(pipe, "scheduler", None) is None:
        raise TypeError(f"{name} has no scheduler; CFG++ needs a diffusers pipeline with a scheduler.")
    if "PAG" in name or hasattr(pipe, "pag_applied_layers"):
        raise TypeError(
            f"{name} batches [unconditional, conditional, perturbed] for PAG; CFG++ needs the plain two-branch "
            "batch. Use the pipeline without PAG (e.g. StableDiffusionXLPipeline) for CFG++."
        )
    if "InstructPix2Pix" in name:
        raise TypeError(f"{name} runs three guidance branches (text, image, none); CFG++ supports two-branch CFG only.")
    if getattr(unet.config, "time_cond_proj_dim", None) is not None:
        raise TypeError(
            "this U-Net is guidance-distilled (time_cond_proj_dim is set, e.g. LCM): its pipeline has no "
            "unconditional branch, which CFG++ needs."
        )
    config = scheduler_config
    if "sigma_data" in config:
        raise ValueError(
            f"{type(pipe.scheduler).__name__} is an EDM scheduler (Playground v2.5 and the like); the CFG++ samplers "
            "need a DDPM-type noise schedule (betas / alphas_cumprod)."
        )
    prediction = config.get("prediction_type", "epsilon")
    if prediction not in ("epsilon", "v_prediction"):
        raise ValueError(
            f"CFG++ supports epsilon and v_prediction models; this scheduler says prediction_type={prediction!r}."
        )
    for option in ("clip_sample", "thresholding"):
        # The sampler's stock scheduler would honour these; CFG++ has no rule for them.
        if option in forced_config and config.get(option, False):
            raise ValueError(
                f"the pipeline's scheduler has {option}=True; CFG++ never clips or thresholds the clean estimate. "
                f"Set it off first: pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, "
                f"{option}=False)."
            )
    return unet


def enable_cfgpp(pipe: Any, scheduler: str = "ddim", guidance: float = DEFAULT_GUIDANCE) -> Any:
    """Make the next ``pipe(...)`` calls sample with CFG++; returns ``pipe``.

    Args:
        pipe: an SD 1.x / 2.x / SDXL pipeline (text-to-image, img2img, inpaint, ControlNet,
            T2I-Adapter; epsilon or v-prediction).
        scheduler: the sampler, one of ``"ddim"``, ``"euler"``, ``"euler-a"``, ``"dpmpp-2m"``.
            It replaces ``pipe.scheduler``, built with ``from_config`` from the pipeline's
            scheduler config (so timestep spacing, Karras sigmas, prediction type carry over).
        guidance: lam in [0, 1]; lam stands for the ordinary guidance scale 1 + 11.5 * lam.
            lam = 0 is plain sampling of the unconditional model (bitwise the stock scheduler).

    While CFG++ is on, the pipeline's own ``guidance_scale`` only switches the
    unconditional branch on: it must be > 1 (the pipelines' defaults are), its value is not
    used, and a call with ``guidance_scale <= 1`` or ``guidance_rescale > 0`` raises. Enabling
    again replaces the sampler and lam. Bad input raises before the pipeline is touched.
    """
    if not isinstance(scheduler, str) or scheduler not in SAMPLERS:
        raise ValueError(f"unknown CFG++ sampler {scheduler!r}; choose one of {', '.join(SAMPLERS)}.")
    lam = check_guidance(guidance)
    previous = _SESSIONS.get(pipe) if _is_weakrefable(pipe) else None
    original = previous.original if previous is not None else getattr(pipe, "scheduler", None)
    cls = sampler_classes()[scheduler]
    unet = check_pipeline(pipe, getattr(original, "config", {}), cls.forced_config)
    new = cls.from_config(original.config, **cls.forced_config)
    new.guidance = lam
    disable_cfgpp(pipe)
    session = _Session(pipe, unet, original, new)
    session.attach()
    try:
        pipe.scheduler = new
    except BaseException:
        session.detach()
        raise
    _SESSIONS[pipe] = session
    return pipe


def disable_cfgpp(pipe: Any) -> Any:
    """Undo :func:`enable_cfgpp`: the original scheduler object is put back and the hook removed.
    A no-op on a pipeline without CFG++."""
    session = _SESSIONS.pop(pipe, None) if _is_weakrefable(pipe) else None
    if session is not None:
        session.detach()
        pipe.scheduler = session.original
    return pipe


def cfgpp_settings(pipe: Any) -> Optional[tuple[str, float]]:
    """(sampler, lam) of a pipeline with CFG++ on, else None."""
    session = _SESSIONS.get(pipe) if _is_weakrefable(pipe) else None
    return (session.scheduler.sampler, session.scheduler.guidance) if session is not None else None


def original_scheduler(pipe: Any) -> Any:
    """The pipeline's scheduler as it was before :func:`enable_cfgpp` (its scheduler when CFG++ is off)."""
    session = _SESSIONS.get(pipe) if _is_weakrefable(pipe) else None
    return session.original if session is not None else getattr(pipe, "scheduler", None)


def _is_weakrefable(obj: Any) -> bool:
    try:
        weakref.ref(obj)
    except TypeError:
        return False
    return True


__all__ = [
    "enable_cfgpp",
    "disable_cfgpp",
    "cfgpp_settings",
    "cfg_scale_for",
    "guidance_for",
    "stock_scheduler",
    "sampler_classes",
    "SAMPLERS",
    "DEFAULT_GUIDANCE",
]
