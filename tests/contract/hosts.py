"""The hosts under the contract, each behind one small adapter.

A host joins the contract (tests/contract/test_contract.py) with one :class:`Host` subclass
added to :data:`HOSTS`. The suite then runs every check on it with the same tiny weights
(:mod:`weights`) and compares what it reports with what the core plans. The adapter only
translates: it builds the host's model from the shared weights, runs the host's own sampling
loop with HiDiffusion on, and hands back hidiff's core :class:`~hidiff.core.rules.CallRecord`
of every U-Net call. It decides nothing about HiDiffusion itself.
"""

from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
import weights

from hidiff.core.rules import CallRecord


class Host:
    """How the contract drives one host. Subclass it, fill in the methods, add it to HOSTS.

    Conventions for every method:

    * ``layout`` is ``"sd15"`` or ``"sdxl"`` (:data:`weights.CONFIGS`); the model must hold the
      weights of :func:`weights.diffusers_unet` for it (convert them with the host's own
      converter), at native size :data:`weights.NATIVE`;
    * ``noise`` is a (B, 4, H, W) float32 tensor of unit-variance noise: the run starts from it
      at full noise (scale it as the host's sampler does);
    * every run samples ``steps`` steps of the Euler sampler on the sigmas of diffusers'
      ``EulerDiscreteScheduler`` (scaled-linear betas 0.00085-0.012, 1000 training steps,
      ``trailing`` spacing) with the text of :func:`weights.text` and guidance 1 (one branch);
    * ``options`` are :class:`hidiff.HiDiffusionConfig` fields passed to the host's way of
      applying HiDiffusion, with ``native=(NATIVE, NATIVE)`` where the host needs to be told;
    * records are the core's ``CallRecord`` objects, one per U-Net call HiDiffusion acted on
      (``record.preset`` not None), in call order.
    """

    name = ""

    def unavailable(self) -> Optional[str]:
        """Why this Python cannot run the host (the suite skips it with this reason), or None."""
        return None

    def load(self, layout: str) -> Any:
        """The host's model of ``layout`` holding the contract's weights."""
        raise NotImplementedError

    def sample(
        self, model: Any, layout: str, noise: torch.Tensor, steps: int, options: dict, raise_at: Optional[int] = None
    ) -> list[CallRecord]:
        """Sample with HiDiffusion on, then take it off (also when the run raises); the records.
        ``raise_at``: the host's step callback raises ``KeyboardInterrupt`` at that step (the
        exception propagates out of this method)."""
        raise NotImplementedError

    def call_at(
        self, model: Any, layout: str, noise: torch.Tensor, steps: int, options: dict, position: float
    ) -> tuple[CallRecord, list[str]]:
        """One U-Net call, inside a run of ``steps`` steps, at a noise level given by ``position``
        on the run's schedule: -0.5 is above its first level, i + 0.5 halfway between the levels of
        steps i and i + 1. Returns the call's record and the messages of the warnings it raised."""
        raise NotImplementedError

    def stock(self, model: Any, layout: str, noise: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """What removal must leave exactly as it was: the model's parameters and buffers, and the
        stock (HiDiffusion-free) output of one model call on ``noise`` at a fixed level."""
        raise NotImplementedError


def euler_scheduler(steps: int) -> Any:
    from diffusers import EulerDiscreteScheduler

    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        timestep_spacing="trailing",
    )
    scheduler.set_timesteps(steps)
    return scheduler


def state_of(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict(keep_vars=True).items()}


class DiffusersHost(Host):
    """hidiff.apply_hidiffusion on a UNet2DConditionModel, driven by a plain scheduler loop."""

    name = "diffusers"

    def load(self, layout: str) -> Any:
        return weights.diffusers_unet(layout)

    def _conditioning(self, layout: str, batch: int, hw: tuple[int, int]) -> dict:
        tokens, pooled = weights.text()
        kwargs: dict = {"encoder_hidden_states": tokens.repeat(batch, 1, 1)}
        if layout == "sdxl":
            h, w = 8 * hw[0], 8 * hw[1]
            time_ids = torch.tensor([[h, w, 0, 0, h, w]] * batch, dtype=torch.float32)
            kwargs["added_cond_kwargs"] = {"text_embeds": pooled.repeat(batch, 1), "time_ids": time_ids}
        return kwargs

    def sample(self, model, layout, noise, steps, options, raise_at=None):
        import hidiff

        scheduler = euler_scheduler(steps)
        cond = self._conditioning(layout, noise.shape[0], tuple(noise.shape[-2:]))
        x = noise * float(scheduler.init_noise_sigma)
        records = []
        hidiff.apply_hidiffusion(model, scheduler=scheduler, **options)
        try:
            with torch.no_grad():
                for i, t in enumerate(scheduler.timesteps):
                    if i == raise_at:
                        raise KeyboardInterrupt
                    eps = model(scheduler.scale_model_input(x, t), t, **cond).sample
                    record = hidiff.last_call(model)
                    if record is not None and record.preset is not None:
                        records.append(record)
                    x = scheduler.step(eps, t, x).prev_sample
        finally:
            hidiff.remove_hidiffusion(model)
        return records

    def call_at(self, model, layout, noise, steps, options, position):
        import hidiff

        scheduler = euler_scheduler(steps)
        levels = [float(t) for t in scheduler.timesteps]
        t = _level_at(levels, position, top=1000.0)
        cond = self._conditioning(layout, noise.shape[0], tuple(noise.shape[-2:]))
        hidiff.apply_hidiffusion(model, scheduler=scheduler, **options)
        try:
            with warnings.catch_warnings(record=True) as caught, torch.no_grad():
                warnings.simplefilter("always")
                model(noise, torch.tensor(t), **cond)
            record = hidiff.last_call(model)
        finally:
            hidiff.remove_hidiffusion(model)
        return record, [str(w.message) for w in caught]

    def stock(self, model, layout, noise):
        cond = self._conditioning(layout, noise.shape[0], tuple(noise.shape[-2:]))
        with torch.no_grad():
            out = model(noise, torch.tensor(500.0), **cond).sample
        return state_of(model), out


class ComfyHost(Host):
    """hidiff.comfy.patch.apply_hidiffusion on a ComfyUI ModelPatcher, sampled by ComfyUI itself
    (comfy.sample.sample_custom with its ``euler`` sampler on the same sigmas). Needs a real
    ComfyUI: the .comfy environment (tests/comfy/conftest.py sets it up)."""

    name = "comfyui"

    def unavailable(self) -> Optional[str]:
        try:
            import comfy.sample  # noqa: F401
        except ImportError:
            return "needs ComfyUI: runs in the .comfy environment (tests/contract/test_contract_in_comfy.py runs it)"
        return None

    def load(self, layout: str) -> Any:
        import comfy.utils

        from hidiff.comfy.testing import build_patcher, unet_config

        patcher, config = build_patcher(layout, unet_config(layout), seed=1)
        source = weights.diffusers_unet(layout).state_dict()
        mapping = comfy.utils.unet_to_diffusers(config)
        converted = {ours: source[theirs] for theirs, ours in mapping.items() if theirs in source}
        missing, unexpected = patcher.model.diffusion_model.load_state_dict(converted, strict=False)
        assert not missing and not unexpected and len(converted) == len(source), (missing[:3], unexpected[:3])
        return patcher

    def _conds(self, layout: str, hw: tuple[int, int]) -> list:
        tokens, pooled = weights.text()
        extra: dict = {}
        if layout == "sdxl":
            h, w = 8 * hw[0], 8 * hw[1]
            extra = {"pooled_output": pooled, "width": w, "height": h, "crop_w": 0, "crop_h": 0}
            extra.update(target_width=w, target_height=h)
        return [[tokens, extra]]

    def _run(self, model, layout, noise, sigmas, sampler, callback=None):
        import comfy.sample

        cond = self._conds(layout, tuple(noise.shape[-2:]))
        return comfy.sample.sample_custom(
            model,
            noise,
            1.0,
            sampler,
            torch.as_tensor(sigmas, dtype=torch.float32),
            cond,
            cond,
            torch.zeros_like(noise),
            callback=callback,
            disable_pbar=True,
            seed=0,
        )

    def sample(self, model, layout, noise, steps, options, raise_at=None):
        import comfy.samplers

        from hidiff.comfy.patch import apply_hidiffusion

        records: list = []
        patched = apply_hidiffusion(model, recorder=records.append, native=(weights.NATIVE,) * 2, **options)

        def callback(step, *args):
            if step + 1 == raise_at:  # ComfyUI calls back after each step
                raise KeyboardInterrupt

        sigmas = euler_scheduler(steps).sigmas
        self._run(patched, layout, noise, sigmas, comfy.samplers.ksampler("euler"), callback)
        return records  # the clone is dropped: that is how a ComfyUI patch comes off

    def call_at(self, model, layout, noise, steps, options, position):
        import comfy.samplers

        from hidiff.comfy.patch import apply_hidiffusion

        sigmas = [float(s) for s in euler_scheduler(steps).sigmas]
        sigma = _level_at(sigmas[:-1], position, top=2 * sigmas[0])

        def one_call(model_fn, x, sigmas, extra_args=None, callback=None, disable=None):
            model_fn(x, sigma * x.new_ones([x.shape[0]]), **(extra_args or {}))
            return x

        records: list = []
        patched = apply_hidiffusion(model, recorder=records.append, native=(weights.NATIVE,) * 2, **options)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            self._run(patched, layout, noise, sigmas, comfy.samplers.KSAMPLER(one_call))
        return records[-1], [str(w.message) for w in caught]

    def stock(self, model, layout, noise):
        import comfy.samplers

        sigmas = [float(s) for s in euler_scheduler(2).sigmas]
        out = self._run(model, layout, noise, sigmas, comfy.samplers.ksampler("euler"))
        return state_of(model.model.diffusion_model), out


def _level_at(levels: list[float], position: float, top: float) -> float:
    """The noise level at ``position`` on a falling schedule (see :meth:`Host.call_at`)."""
    if position < 0:
        return (levels[0] + top) / 2
    i = int(position)
    return (levels[i] + levels[i + 1]) / 2


#: Every host under the contract. A new host: one Host subclass, added here.
HOSTS: list[Host] = [DiffusersHost(), ComfyHost()]

# The InvokeAI host's adapter is in its own module (it subclasses DiffusersHost above).
from invokeai_host import InvokeAIHost  # noqa: E402

HOSTS.append(InvokeAIHost())

# The WebUI host: the extension's glue on ComfyUI's ldm-layout U-Net (runs in .comfy).
from webui_host import WebUIHost  # noqa: E402

HOSTS.append(WebUIHost())
