"""hidiff's InvokeAI node against InvokeAI 6.14.2's built-in HiDiffusion, on the same weights,
noise and settings: where they agree and where they differ, with numbers.

    OMP_NUM_THREADS=1 .invokeai/bin/python tools/invokeai_builtin.py [--native 64] [--steps 10] [--json OUT]

Runs in InvokeAI's environment (tools/install_invokeai.sh), in process: InvokeAI's own
pipeline (``DenoiseLatentsInvocation.create_pipeline`` / ``init_scheduler`` /
``latents_from_embeddings``, Euler, CFG 5) on a random-weight U-Net of SD 1.5's layout, either
plain, wrapped the way ``denoise_latents`` wraps it when ``hidiffusion`` is on
(``hidiffusion_patch`` with the node's defaults T1 0.4, T2 0.0 and a CPU generator seeded with the
noise seed), or through hidiff's node path (``_denoise_with_hidiffusion``) in reference mode
(``window_shift="reference"`` with the global RNG seeded as the built-in's generator,
``at_native="apply"``, the same T1/T2). Each case prints the largest difference of the final
latents, and what each leaves on the U-Net. tests/invokeai/test_builtin.py checks the equality
case with the same functions.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from typing import Any, Callable, Optional

import torch

CFG = 5.0
BUILTIN_T1, BUILTIN_T2 = 0.4, 0.0  # denoise_latents' defaults for hidiffusion_t1_ratio / _t2_ratio


def tiny_unet_and_scheduler(native: int, seed: int = 0, widths: tuple[int, ...] = (32, 64, 96, 96)):
    """A random-weight U-Net with SD 1.5's layout and module names (so the built-in recognises it
    as SD 1.5 by its module keys), native ``native`` latents, and InvokeAI's Euler."""
    from diffusers import EulerDiscreteScheduler

    from hidiff.diffusers.testing import tiny_components

    # widths that grow at the third stage, as SD 1.5's do (320, 640, 1280, 1280): its first resnet
    # then has a conv_shortcut, one of the module keys the built-in recognises SD 1.5 by
    parts = tiny_components("sd15", seed=seed, sample_size=native, block_out_channels=widths)
    scheduler = EulerDiscreteScheduler.from_config(parts["scheduler"].config, use_karras_sigmas=False)
    return parts["unet"], scheduler


def tiny_sdxl_and_scheduler(native: int, seed: int = 0, widths: tuple[int, ...] = (32, 64, 96)):
    """A random-weight U-Net with SDXL's layout and module names (widths growing at every stage,
    as SDXL's do, so the built-in recognises it by its module keys), and InvokeAI's Euler."""
    from diffusers import EulerDiscreteScheduler

    from hidiff.diffusers.testing import tiny_components

    parts = tiny_components("sdxl", seed=seed, sample_size=native, block_out_channels=widths)
    scheduler = EulerDiscreteScheduler.from_config(parts["scheduler"].config, use_karras_sigmas=False)
    return parts["unet"], scheduler


def sdxl_conditioning(unet: torch.nn.Module, latent_hw: tuple[int, int], seed: int = 3) -> Any:
    """InvokeAI's SDXL conditioning (token embeddings, pooled embedding, size ids) for ``unet``."""
    from invokeai.backend.stable_diffusion.diffusion.conditioning_data import (
        SDXLConditioningInfo,
        TextConditioningData,
    )

    g = torch.Generator().manual_seed(seed)
    size = [8 * latent_hw[0], 8 * latent_hw[1]]
    pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim

    def info() -> Any:
        return SDXLConditioningInfo(
            embeds=torch.randn(1, 6, unet.config.cross_attention_dim, generator=g),
            pooled_embeds=torch.randn(1, pooled, generator=g),
            add_time_ids=torch.tensor([size + [0, 0] + size], dtype=torch.float32),
        )

    return TextConditioningData(info(), info(), None, None, guidance_scale=CFG)


def conditioning(seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 6, 32, generator=g), torch.randn(1, 6, 32, generator=g)


def noise_of(seed: int, height: int, width: int) -> torch.Tensor:
    """InvokeAI's noise node on the CPU: one image's noise from its seed."""
    return torch.randn(1, 4, height, width, generator=torch.Generator().manual_seed(seed))


class Stop(Exception):
    """Raised from the step callback: an interrupted denoise (as InvokeAI's cancel raises)."""


def denoise(
    mode: str,
    unet: torch.nn.Module,
    scheduler: Any,
    seed: int,
    latent_hw: tuple[int, int],
    steps: int,
    denoising: tuple[float, float] = (0.0, 1.0),
    start_latents: Optional[torch.Tensor] = None,
    stop_after: Optional[int] = None,
    options: Optional[dict] = None,
    *,
    config: Any = None,
    conditioning_data: Any = None,
    noise: Optional[torch.Tensor] = None,
    mask: Optional[torch.Tensor] = None,
    control_data: Optional[list] = None,
    reports: Optional[list] = None,
) -> torch.Tensor:
    """Final latents of one InvokeAI denoise: ``mode`` is plain, builtin or hidiff.

    hidiff runs reference mode with the built-in's settings (``options`` change some), or
    ``config`` as given; ``reports`` collects its run reports. By default the conditioning
    is :func:`conditioning`'s, the noise the seed's, text-to-image from zero latents."""
    from invokeai.app.invocations.denoise_latents import DenoiseLatentsInvocation
    from invokeai.backend.stable_diffusion.diffusion.conditioning_data import (
        BasicConditioningInfo,
        TextConditioningData,
    )
    from invokeai.backend.stable_diffusion.hidiffusion_utils import hidiffusion_patch

    from hidiff.core.config import HiDiffusionConfig
    from hidiff.invokeai.nodes import _denoise_with_hidiffusion

    if conditioning_data is None:
        cond, uncond = conditioning()
        conditioning_data = TextConditioningData(
            BasicConditioningInfo(uncond), BasicConditioningInfo(cond), None, None, guidance_scale=CFG
        )
    if noise is None:
        noise = noise_of(seed, *latent_hw)
    pipeline = DenoiseLatentsInvocation.create_pipeline(unet, scheduler)
    timesteps, init_timestep, step_kwargs = DenoiseLatentsInvocation.init_scheduler(
        scheduler, torch.device("cpu"), steps, denoising[0], denoising[1], seed=seed
    )
    pipeline._num_timesteps = timesteps.shape[0]  # as _old_invoke sets it

    def callback(state: Any) -> None:
        if stop_after is not None and state.step >= stop_after:
            raise Stop(f"stopped after step {state.step}")

    latents = torch.zeros_like(noise) if start_latents is None else start_latents
    kwargs = dict(
        latents=latents,
        scheduler_step_kwargs=step_kwargs,
        conditioning_data=conditioning_data,
        noise=noise,
        seed=seed,
        timesteps=timesteps,
        init_timestep=init_timestep,
        callback=callback,
        mask=mask,
        masked_latents=None if mask is None else torch.where(mask < 0.5, 0.0, latents),  # as prep_inpaint_mask
        control_data=control_data,
    )
    if mode == "plain":
        return pipeline.latents_from_embeddings(**kwargs)
    if mode == "builtin":
        with hidiffusion_patch(
            pipeline,
            name_or_path="tiny",  # InvokeAI passes the model's source; unknown names fall back to module keys
            apply_raunet=True,
            apply_window_attn=True,
            has_controlnet=bool(control_data),
            is_controlnet_text_to_image=bool(control_data) and start_latents is None,
            t1_ratio=BUILTIN_T1,
            t2_ratio=BUILTIN_T2,
            generator=torch.Generator(device="cpu").manual_seed(seed),
        ):
            return pipeline.latents_from_embeddings(**kwargs)
    if mode == "hidiff":
        if config is None:
            settings = {
                "window_shift": "reference",
                "at_native": "apply",
                "t1_ratio": BUILTIN_T1,
                "t2_ratio": BUILTIN_T2,
            }
            config = HiDiffusionConfig(**{**settings, **(options or {})})
        torch.manual_seed(seed)  # reference mode draws the shifts from the global RNG; the built-in from this seed
        return _denoise_with_hidiffusion(
            pipeline.latents_from_embeddings,
            config,
            start_latents is not None,
            reports if reports is not None else [],
            **kwargs,
        )
    raise ValueError(f"unknown mode {mode!r}")


def model_state(unet: torch.nn.Module) -> dict:
    """What a patch could leave behind: weights, hooks, classes, instance attributes."""
    return {
        "weights": {k: v.clone() for k, v in unet.state_dict().items()},
        "hooks": sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in unet.modules()),
        "classes": [type(m).__qualname__ for m in unet.modules()],
        "attributes": {name: sorted(vars(m)) for name, m in unet.named_modules()},
        "num_upsamplers": getattr(unet, "num_upsamplers", None),
    }


def leftovers(before: dict, after: dict) -> dict:
    """How ``after`` differs from ``before`` (empty: nothing left behind)."""
    out: dict[str, Any] = {}
    changed = [k for k in before["weights"] if not torch.equal(before["weights"][k], after["weights"][k])]
    if changed:
        out["weights_changed"] = len(changed)
    for key in ("hooks", "classes", "num_upsamplers"):
        if before[key] != after[key]:
            out[key] = "changed"
    added = sorted(
        {a for name, attrs in after["attributes"].items() for a in set(attrs) - set(before["attributes"].get(name, []))}
    )
    if added:
        out["attributes_added"] = added
    return out


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def cases(native: int, steps: int) -> list[tuple[str, Callable[[], dict]]]:
    unet, scheduler = tiny_unet_and_scheduler(native)
    two_x = (2 * native, 2 * native)

    def run(mode: str, **kw: Any) -> torch.Tensor:
        return denoise(mode, unet, scheduler, kw.pop("seed", 1), kw.pop("hw", two_x), kw.pop("steps", steps), **kw)

    def txt2img() -> dict:
        ours, builtin, plain = run("hidiff"), run("builtin"), run("plain")
        return {"hidiff vs built-in": max_diff(ours, builtin), "built-in vs plain": max_diff(builtin, plain)}

    def sdxl_txt2img() -> dict:
        xl, xl_scheduler = tiny_sdxl_and_scheduler(native)
        cond = sdxl_conditioning(xl, two_x)
        out = {
            m: denoise(m, xl, xl_scheduler, 1, two_x, steps, conditioning_data=cond)
            for m in ("hidiff", "builtin", "plain")
        }
        return {
            "hidiff vs built-in": max_diff(out["hidiff"], out["builtin"]),
            "built-in vs plain": max_diff(out["builtin"], out["plain"]),
        }

    def img2img() -> dict:
        image = noise_of(99, *two_x)
        kw = {"denoising": (0.5, 1.0), "start_latents": image}
        ours, builtin = run("hidiff", **kw), run("builtin", **kw)
        return {"hidiff vs built-in": max_diff(ours, builtin)}

    def few_steps_after_interrupt() -> dict:
        # an interrupted built-in run, then a full one: does the second start at step 0?
        before = model_state(unet)
        for mode in ("builtin", "hidiff"):
            with contextlib.suppress(Stop):
                run(mode, stop_after=2)
        after = model_state(unet)
        ours, builtin = run("hidiff"), run("builtin")
        return {"hidiff vs built-in after an interrupt": max_diff(ours, builtin), "left": leftovers(before, after)}

    def left_behind() -> dict:
        result = {}
        for mode in ("builtin", "hidiff"):
            before = model_state(unet)
            run(mode)
            result[mode] = leftovers(before, model_state(unet)) or "nothing"
        stock = run("plain")
        result["plain after both vs a fresh model's plain"] = max_diff(stock, run_fresh_plain(native, steps, two_x))
        return result

    def img2img_end() -> dict:
        kw = {"denoising": (0.0, 0.5)}
        return {"hidiff vs built-in": max_diff(run("hidiff", **kw), run("builtin", **kw))}

    def odd_size() -> dict:
        hw = (2 * native + 5, 2 * native + 3)
        result: dict[str, Any] = {}
        outs = {}
        for mode in ("builtin", "hidiff", "plain"):
            try:
                outs[mode] = run(mode, hw=hw)
                result[mode] = f"ran, finite: {bool(torch.isfinite(outs[mode]).all())}"
            except Exception as e:  # noqa: BLE001 - the point is to record how it fails
                result[mode] = f"{type(e).__name__}: {str(e)[:160]}"
        if "builtin" in outs and "hidiff" in outs:
            result["hidiff vs built-in"] = max_diff(outs["hidiff"], outs["builtin"])
        return result

    def other_widths() -> dict:
        # an SD 1.x-layout U-Net whose third stage keeps the second's width: no conv_shortcut there
        other, other_scheduler = tiny_unet_and_scheduler(native, widths=(32, 64, 64, 64))
        result = {}
        for mode in ("builtin", "hidiff"):
            before = model_state(other)
            try:
                denoise(mode, other, other_scheduler, 1, two_x, steps)
                result[mode] = "ran"
            except Exception as e:  # noqa: BLE001 - the point is to record how it fails
                result[mode] = f"{type(e).__name__}: {str(e)[:100]}"
            result[f"{mode} left"] = leftovers(before, model_state(other)) or "nothing"
        return result

    def at_native() -> dict:
        hw = (native, native)
        plain = run("plain", hw=hw)
        builtin = run("builtin", hw=hw)
        default = run("hidiff", hw=hw, options={"at_native": "skip"})
        return {
            "built-in vs plain": max_diff(builtin, plain),
            "hidiff (default at_native=skip) vs plain": max_diff(default, plain),
        }

    def seeds_in_sequence() -> dict:
        # InvokeAI runs a batch's images one by one, each from its own seed
        alone = {mode: run(mode, seed=12) for mode in ("builtin", "hidiff")}
        for mode in ("builtin", "hidiff"):
            run(mode, seed=11)
        after = {mode: run(mode, seed=12) for mode in ("builtin", "hidiff")}
        return {f"{mode}: seed 12 alone vs after seed 11": max_diff(alone[mode], after[mode]) for mode in alone}

    return [
        ("text-to-image at 2x native", txt2img),
        ("SDXL text-to-image at 2x native", sdxl_txt2img),
        ("image-to-image, denoising_start 0.5", img2img),
        ("denoising_end 0.5", img2img_end),
        ("interrupted after 2 steps, then a full run", few_steps_after_interrupt),
        ("left on the U-Net after a run; plain afterwards", left_behind),
        ("odd size (2x native + 5, + 3 latents)", odd_size),
        ("at native size", at_native),
        ("an SD 1.x layout with other widths", other_widths),
        ("batch: seed 12 alone and after seed 11", seeds_in_sequence),
    ]


def run_fresh_plain(native: int, steps: int, hw: tuple[int, int]) -> torch.Tensor:
    unet, scheduler = tiny_unet_and_scheduler(native)
    return denoise("plain", unet, scheduler, 1, hw, steps)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--native", type=int, default=64, help="native latent side of the U-Net (64: SD 1.5)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    results = {}
    for name, case in cases(args.native, args.steps):
        results[name] = case()
        print(f"{name}: {json.dumps(results[name])}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"native": args.native, "steps": args.steps, "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
