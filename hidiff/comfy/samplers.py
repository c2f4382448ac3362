"""hidiff's DDIM CFG++ as a ComfyUI sampler (ComfyUI ships Euler / DPM++ CFG++ samplers, not DDIM's).

DDIM (eta 0) with CFG++ (Chung et al., arXiv 2406.08070): the clean estimate from the guided
prediction, the re-noising with the unconditional one. On ComfyUI's sigma-form samples
(x = x0 + sigma eps) a DDIM step from sigma to sigma_next is

    x_next = D_l + sigma_next * (x - D_u) / sigma

with D_l the guided and D_u the unconditional clean estimate (hidiff.core.cfgpp's DDIM rule,
whose carry term is 1 in sigma form). Use it in SamplerCustom / SamplerCustomAdvanced with the
``ddim_uniform`` scheduler for DDIM's own timesteps; the guidance lam is the sampler node's
``cfg`` (as for ComfyUI's own CFG++ samplers: cfg 0.6 is hidiff's guidance 0.6).
"""

from __future__ import annotations

from typing import Any, Optional

import torch


def sample_ddim_cfgpp(
    model: Any,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    extra_args: Optional[dict] = None,
    callback: Any = None,
    disable: Any = None,
) -> torch.Tensor:
    import comfy.model_patcher

    extra_args = dict(extra_args or {})
    seen: dict = {}

    def keep_uncond(args: dict) -> torch.Tensor:
        seen["uncond"] = args["uncond_denoised"]
        return args["denoised"]

    model_options = dict(extra_args.get("model_options", {}))
    extra_args["model_options"] = comfy.model_patcher.set_model_options_post_cfg_function(
        model_options, keep_uncond, disable_cfg1_optimization=True
    )
    ones = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        guided = model(x, sigma * ones, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": guided})
        uncond = seen["uncond"]
        if float(sigma_next) == 0.0:
            x = guided
        else:
            x = guided + (sigma_next / sigma) * (x - uncond)
    return x


DDIM_CFGPP_TOOLTIP = "DDIM CFG++ (hidiff). The guidance lam in [0, 1] is the sampler node's cfg value."
DDIM_CFGPP_DESCRIPTION = (
    "DDIM with CFG++ (hidiff): guided clean estimate, unconditional re-noising. Set cfg to the CFG++ "
    "guidance lam (0-1, e.g. 0.6; lam stands for an ordinary cfg of 1 + 11.5 lam) and use the ddim_uniform "
    "scheduler for DDIM's timesteps."
)


def ddim_cfgpp_sampler() -> Any:
    """ComfyUI's SAMPLER object for :func:`sample_ddim_cfgpp`."""
    import comfy.samplers

    return comfy.samplers.KSAMPLER(sample_ddim_cfgpp)


class SamplerDDIMCFGpp:
    """DDIM with CFG++ as a SAMPLER, in ComfyUI's V1 form (``hidiff.comfy.v3`` has the V3 node)."""

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {}}

    RETURN_TYPES = ("SAMPLER",)
    OUTPUT_TOOLTIPS = (DDIM_CFGPP_TOOLTIP,)
    FUNCTION = "get_sampler"
    CATEGORY = "sampling/custom_sampling/samplers"
    DESCRIPTION = DDIM_CFGPP_DESCRIPTION

    def get_sampler(self) -> tuple:
        return (ddim_cfgpp_sampler(),)
