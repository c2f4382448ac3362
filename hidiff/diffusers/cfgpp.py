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

Each CFG++ step is the stock step taken on the unconditional prediction plus the guidance
shift of the clean estimate, carried the way that step carries its clean estimate into
the next sample. With lam = 0 the shift is exactly zero and every sampler is bitwise the
stock diffusers scheduler run on the unconditional prediction: that is the reducing case.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import weakref
from typing import Any, Optional, Sequence, Union

import torch

from ..core import cfgpp as rules
from ..core.cfgpp import DEFAULT_GUIDANCE, SAMPLERS, cfg_scale_for, check_guidance, guidance_for
from .hooks import Hook, first_tensor
from .model import find_unet
from .patch import get_patch
from .steps import as_float


# ---------------------------------------------------------------------- schedulers
class _CFGppScheduler:
    """The CFG++ step; mixed in before a diffusers scheduler class (``_stock``)."""

    _stock: Any  # the diffusers scheduler class this one extends
    #: config values forced on the scheduler built from the pipeline's (what the sampler name means)
    forced_config: dict = {}
    sampler: str = ""
    guidance: float = DEFAULT_GUIDANCE
    _session: Optional[_Session] = None

    def _cfgpp_step(self, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor, args: tuple, kwargs: dict):
        bound = inspect.signature(self._stock.step).bind(self, model_output, timestep, sample, *args, **kwargs)
        bound.apply_defaults()
        self._refuse_options(bound.arguments)
        uncond, cond = self._predictions(model_output, timestep, sample)
        guided = rules.guided(uncond, cond, self.guidance)
        return_dict = bound.arguments.get("return_dict", True)
        bound.arguments["return_dict"] = True
        out = self._guided_step(bound, uncond, guided)
        return out if return_dict else out.to_tuple()

    def _refuse_options(self, arguments: dict) -> None:
        """Stock step options that CFG++ has no rule for."""

    def _predictions(self, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor):
        if self._session is None:
            raise RuntimeError(
                f"{type(self).__name__} only works on a pipeline prepared by hidiff.enable_cfgpp(pipe, ...), "
                "which also hooks the U-Net; do not create or assign it yourself."
            )
        outputs = self._session.take(self, timestep)
        n = sample.shape[0]
        got = sum(o.shape[0] for o in outputs)
        if got != 2 * n:
            if got == n:
                raise ValueError(
                    "CFG++ needs the pipeline to run the U-Net on [unconditional, conditional] at every step, but it "
                    "ran the conditional branch only: call the pipeline with guidance_scale > 1 (while CFG++ is on "
                    "that value only turns the unconditional branch on; the strength is the guidance=lam given to "
                    "hidiff.enable_cfgpp). Guidance-distilled U-Nets (time_cond_proj_dim, LCM) have no "
                    "unconditional branch and cannot use CFG++."
                )
            if got == 0:
                raise RuntimeError(
                    "CFG++: no U-Net output was seen for this step (the scheduler was stepped without a U-Net call "
                    "at this timestep); CFG++ only works inside a pipeline call."
                )
            raise ValueError(
                f"CFG++ expected the U-Net batch to be [unconditional, conditional] ({2 * n} samples for {n} "
                f"latents) but it had {got}: pipelines that add a third branch (PAG, InstructPix2Pix) or "
                "change the batch are not supported."
            )
        both = torch.cat(outputs) if len(outputs) > 1 else outputs[0]
        uncond, cond = both[:n], both[n:]
        if uncond.shape != model_output.shape:
            raise ValueError(
                f"CFG++: the U-Net output {tuple(uncond.shape)} does not match the prediction the pipeline passed to "
                f"the scheduler {tuple(model_output.shape)}; this pipeline is not supported."
            )
        pipe = self._session.pipe()
        if (getattr(pipe, "_guidance_rescale", 0.0) or 0.0) > 0:
            raise ValueError(
                "guidance_rescale corrects ordinary CFG and has no meaning for CFG++: call the pipeline with "
                "guidance_rescale=0 while CFG++ is on."
            )
        return uncond.to(model_output.dtype), cond.to(model_output.dtype)

    def _guided_step(self, bound: inspect.BoundArguments, uncond: torch.Tensor, guided: torch.Tensor):
        """The stock step on ``uncond``, then the clean estimate moved by its guidance shift."""
        bound.arguments["model_output"] = uncond
        out = self._stock.step(*bound.args, **bound.kwargs)
        coefficients = self._coefficients(bound.arguments["timestep"])
        out.prev_sample, shift = rules.shift_clean_estimate(out.prev_sample, uncond, guided, coefficients)
        if getattr(out, "pred_original_sample", None) is not None:
            x0 = out.pred_original_sample
            out.pred_original_sample = (x0.float() + shift).to(x0.dtype)
        return out

    def _coefficients(self, timestep: Any) -> tuple[Any, Any]:
        """(d x0 / d model output, how much of a change of x0 reaches the next sample), called after the stock step."""
        raise NotImplementedError


def _step_with_signature_of(stock_step: Any) -> Any:
    # Pipelines read scheduler.step's signature to decide whether to pass eta and generator.
    def step(self, model_output, timestep, sample, *args, **kwargs):
        return self._cfgpp_step(model_output, timestep, sample, args, kwargs)

    step.__signature__ = inspect.signature(stock_step)
    step.__doc__ = (
        "The CFG++ step (takes the stock step's arguments). The pipeline's combined prediction in "
        "``model_output`` is not used: the unconditional and conditional predictions are read from the U-Net "
        "output of this step."
    )
    return step


def _sigma_form_coefficients(scheduler: Any) -> tuple[Any, Any]:
    """Euler-type schedulers (x = x0 + sigma * eps): x0 moves by -sigma * d eps (or the v form), and a
    change of x0 reaches the next sample unchanged (x_next = x0 + sigma_next * direction)."""
    sigma = scheduler.sigmas[scheduler.step_index - 1].float()
    return rules.sigma_coefficients(sigma, scheduler.config.prediction_type == "v_prediction")


def _make_classes() -> dict[str, type]:
    from diffusers import (
        DDIMScheduler,
        DPMSolverMultistepScheduler,
        EulerAncestralDiscreteScheduler,
        EulerDiscreteScheduler,
    )

    class CFGppDDIMScheduler(_CFGppScheduler, DDIMScheduler):
        """DDIM with CFG++ (eta 0): x0 = (x_t - sqrt(1 - a_t) eps_l) / sqrt(a_t);
        x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev) eps_u."""

        _stock = DDIMScheduler
        sampler = "ddim"
        forced_config = {"clip_sample": False, "thresholding": False}
        step = _step_with_signature_of(DDIMScheduler.step)

        def _refuse_options(self, arguments: dict) -> None:
            if arguments.get("eta", 0.0):
                raise ValueError(
                    "CFG++ DDIM is deterministic (eta=0); call the pipeline with eta=0, or use "
                    "hidiff.enable_cfgpp(pipe, scheduler='euler-a') for a stochastic CFG++ sampler."
                )

        def _coefficients(self, timestep: Any) -> tuple[Any, Any]:
            t = int(timestep)
            prev = t - self.config.num_train_timesteps // self.num_inference_steps
            a_t = self.alphas_cumprod[t]
            a_prev = self.alphas_cumprod[prev] if prev >= 0 else self.final_alpha_cumprod
            a_prev = torch.as_tensor(a_prev, dtype=torch.float32)
            return rules.ddim_coefficients(a_t, a_prev, self.config.prediction_type == "v_prediction")

    class CFGppEulerDiscreteScheduler(_CFGppScheduler, EulerDiscreteScheduler):
        """Euler with CFG++: x_next = D_l + sigma_next * (x - D_u) / sigma (D: denoised)."""

        _stock = EulerDiscreteScheduler
        sampler = "euler"
        step = _step_with_signature_of(EulerDiscreteScheduler.step)

        def _refuse_options(self, arguments: dict) -> None:
            if arguments.get("s_churn", 0.0):
                raise ValueError("CFG++ Euler has no churn; pass s_churn=0 (the pipelines' default).")

        def _coefficients(self, timestep: Any) -> tuple[Any, Any]:
            return _sigma_form_coefficients(self)

    class CFGppEulerAncestralDiscreteScheduler(_CFGppScheduler, EulerAncestralDiscreteScheduler):
        """Euler ancestral with CFG++: x_next = D_l + sigma_down * (x - D_u) / sigma + sigma_up * z."""

        _stock = EulerAncestralDiscreteScheduler
        sampler = "euler-a"
        step = _step_with_signature_of(EulerAncestralDiscreteScheduler.step)

        def _coefficients(self, timestep: Any) -> tuple[Any, Any]:
            return _sigma_form_coefficients(self)

    class CFGppDPMSolverMultistepScheduler(_CFGppScheduler, DPMSolverMultistepScheduler):
        """DPM-Solver++(2M) with CFG++. With D the solver's clean estimate (the current x0, or its
        second-order extrapolation from the previous one), D_l from the guided and D_u from the
        unconditional x0 history: x_next = D_l + sigma_next * (x - D_u) / sigma in sigma form."""

        _stock = DPMSolverMultistepScheduler
        sampler = "dpmpp-2m"
        forced_config = {"algorithm_type": "dpmsolver++", "solver_order": 2, "thresholding": False}
        step = _step_with_signature_of(DPMSolverMultistepScheduler.step)
        _guided_outputs: Optional[list] = None

        def _guided_step(self, bound: inspect.BoundArguments, uncond: torch.Tensor, guided: torch.Tensor):
            # The stock update is linear in the x0 history for a fixed sample: running it on the
            # guided history and on the unconditional one, the difference of the two results is
            # (1 - sigma_next / sigma) * (D_l - D_u), in sigma form. Both runs in float32, so that
            # the division below does not magnify half-precision rounding.
            dtype = bound.arguments["sample"].dtype
            bound.arguments["sample"] = bound.arguments["sample"].float()
            state = _copy_state(self)
            if self.lower_order_nums == 0 or self._guided_outputs is None:  # first step of a run
                self._guided_outputs = [None] * len(self.model_outputs)
            self.model_outputs = list(self._guided_outputs)
            bound.arguments["model_output"] = guided.float()
            with_guided = self._stock.step(*bound.args, **bound.kwargs).prev_sample
            guided_history = list(self.model_outputs)
            self.__dict__.update(state)
            bound.arguments["model_output"] = uncond.float()
            out = self._stock.step(*bound.args, **bound.kwargs)
            self._guided_outputs = guided_history
            i = self.step_index - 1
            ratio = self.sigmas[i + 1].float() / self.sigmas[i].float()
            out.prev_sample = rules.dpmpp_2m_combine(out.prev_sample, with_guided, ratio).to(dtype)
            return out

    return {
        cls.sampler: cls
        for cls in (
            CFGppDDIMScheduler,
            CFGppEulerDiscreteScheduler,
            CFGppEulerAncestralDiscreteScheduler,
            CFGppDPMSolverMultistepScheduler,
        )
    }


def _copy_state(scheduler: Any) -> dict:
    """The scheduler's attributes, lists copied (the step shifts its model-output history in place)."""
    return {k: (list(v) if isinstance(v, list) else v) for k, v in vars(scheduler).items()}


_CLASSES: Optional[dict[str, type]] = None


def sampler_classes() -> dict[str, type]:
    """Sampler name -> CFG++ scheduler class (each a subclass of the stock diffusers scheduler)."""
    global _CLASSES
    if _CLASSES is None:
        _CLASSES = _make_classes()
    return _CLASSES


def stock_scheduler(sampler: str, config: Any) -> Any:
    """The stock diffusers scheduler that CFG++ ``sampler`` reduces to at lam = 0, built from ``config``."""
    cls = sampler_classes()[sampler]
    return cls._stock.from_config(config, **cls.forced_config)


# ---------------------------------------------------------------------- the session
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


def _check_pipeline(pipe: Any, scheduler_config: Any, forced_config: dict) -> torch.nn.Module:
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
    unet = _check_pipeline(pipe, getattr(original, "config", {}), cls.forced_config)
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


def _is_weakrefable(obj: Any) -> bool:
    try:
        weakref.ref(obj)
    except TypeError:
        return False
    return True


# ---------------------------------------------------------------------- inversion
@torch.no_grad()
def invert(
    pipe: Any,
    image: Any,
    prompt: Union[str, Sequence[str]],
    *,
    negative_prompt: Union[None, str, Sequence[str]] = None,
    guidance: Optional[float] = None,
    cfg_scale: Optional[float] = None,
    num_inference_steps: int = 50,
) -> torch.Tensor:
    """DDIM inversion with CFG++: the noise latents from which CFG++ DDIM sampling gives ``image`` back.

    Each inversion step runs the DDIM step backwards with the roles of the two predictions
    swapped (the clean estimate from eps_u, the re-noising with eps_l), so it is the exact
    inverse of a CFG++ DDIM step wherever the U-Net output does not depend on the latents.

    Args:
        pipe: a text-to-image SD 1.x / 2.x / SDXL pipeline.
        image: what ``pipe.image_processor.preprocess`` takes (PIL images, arrays, tensors in [0, 1]).
        prompt, negative_prompt: as for the pipeline call that will sample back.
        guidance: lam in [0, 1]; default: the lam of ``hidiff.enable_cfgpp`` on this pipeline.
        cfg_scale: invert with ordinary CFG at this scale instead (eps_w both ways), for comparison.
        num_inference_steps: the steps of the sampling run that will reconstruct the image.

    Reconstruct with ``hidiff.enable_cfgpp(pipe, "ddim", guidance)`` and
    ``pipe(prompt, latents=noise, num_inference_steps=num_inference_steps)`` (height and width of the image).
    """
    if guidance is None and cfg_scale is None:
        settings = cfgpp_settings(pipe)
        if settings is None:
            raise ValueError("pass guidance=lam (or cfg_scale=w), or call hidiff.enable_cfgpp(pipe, 'ddim', lam) first")
        guidance = settings[1]
    run = inversion(pipe, image, prompt, negative_prompt, guidance, cfg_scale, num_inference_steps)
    return run.latents.to(run.dtype)


class Inversion:
    """What :func:`inversion` found: the clean latents, the latents after each inverted step
    (``levels[t]``: at the noise level of sampling timestep ``t``, float32) and the last of them."""

    def __init__(self, clean: torch.Tensor, levels: dict[int, torch.Tensor], latents: torch.Tensor, dtype: Any):
        self.clean, self.levels, self.latents, self.dtype = clean, levels, latents, dtype


def inversion(
    pipe: Any,
    image: Any,
    prompt: Union[str, Sequence[str]],
    negative_prompt: Union[None, str, Sequence[str]],
    guidance: Optional[float],
    cfg_scale: Optional[float],
    num_inference_steps: int,
    num_inverted_steps: Optional[int] = None,
) -> Inversion:
    """DDIM inversion of the first ``num_inverted_steps`` (default all) steps of an
    ``num_inference_steps``-step schedule, counted from the clean end: CFG++ with ``guidance``
    (lam), or ordinary CFG with ``cfg_scale``. Checks its inputs before running anything."""
    if guidance is not None and cfg_scale is not None:
        raise ValueError("pass guidance (CFG++ lam) or cfg_scale (ordinary CFG), not both")
    if cfg_scale is not None:
        cfg_scale = rules.check_cfg_scale(cfg_scale)
    lam = check_guidance(guidance) if cfg_scale is None else None
    if not isinstance(num_inference_steps, int) or isinstance(num_inference_steps, bool) or num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be a positive int, got {num_inference_steps!r}")
    inverted = num_inference_steps if num_inverted_steps is None else num_inverted_steps
    session = _SESSIONS.get(pipe) if _is_weakrefable(pipe) else None
    original = session.original if session is not None else getattr(pipe, "scheduler", None)
    unet = _check_pipeline(pipe, getattr(original, "config", {}), sampler_classes()["ddim"].forced_config)
    if getattr(pipe, "controlnet", None) is not None or getattr(pipe, "adapter", None) is not None:
        raise TypeError("hidiff.invert inverts with the prompt only; use a pipeline without ControlNet or adapter.")
    if unet.config.in_channels != unet.config.out_channels:
        raise TypeError("hidiff.invert needs a text-to-image U-Net (an inpainting U-Net takes a mask as well).")

    ddim = stock_scheduler("ddim", original.config)
    ddim.set_timesteps(num_inference_steps)
    device = getattr(pipe, "_execution_device", None) or unet.device
    latents = _encode_image(pipe, image, device)
    batch = latents.shape[0]
    call_kwargs = _conditioning(pipe, prompt, negative_prompt, batch, latents.shape[-2:], device)
    clean = latents.float()
    step = ddim.config.num_train_timesteps // num_inference_steps
    patch = get_patch(unet)
    # With HiDiffusion applied, each inversion call is planned as the sampling step it inverts.
    with patch.mirrored(ddim.timesteps) if patch is not None else contextlib.nullcontext():
        levels = _invert_loop(unet, ddim, clean, step, device, call_kwargs, lam, cfg_scale, inverted)
    last = levels[int(ddim.timesteps[num_inference_steps - inverted])] if inverted else clean
    return Inversion(clean, levels, last, unet.dtype)


def _invert_loop(
    unet: Any,
    ddim: Any,
    x: torch.Tensor,
    step: int,
    device: Any,
    call_kwargs: dict,
    lam: Any,
    cfg_scale: Any,
    inverted: int,
) -> dict[int, torch.Tensor]:
    prediction = ddim.config.prediction_type
    levels = {}
    for t in reversed(ddim.timesteps[len(ddim.timesteps) - inverted :]):
        t_from = int(t) - step
        a_from = ddim.alphas_cumprod[t_from] if t_from >= 0 else ddim.final_alpha_cumprod
        a_to = ddim.alphas_cumprod[int(t)]
        model_input = torch.cat([x, x]).to(unet.dtype)
        out = unet(model_input, t.to(device), return_dict=False, **call_kwargs)[0].float()
        if prediction == "v_prediction":  # eps = sqrt(a) v + sqrt(1 - a) x at the timestep the U-Net saw
            out = a_to**0.5 * out + (1 - a_to) ** 0.5 * torch.cat([x, x])
        eps_u, eps_c = out.chunk(2)
        if cfg_scale is not None:
            eps_denoise = eps_renoise = rules.guided(eps_u, eps_c, cfg_scale)
        else:
            eps_denoise, eps_renoise = eps_u, rules.guided(eps_u, eps_c, lam)
        x = rules.ddim_invert_step(x, eps_denoise, eps_renoise, a_from, a_to)
        levels[int(t)] = x
    return levels


def _encode_image(pipe: Any, image: Any, device: Any) -> torch.Tensor:
    """The VAE latents of ``image`` (the mean of the posterior, scaled as the pipeline scales them);
    for a pixel-space pipeline (no ``vae``) the preprocessed pixels themselves."""
    vae = getattr(pipe, "vae", None)
    if vae is None:
        return pipe.image_processor.preprocess(image).to(device=device, dtype=pipe.unet.dtype)
    pixels = pipe.image_processor.preprocess(image).to(device=device, dtype=vae.dtype)
    latents = vae.encode(pixels).latent_dist.mean
    return latents * vae.config.scaling_factor


def _conditioning(pipe: Any, prompt: Any, negative_prompt: Any, batch: int, latent_hw: Any, device: Any) -> dict:
    """The U-Net keywords of the pipeline's guided call for [negative, positive]."""
    if not isinstance(prompt, str) and len(prompt) != batch:
        raise ValueError(f"{len(prompt)} prompts for {batch} images; pass one prompt or one per image")
    per_prompt = batch if isinstance(prompt, str) else 1
    encoded = pipe.encode_prompt(
        prompt=prompt,
        device=device,
        num_images_per_prompt=per_prompt,
        do_classifier_free_guidance=True,
        negative_prompt=negative_prompt,
    )
    if len(encoded) == 2:  # SD 1.x / 2.x
        positive, negative = encoded
        return {"encoder_hidden_states": torch.cat([negative, positive])}
    positive, negative, pooled, negative_pooled = encoded  # SDXL
    if getattr(pipe.config, "requires_aesthetics_score", False):
        raise TypeError("hidiff.invert supports SDXL text-to-image pipelines (aesthetic-score conditioning is not)")
    scale = getattr(pipe, "vae_scale_factor", 8)
    size = (int(latent_hw[0]) * scale, int(latent_hw[1]) * scale)
    # The text-to-image pipeline's defaults: original size = target size = the image's, no crop.
    time_ids = torch.tensor([[*size, 0, 0, *size]], dtype=positive.dtype, device=device).repeat(2 * batch, 1)
    return {
        "encoder_hidden_states": torch.cat([negative, positive]),
        "added_cond_kwargs": {"text_embeds": torch.cat([negative_pooled, pooled]), "time_ids": time_ids},
    }


__all__ = [
    "enable_cfgpp",
    "disable_cfgpp",
    "invert",
    "cfgpp_settings",
    "cfg_scale_for",
    "guidance_for",
    "stock_scheduler",
    "sampler_classes",
    "SAMPLERS",
    "DEFAULT_GUIDANCE",
]
