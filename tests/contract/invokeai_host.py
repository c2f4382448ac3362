"""The InvokeAI host under the contract: hidiff's node path (``hidiff.invokeai``) inside InvokeAI's
own denoise (``StableDiffusionGeneratorPipeline.latents_from_embeddings``, InvokeAI's schedule
slicing and step callback). Needs InvokeAI: the .invokeai environment
(tools/install_invokeai.sh); elsewhere it is skipped. To join the contract, hosts.py adds
``InvokeAIHost()`` to HOSTS (imported at its end: this module imports hosts).

InvokeAI always evaluates both guidance branches in one U-Net call (a 2B batch: the
unconditioned rows, then the conditioned ones, of the same latents), also at guidance 1; the
records are those calls'."""

from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
import weights
from hosts import DiffusersHost, _level_at, euler_scheduler

from hidiff.core.config import HiDiffusionConfig


class InvokeAIHost(DiffusersHost):
    """The model is the diffusers U-Net InvokeAI loads; sampling is InvokeAI's."""

    name = "invokeai"

    def unavailable(self) -> Optional[str]:
        try:
            import invokeai.backend.stable_diffusion.diffusers_pipeline  # noqa: F401
        except ImportError:
            return "needs InvokeAI: runs in the .invokeai environment (bash tools/install_invokeai.sh)"
        return None

    def _use_torch_sdp(self) -> None:
        # As the tests' InvokeAI server runs (INVOKEAI_ATTENTION_TYPE=torch-sdp): on the CPU, "auto"
        # makes InvokeAI's pipeline switch the U-Net to sliced attention, which fails on batches > 1.
        from invokeai.app.services.config.config_default import get_config

        get_config().attention_type = "torch-sdp"

    def _conditioning_data(self, layout: str, batch: int, hw: tuple[int, int]) -> Any:
        from invokeai.backend.stable_diffusion.diffusion.conditioning_data import (
            BasicConditioningInfo,
            SDXLConditioningInfo,
            TextConditioningData,
        )

        tokens, pooled = weights.text()
        if layout == "sdxl":
            h, w = 8 * hw[0], 8 * hw[1]
            info: Any = SDXLConditioningInfo(
                embeds=tokens,
                pooled_embeds=pooled,
                add_time_ids=torch.tensor([[h, w, 0, 0, h, w]], dtype=torch.float32),
            )
        else:
            info = BasicConditioningInfo(tokens)
        return TextConditioningData(info, info, None, None, guidance_scale=1.0)

    def sample(self, model, layout, noise, steps, options, raise_at=None):
        import pytest
        from invokeai.app.invocations.denoise_latents import DenoiseLatentsInvocation

        if noise.shape[0] > 1:
            pytest.skip(
                "InvokeAI denoises one image per denoise (a batch is one queue item per image, each with its seed: "
                "tests/invokeai/test_server.py); its pipeline fails on batch > 1 latents without HiDiffusion too"
            )

        import hidiff
        from hidiff.invokeai.nodes import _denoise_with_hidiffusion

        self._use_torch_sdp()
        scheduler = euler_scheduler(steps)
        pipeline = DenoiseLatentsInvocation.create_pipeline(model, scheduler)
        timesteps, init_timestep, step_kwargs = DenoiseLatentsInvocation.init_scheduler(
            scheduler, torch.device("cpu"), steps, 0.0, 1.0, seed=0
        )
        records: list = []

        def on_call(module: Any, args: Any, output: Any) -> None:
            record = hidiff.last_call(model)
            if record is not None and record.preset is not None:
                records.append(record)

        def callback(state: Any) -> None:
            if state.step == raise_at and state.step > 0:  # called before step `state.step` runs
                raise KeyboardInterrupt

        # InvokeAI starts from add_noise(zeros, noise, t0) = noise x sigma_0 (its own scaling)
        probe = model.register_forward_hook(on_call)
        try:
            _denoise_with_hidiffusion(
                pipeline.latents_from_embeddings,
                HiDiffusionConfig(**options),
                False,
                [],
                latents=torch.zeros_like(noise),
                scheduler_step_kwargs=step_kwargs,
                conditioning_data=self._conditioning_data(layout, noise.shape[0], tuple(noise.shape[-2:])),
                noise=noise,
                seed=0,
                timesteps=timesteps,
                init_timestep=init_timestep,
                callback=callback,
            )
        finally:
            probe.remove()
        return records

    def call_at(self, model, layout, noise, steps, options, position):
        import hidiff
        from hidiff.invokeai.run import hidiffusion_run

        scheduler = euler_scheduler(steps)
        t = _level_at([float(v) for v in scheduler.timesteps], position, top=1000.0)
        cond = self._conditioning(layout, noise.shape[0], tuple(noise.shape[-2:]))
        with warnings.catch_warnings(record=True) as caught, torch.no_grad():
            warnings.simplefilter("always")
            with hidiffusion_run(model, scheduler, scheduler.timesteps, HiDiffusionConfig(**options)):
                model(noise, torch.tensor(t), **cond)
                record = hidiff.last_call(model)
        return record, [str(w.message) for w in caught]
