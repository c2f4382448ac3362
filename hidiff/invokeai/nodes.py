"""The InvokeAI node: InvokeAI's SD 1.x/2.x/SDXL denoise (with metadata) plus hidiff's HiDiffusion.

``hidiff_denoise_latents`` is InvokeAI's own ``denoise_latents_meta`` (so text-to-image,
image-to-image with denoising start/end, inpainting, ControlNet, T2I-Adapter, IP-Adapter
and LoRA run exactly as InvokeAI runs them, and the image's metadata gets InvokeAI's
settings) with every hidiff option as an input of the same name and default, built from
:func:`hidiff.core.config.option_specs`. It hooks in where InvokeAI's denoise lets a
subclass in: ``create_pipeline``. The pipeline it returns applies HiDiffusion around its
``latents_from_embeddings`` call, on the schedule InvokeAI actually runs, and removes it on
the way out, also when the denoise fails or is cancelled.

Importing this module imports InvokeAI: it is loaded by the node pack (``invokeai_nodes/``)
inside InvokeAI, or by tests running in InvokeAI's environment. (No ``from __future__ import
annotations``: InvokeAI reads ``invoke``'s return annotation as a class at start-up.)
"""

import functools
from typing import Any, Literal, Optional

from invokeai.app.invocations.denoise_latents import DenoiseLatentsInvocation
from invokeai.app.invocations.metadata_linked import DenoiseLatentsMetaInvocation, LatentsMetaOutput
from invokeai.backend.model_manager.taxonomy import BaseModelType
from invokeai.backend.util.logging import InvokeAILogger
from invokeai.invocation_api import InputField, InvocationContext, MetadataField, invocation
from pydantic import PrivateAttr, create_model, model_validator

from ..core.config import HiDiffusionConfig, OptionSpec, option_specs
from .run import hidiffusion_run, task_of

NODE_TYPE = "hidiff_denoise_latents"
LOGGER = InvokeAILogger.get_logger("hidiff")
#: The key of hidiff's settings and record in the image's metadata.
METADATA_KEY = "hidiff"
#: InvokeAI model bases with a U-Net HiDiffusion is for (the U-Net's structure is checked again at run time).
BASES = (
    BaseModelType.StableDiffusion1,
    BaseModelType.StableDiffusion2,
    BaseModelType.StableDiffusionXL,
    BaseModelType.StableDiffusionXLRefiner,
)
#: InvokeAI's built-in HiDiffusion fields, inherited from denoise_latents: hidden here, and the
#: switch held off (two HiDiffusions on one U-Net would act twice).
BUILTIN_FIELDS = (
    "hidiffusion",
    "hidiffusion_raunet",
    "hidiffusion_window_attn",
    "hidiffusion_t1_ratio",
    "hidiffusion_t2_ratio",
)


def option_field(spec: OptionSpec) -> tuple[Any, Any]:
    """(annotation, InputField) of one hidiff option, validated by InvokeAI at enqueue.

    Choices are enums (dropdowns in the workflow editor; an optional one lists its
    ``none_label`` first, meaning None); numbers carry their range; an optional number or
    bool takes null (None) for the library's automatic choice.
    """
    extra: dict[str, Any] = {"description": spec.help, "title": spec.name}
    default = spec.default
    annotation: Any
    if spec.choices is not None:
        values = tuple(spec.choices)
        if spec.optional:
            values = (spec.none_label, *values)
            default = spec.none_label if default is None else default
        annotation = Literal[values]  # type: ignore[valid-type]
    else:
        base = {"bool": bool, "float": float, "int": int}[spec.kind]
        annotation = Optional[base] if spec.optional else base
        if spec.minimum is not None:
            extra["ge"] = spec.minimum
        if spec.maximum is not None:
            extra["le"] = spec.maximum
    return annotation, InputField(default=default, **extra)


def config_from_fields(node: Any) -> HiDiffusionConfig:
    """The HiDiffusionConfig of a node's option inputs (an optional choice's none_label is None)."""
    options = {}
    for spec in option_specs():
        value = getattr(node, spec.name)
        if spec.optional and spec.choices is not None and value == spec.none_label:
            value = None
        options[spec.name] = value
    return HiDiffusionConfig(**options)


class HiDiffusionDenoiseBase(DenoiseLatentsMetaInvocation):
    """Denoise with hidiff's HiDiffusion: InvokeAI's denoise + metadata at 2x-4x the model's native size."""

    # What HiDiffusion did in this node's denoise (this node object is one session's; InvokeAI
    # makes a new one for every run of a graph).
    _hidiff_reports: list = PrivateAttr(default_factory=list)

    @model_validator(mode="after")
    def _check_options(self) -> "HiDiffusionDenoiseBase":
        # Options that only conflict together (t2_ratio > t1_ratio, kv_levels without
        # kv_downsample): refused at enqueue with InvokeAI's validation error, like a single bad value.
        config_from_fields(self)
        if self.hidiffusion:
            raise ValueError(
                "hidiffusion (InvokeAI's built-in HiDiffusion) must stay off in hidiff_denoise_latents, which "
                "applies hidiff's: set the raunet / window_attn / ... inputs of this node instead"
            )
        return self

    def invoke(self, context: InvocationContext) -> LatentsMetaOutput:
        config = config_from_fields(self)
        base = self.unet.unet.base
        if base not in BASES:
            raise ValueError(
                f"HiDiffusion is for SD 1.x, SD 2.x and SDXL U-Nets; this model's base is {base.value!r}. "
                "Use InvokeAI's own denoise node for it (or remove hidiff_denoise_latents from the graph)."
            )
        self._hidiff_reports.clear()
        output = super().invoke(context)  # runs _old_invoke, which calls self.create_pipeline
        metadata = dict(output.metadata.root) if output.metadata is not None else {}
        reports = self._hidiff_reports
        record = reports[-1].summary() if reports else {"options": config.to_dict()}
        metadata[METADATA_KEY] = record
        return output.model_copy(update={"metadata": MetadataField.model_validate(metadata)})

    def _new_invoke(self, context: InvocationContext) -> Any:
        # InvokeAI's modular denoise (USE_MODULAR_DENOISE=1) builds no pipeline, so this node
        # always runs the default path, where HiDiffusion is applied.
        return self._old_invoke(context)

    def create_pipeline(self, unet: Any, scheduler: Any) -> Any:  # type: ignore[override]
        """InvokeAI's pipeline, whose denoise runs with HiDiffusion on this node's options."""
        pipeline = DenoiseLatentsInvocation.create_pipeline(unet, scheduler)
        pipeline.latents_from_embeddings = functools.partial(
            _denoise_with_hidiffusion,
            pipeline.latents_from_embeddings,
            config_from_fields(self),
            self.latents is not None,
            self._hidiff_reports,
        )
        return pipeline


def _denoise_with_hidiffusion(
    denoise: Any, config: HiDiffusionConfig, has_latents: bool, reports: list, **kwargs: Any
) -> Any:
    """One ``latents_from_embeddings`` call (InvokeAI passes keywords only) with HiDiffusion
    applied to the U-Net for exactly this call; its report is appended to ``reports``."""
    unet = denoise.__self__.unet
    scheduler = denoise.__self__.scheduler
    control = kwargs.get("control_data") or []
    task = task_of(has_latents, kwargs.get("mask") is not None)
    with hidiffusion_run(
        unet, scheduler, kwargs["timesteps"], config, task, [c.model for c in control if c.model is not None]
    ) as report:
        reports.append(report)
        callback = kwargs.get("callback")
        steps = len(kwargs["timesteps"])
        LOGGER.info(f"hidiff: HiDiffusion on for this {report.family} {task} denoise ({steps} steps)")

        def step_callback(state: Any) -> None:
            if state.step > 0:
                report.step_done(unet)
            if callback is not None:
                callback(state)

        try:
            return denoise(**{**kwargs, "callback": step_callback})
        except BaseException as stopped:
            LOGGER.info(f"hidiff: the denoise stopped ({type(stopped).__name__}); HiDiffusion is being removed")
            raise


def _node_class() -> Any:
    fields: dict[str, Any] = {spec.name: option_field(spec) for spec in option_specs()}
    clash = sorted(set(fields) & set(DenoiseLatentsMetaInvocation.model_fields))
    if clash:
        raise RuntimeError(f"hidiff options {clash} clash with InvokeAI's denoise_latents inputs of the same name")
    for name in BUILTIN_FIELDS:
        inherited = DenoiseLatentsMetaInvocation.model_fields[name]
        fields[name] = (
            inherited.annotation,
            InputField(default=inherited.default, description=inherited.description, ui_hidden=True),
        )
    cls = create_model(  # type: ignore[call-overload]
        "HiDiffusionDenoiseLatentsInvocation", __base__=HiDiffusionDenoiseBase, __module__=__name__, **fields
    )
    cls.__doc__ = HiDiffusionDenoiseBase.__doc__
    return invocation(
        NODE_TYPE,
        title="Denoise with HiDiffusion (hidiff) - SD1.5, SDXL",
        tags=["latents", "denoise", "hidiffusion", "hidiff", "txt2img", "t2i", "img2img", "i2i", "upscale"],
        category="latents",
        version="1.0.0",
    )(cls)


HiDiffusionDenoiseLatentsInvocation = _node_class()
