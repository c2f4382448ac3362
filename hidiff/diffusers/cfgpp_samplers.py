"""The CFG++ samplers as diffusers schedulers (Chung et al., arXiv 2406.08070).

Each is a subclass of the stock diffusers scheduler (so a pipeline's ``isinstance``,
``set_timesteps``, ``scale_model_input``, ``order``, ``init_noise_sigma`` and signature checks
see the scheduler they know) whose ``step`` ignores the pipeline's combined prediction and runs
the CFG++ update from the U-Net output that :mod:`hidiff.diffusers.cfgpp`'s hook kept.

Each CFG++ step is the stock step taken on the unconditional prediction plus the guidance
shift of the clean estimate, carried the way that step carries its clean estimate into
the next sample. With lam = 0 the shift is exactly zero and every sampler is bitwise the
stock diffusers scheduler run on the unconditional prediction: that is the reducing case.
"""

from __future__ import annotations

import inspect
from typing import Any, Optional

import torch

from ..core import cfgpp as rules
from ..core.cfgpp import DEFAULT_GUIDANCE


class _CFGppScheduler:
    """The CFG++ step; mixed in before a diffusers scheduler class (``_stock``)."""

    _stock: Any  # the diffusers scheduler class this one extends
    #: config values forced on the scheduler built from the pipeline's (what the sampler name means)
    forced_config: dict = {}
    sampler: str = ""
    guidance: float = DEFAULT_GUIDANCE
    _session: Any = None  # the hidiff.diffusers.cfgpp session that installed it

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
    """Each sampler's class, built on first use (importing diffusers only then)."""
    return {cls.sampler: cls for cls in (_ddim(), _euler(), _euler_ancestral(), _dpmpp_2m())}


def _ddim() -> type:
    from diffusers import DDIMScheduler

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

    return CFGppDDIMScheduler


def _euler() -> type:
    from diffusers import EulerDiscreteScheduler

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

    return CFGppEulerDiscreteScheduler


def _euler_ancestral() -> type:
    from diffusers import EulerAncestralDiscreteScheduler

    class CFGppEulerAncestralDiscreteScheduler(_CFGppScheduler, EulerAncestralDiscreteScheduler):
        """Euler ancestral with CFG++: x_next = D_l + sigma_down * (x - D_u) / sigma + sigma_up * z."""

        _stock = EulerAncestralDiscreteScheduler
        sampler = "euler-a"
        step = _step_with_signature_of(EulerAncestralDiscreteScheduler.step)

        def _coefficients(self, timestep: Any) -> tuple[Any, Any]:
            return _sigma_form_coefficients(self)

    return CFGppEulerAncestralDiscreteScheduler


def _dpmpp_2m() -> type:
    from diffusers import DPMSolverMultistepScheduler

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

    return CFGppDPMSolverMultistepScheduler


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
