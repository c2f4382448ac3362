"""The WebUI host (hidiff/webui) under the contract, without a WebUI.

The U-Net is ComfyUI's ldm-layout ``UNetModel`` (what reForge runs; A1111's and Forge's have
the same layout), loaded as the ComfyUI host loads it; HiDiffusion goes on through the
extension's own glue, ``hidiff.webui.host.prepare_sampling``, on a duck-typed generation
``p`` whose sampler function is k-diffusion's Euler, called as the WebUIs call it (the CFG
denoiser, x = noise x sigma_max, the sigmas). Runs where ComfyUI is (.comfy).
"""

from __future__ import annotations

import dataclasses
import warnings
from types import SimpleNamespace
from typing import Any

import torch
import weights
from hosts import ComfyHost, _level_at, euler_scheduler, state_of

from hidiff.webui import host, options


def _euler(model, x, sigmas, extra_args=None, callback=None, disable=None):
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * x.new_ones([x.shape[0]]), **(extra_args or {}))
        x = x + (x - denoised) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
        if callback is not None:
            callback({"i": i, "x": x})
    return x


class WebUIHost(ComfyHost):
    name = "webui"

    def _denoiser(self, model: Any, layout: str, hw: tuple[int, int]):
        cond = self._conds(layout, hw)[0]
        y = model.model.encode_adm(**cond[1]) if layout == "sdxl" else None

        def denoise(x, sigma):
            kwargs = {"c_crossattn": cond[0].expand(x.shape[0], -1, -1)}
            if y is not None:
                kwargs["y"] = y.expand(x.shape[0], -1)
            return model.model.apply_model(x, sigma, **kwargs)

        return denoise

    def _generation(self, model: Any, func: Any, options_: dict, noise: torch.Tensor, records: list) -> Any:
        unet = model.model.diffusion_model
        native = (weights.NATIVE, weights.NATIVE)
        p = SimpleNamespace(
            sd_model=SimpleNamespace(model=SimpleNamespace(diffusion_model=unet), parameterization="eps"),
            sampler=SimpleNamespace(func=func),
            extra_generation_params={},
        )
        settings = options.read_args(options.api_args(True, **options_))
        # The contract's tiny models are native at 32 latents: the network read is told so.
        import hidiff.webui.structure as structure

        real_describe = structure.describe

        def describe(*args, **kwargs):
            network = real_describe(*args, **kwargs)
            arch = dataclasses.replace(network.architecture, native=native)
            return dataclasses.replace(network, architecture=arch)

        structure.describe = describe
        try:
            assert host.prepare_sampling(p, settings, noise, print, recorder=records.append)
        finally:
            structure.describe = real_describe
        return p

    def sample(self, model, layout, noise, steps, options, raise_at=None):
        records: list = []
        p = self._generation(model, _euler, options, noise, records)
        sigmas = euler_scheduler(steps).sigmas

        def callback(state):
            if state["i"] + 1 == raise_at:
                raise KeyboardInterrupt

        with torch.no_grad():
            p.sampler.func(
                self._denoiser(model, layout, tuple(noise.shape[-2:])),
                noise * sigmas[0],
                sigmas=sigmas,
                extra_args={},
                callback=callback,
            )
        return records

    def call_at(self, model, layout, noise, steps, options, position):
        sigmas = [float(s) for s in euler_scheduler(steps).sigmas]
        sigma = _level_at(sigmas[:-1], position, top=2 * sigmas[0])

        def one_call(model_fn, x, sigmas, extra_args=None, callback=None, disable=None):
            model_fn(x, sigma * x.new_ones([x.shape[0]]), **(extra_args or {}))
            return x

        records: list = []
        p = self._generation(model, one_call, options, noise, records)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with torch.no_grad():
                p.sampler.func(
                    self._denoiser(model, layout, tuple(noise.shape[-2:])),
                    noise * sigmas[0],
                    sigmas=torch.tensor(sigmas),
                    extra_args={},
                )
        return records[-1], [str(w.message) for w in caught]

    def stock(self, model, layout, noise):
        sigmas = euler_scheduler(2).sigmas
        with torch.no_grad():
            out = _euler(self._denoiser(model, layout, tuple(noise.shape[-2:])), noise * sigmas[0], sigmas)
        return state_of(model.model.diffusion_model), out
