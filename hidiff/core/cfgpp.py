"""CFG++ (Chung et al., arXiv 2406.08070) as plain functions over tensors.

One guided step changes one thing: the clean estimate is made with the guided prediction
eps_l = eps_u + lam (eps_c - eps_u), lam in [0, 1], but the step towards the next noise
level re-noises with the unconditional prediction eps_u. Each rule here is written as
the host's stock step on eps_u plus the guidance shift of the clean estimate, carried
the way that step carries its clean estimate into the next sample: at lam = 0 the shift
is exactly zero, so a host's CFG++ sampler reduces bitwise to its stock sampler.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch

#: The sampler names hidiff's CFG++ knows, in every host.
SAMPLERS = ("ddim", "euler", "euler-a", "dpmpp-2m")

#: lam of the CFG++ paper's examples (paired there with an ordinary guidance scale of 7.5).
DEFAULT_GUIDANCE = 0.6

#: lam in [0, 1] plays the role of ordinary guidance scales in [1, 12.5] (the paper's
#: correspondence); hidiff uses the straight line between the two ends.
CFG_SCALE_AT_LAMBDA_0 = 1.0
CFG_SCALE_AT_LAMBDA_1 = 12.5


def cfg_scale_for(guidance: float) -> float:
    """The ordinary guidance scale that CFG++ guidance ``guidance`` (lam) stands for: 1 + 11.5 * lam."""
    return CFG_SCALE_AT_LAMBDA_0 + (CFG_SCALE_AT_LAMBDA_1 - CFG_SCALE_AT_LAMBDA_0) * guidance


def guidance_for(cfg_scale: float) -> float:
    """The CFG++ lam that stands for an ordinary guidance scale: (scale - 1) / 11.5."""
    return (cfg_scale - CFG_SCALE_AT_LAMBDA_0) / (CFG_SCALE_AT_LAMBDA_1 - CFG_SCALE_AT_LAMBDA_0)


def check_guidance(guidance: Any) -> float:
    """lam as a float; a clear error for anything that is not a number in [0, 1] (nan included)."""
    if isinstance(guidance, bool) or not isinstance(guidance, numbers.Real):
        raise TypeError(f"guidance must be a number lam in [0, 1], got {type(guidance).__name__} {guidance!r}")
    value = float(guidance)
    if not 0.0 <= value <= 1.0:  # also refuses nan
        raise ValueError(
            f"CFG++ guidance must be lam in [0, 1], got {guidance!r}. lam = 0 samples the unconditional model; "
            f"lam stands for the ordinary guidance scale 1 + 11.5 * lam (an ordinary scale w is lam = (w - 1) / 11.5, "
            f"e.g. 7.5 -> {guidance_for(7.5):.2f})."
        )
    return value


def check_cfg_scale(cfg_scale: Any) -> float:
    if isinstance(cfg_scale, bool) or not isinstance(cfg_scale, numbers.Real) or not math.isfinite(cfg_scale):
        raise TypeError(f"cfg_scale must be a finite number, got {cfg_scale!r}")
    return float(cfg_scale)


def guided(uncond: torch.Tensor, cond: torch.Tensor, lam: float) -> torch.Tensor:
    """eps_l = eps_u + lam (eps_c - eps_u); uncond + 0 * (...) is uncond bit for bit."""
    return uncond + lam * (cond - uncond)


def ddim_coefficients(alpha_t: Any, alpha_prev: Any, v_prediction: bool) -> tuple[Any, Any]:
    """DDIM (eta 0) on x = sqrt(a) x0 + sqrt(1 - a) eps: (d x0 / d model output, how much of a
    change of x0 reaches x_prev). x0 = (x_t - sqrt(1 - a_t) eps_l) / sqrt(a_t); x_prev =
    sqrt(a_prev) x0 + sqrt(1 - a_prev) eps_u."""
    if v_prediction:
        return -((1 - alpha_t) ** 0.5), alpha_prev**0.5
    return -((1 - alpha_t) ** 0.5) / alpha_t**0.5, alpha_prev**0.5


def sigma_coefficients(sigma: Any, v_prediction: bool) -> tuple[Any, Any]:
    """Euler-type samplers on x = x0 + sigma eps: x0 moves by -sigma per unit of eps (or the v
    form), and a change of x0 reaches the next sample unchanged: x_next = D_l + sigma_next
    (x - D_u) / sigma (ancestral: sigma_down, plus sigma_up z)."""
    if v_prediction:
        return -sigma / (sigma**2 + 1) ** 0.5, 1.0
    return -sigma, 1.0


def shift_clean_estimate(
    prev_sample: torch.Tensor, uncond: torch.Tensor, guided_eps: torch.Tensor, coefficients: tuple[Any, Any]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(the CFG++ next sample, the clean estimate's shift) from the stock step's next sample on
    eps_u: the guided clean estimate minus the unconditional one, carried into the sample."""
    clean_per_output, carry = coefficients
    shift = clean_per_output * (guided_eps.float() - uncond.float())
    return (prev_sample.float() + carry * shift).to(prev_sample.dtype), shift


def dpmpp_2m_combine(with_uncond: torch.Tensor, with_guided: torch.Tensor, sigma_ratio: Any) -> torch.Tensor:
    """DPM-Solver++(2M) CFG++ from two runs of the stock multistep update on one sample (one on the
    unconditional x0 history, one on the guided). The update is linear in the history, so the two
    results differ by (1 - sigma_next / sigma) (E_l - E_u): x_next = E_l + sigma_next (x - E_u) / sigma
    is the unconditional result plus that difference over (1 - sigma_next / sigma)."""
    combined: torch.Tensor = with_uncond + (with_guided - with_uncond) / (1 - sigma_ratio)
    return combined


def ddim_invert_step(
    x: torch.Tensor, eps_denoise: torch.Tensor, eps_renoise: torch.Tensor, alpha_from: Any, alpha_to: Any
) -> torch.Tensor:
    """One DDIM step backwards, from the level of ``alpha_from`` up to ``alpha_to``: the clean estimate
    with ``eps_denoise``, re-noised with ``eps_renoise`` (CFG++ inversion: eps_u then eps_l, the roles
    of sampling swapped, so it inverts a CFG++ DDIM step where the U-Net output does not depend on x)."""
    x0 = (x - (1 - alpha_from) ** 0.5 * eps_denoise) / alpha_from**0.5
    renoised: torch.Tensor = alpha_to**0.5 * x0 + (1 - alpha_to) ** 0.5 * eps_renoise
    return renoised
