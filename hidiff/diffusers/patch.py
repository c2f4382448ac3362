"""Attach HiDiffusion to a diffusers U-Net with plain torch module hooks, and take it off.

No class, forward method, attribute or attention processor of the model is replaced:
everything is a forward (pre-)hook, so LoRA layers, IP-Adapter processors, FreeU, CPU
offload hooks and later diffusers releases keep working, and removing the hooks
restores the model exactly. A :class:`Patch` per U-Net holds the options and the hook
groups (:mod:`.raunet`, :mod:`.attention`, :mod:`.controlnet`), which act by the core's
per-call rules (:mod:`hidiff.core.rules`); a pre-hook on the U-Net finds the step of each call (:mod:`.steps`), asks the core planner what to do, and
opens a per-call state (:mod:`.hooks`) that the groups' hooks read; a post-hook closes
it, also when the call raises.

The patch lives on the U-Net it patches (an attribute removed with the patch): no
module-level table, so a dropped model is freed, and a deep copy of a patched model is
patched on its own.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import pickle
import sys
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import torch
from torch import nn

from ..core import ops, rules
from ..core.architecture import Architecture, UnsupportedModelError
from ..core.config import HiDiffusionConfig
from ..core.planner import Plan, Progress, Task, feature_sizes, plan_call
from ..core.rules import CallRecord
from .attention import SelfAttentionHooks
from .controlnet import ControlNetHooks
from .hooks import CallState, Hook, HookGroup, arg, enter_call, leave_call
from .model import detect_layout, find_unet, model_name
from .raunet import RAUNetHooks
from .steps import StepTracker, as_float
from .tome import check_tomesd

#: The attribute of a patched U-Net that holds its patch.
PATCH_ATTRIBUTE = "_hidiff_patch"


@dataclass
class RunState:
    """What one thread's current run of a patched U-Net carries from call to call."""

    tracker: StepTracker = field(default_factory=StepTracker)
    seeds: list = field(default_factory=list)  # window-shift seed of each batch row
    mirrored: Optional[list] = None  # an inversion's timesteps (in sampling order): the schedule runs backwards
    last: Optional[CallRecord] = None  # this thread's latest call
    warned: bool = False  # a call off the followed schedule was reported
    warned_back: bool = False  # calls walking the followed schedule upwards were reported


#: What the warnings about foreign schedules tell an inversion loop to do.
_INVERSION_FIX = (
    "To invert with HiDiffusion, use hidiff.invert, or let hidiff see the inverse scheduler: set it as "
    "pipe.inverse_scheduler (as DiffEdit and pix2pix-zero do) or apply_hidiffusion(unet, scheduler=inverse_scheduler) "
    "for the inversion; its ascending timesteps are then planned as the sampling they mirror."
)

# Runs per thread (and asyncio task), weakly keyed by patch: two threads calling one
# pipeline each follow their own run, and a dropped patch leaves nothing here.
_RUNS: contextvars.ContextVar[Optional[weakref.WeakKeyDictionary]] = contextvars.ContextVar("hidiff_runs", default=None)


class Patch:
    """HiDiffusion on one U-Net: options, hook groups, and where the schedule comes from."""

    def __init__(self, unet: nn.Module, pipe: Any, arch: Architecture, config: HiDiffusionConfig, scheduler: Any):
        self.unet = unet
        self.arch = arch
        self.config = config
        self._pipe = weakref.ref(pipe) if pipe is not None else None
        self._scheduler = scheduler
        self.last_record: Optional[CallRecord] = None
        pipe_name = type(pipe).__name__ if pipe is not None else ""
        self._inpainting_pipe = "Inpaint" in pipe_name
        self._text2img_controlnet = bool(
            getattr(pipe, "controlnet", None) is not None and not any(k in pipe_name for k in ("Img2Img", "Inpaint"))
        )
        self.raunet = RAUNetHooks(self) if config.raunet else None
        acts_on_attention = config.window_attn or config.kv_downsample > 1
        self.attention = SelfAttentionHooks(self) if acts_on_attention else None
        self.controlnet = ControlNetHooks(self)
        self.groups: list[HookGroup] = [g for g in (self.raunet, self.attention, self.controlnet) if g]
        self._handles: list = []

    # ------------------------------------------------------------------ wiring
    def attach(self) -> None:
        self._handles.append(self.unet.register_forward_pre_hook(Hook(self, "on_call"), with_kwargs=True))
        self._handles.append(self.unet.register_forward_hook(Hook(self, "on_done"), always_call=True))
        self._handles.append(self.unet.register_state_dict_pre_hook(Hook(self, "on_state_dict")))
        for group in self.groups:
            group.attach(self.unet)

    def detach(self) -> None:
        # A call of this thread cut short without its post-hook (KeyboardInterrupt) may have
        # left the conv re-geometried: put it back before the model is handed back stock.
        self._close(leave_call(self))
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for group in self.groups:
            group.detach()

    def describe(self) -> dict[str, str]:
        """Every module this patch changes, with what is done to it: the union of its groups'."""
        names: dict[str, str] = {}
        for group in self.groups:
            names.update(group.describe(self.unet))
        return names

    # ------------------------------------------------------------------ copies and saving
    # A deep copy keeps its own pipeline when the pipeline is copied with it; a U-Net copied
    # alone keeps following the original pipeline's scheduler (or the scheduler it was given:
    # a copy of that scheduler, which nothing drives, would put every call off its schedule).
    def __deepcopy__(self, memo: dict) -> Patch:
        new = Patch.__new__(Patch)
        memo[id(self)] = new
        pipe = self.pipe
        for key, value in vars(self).items():
            if key not in ("_pipe", "_scheduler"):
                setattr(new, key, copy.deepcopy(value, memo))
        new._scheduler = memo.get(id(self._scheduler), self._scheduler)
        if pipe is not None and id(pipe) in memo:
            new._pipe = weakref.ref(memo[id(pipe)])
        else:
            new._pipe = None
            if new._scheduler is None and pipe is not None:
                new._scheduler = pipe.scheduler
        return new

    # A pickle cannot take the schedule along: the pipeline (or the scheduler given to
    # apply_hidiffusion) stays in this process, so a loaded U-Net would place its calls by
    # timestep value and run RAU-Net at other steps. Refused while pickling, so nothing of the
    # model changes; a patch that follows no schedule places calls that way already and pickles exactly.
    def __getstate__(self) -> dict:
        followed = self.pipe if self.pipe is not None else self._scheduler
        if followed is not None:
            raise pickle.PicklingError(unpicklable_message(self.unet, followed))
        return {**vars(self), "_pipe": None}

    def on_state_dict(self, module: nn.Module, prefix: str, keep_vars: bool) -> None:
        """State-dict pre-hook: warn when a library's save call writes the model (it is saved stock)."""
        saver = saving_call()
        if saver is not None:
            warnings.warn(saved_stock_message(self.unet, saver), stacklevel=2)

    # ------------------------------------------------------------------ schedule
    @property
    def pipe(self) -> Any:
        return self._pipe() if self._pipe is not None else None

    @property
    def scheduler(self) -> Any:
        pipe = self.pipe
        if pipe is not None and getattr(pipe, "scheduler", None) is not None:
            return pipe.scheduler
        return self._scheduler

    @property
    def task(self) -> Task:
        scheduler = self.scheduler
        # EDM schedulers (Playground v2.5) parametrise by sigma_data; none of the DDPM-family ones do.
        edm = scheduler is not None and hasattr(getattr(scheduler, "config", None), "sigma_data")
        return Task(inpainting=self._inpainting_pipe, edm=edm, text2img_controlnet=self._text2img_controlnet)

    @property
    def layout(self) -> Architecture:
        return self.arch

    def plan(self, latent: tuple[int, int], step: int, total: int) -> Plan:
        """The plan of a call at step ``step`` of ``total`` on a latent of size ``latent``."""
        return plan_call(self.arch, latent, self.config, Progress(step, total), self.task)

    def feature_sizes(self, latent: tuple[int, int], conv: bool, pool: bool) -> tuple:
        """(skip features in ControlNet residual order, the mid block's, T2I-Adapter residual sizes)."""
        skips, mid, adapter, _ = feature_sizes(self.arch, latent, conv, pool)
        return list(skips), mid, list(adapter)

    @property
    def controlnet_mode(self) -> str:
        return self.controlnet.mode

    def run_state(self) -> RunState:
        runs = _RUNS.get()
        if runs is None:
            runs = weakref.WeakKeyDictionary()
            _RUNS.set(runs)
        state = runs.get(self)
        if state is None:
            state = runs[self] = RunState()
        return state

    def latest_record(self) -> Optional[CallRecord]:
        """This thread's latest call; where this thread has made none, the latest of any thread."""
        runs = _RUNS.get()
        run = runs.get(self) if runs is not None else None
        return run.last if run is not None and run.last is not None else self.last_record

    def locate(self, sample: torch.Tensor, timestep: Any) -> Progress:
        """The step of a call; a new run takes each image's window-shift seed from its latents.
        A step's ControlNet is called before its U-Net, so whichever comes first starts the run."""
        run = self.run_state()
        t = as_float(timestep)
        if run.mirrored is not None:
            # Inversion walks the schedule backwards: a call at the timestep of sampling
            # step i is planned as step i, so RAU-Net acts where sampling will.
            mirrored = rules.schedule_progress(t, run.mirrored)
            if mirrored is None:
                raise RuntimeError(f"hidiff: timestep {t} is not in the inversion's schedule")
            progress = mirrored
        else:
            progress = run.tracker.locate(timestep, self.scheduler, others=self._other_schedulers())
            if run.tracker.off_schedule and not run.warned:
                run.warned = True
                warnings.warn(self._off_schedule(t), stacklevel=2)
            if run.tracker.walking_back and not run.warned_back:
                run.warned_back = True
                warnings.warn(self._walking_back(t), stacklevel=2)
        if (progress.new_run and run.mirrored is None) or not run.seeds:
            seeded = self.config.window_shift == "seeded" and self.config.window_seed is None
            run.seeds = ops.image_seeds(sample) if seeded else [0]
        return progress

    def _other_schedulers(self) -> list:
        """A pipeline's inverse scheduler (DiffEdit, pix2pix-zero): its calls are planned as the
        sampling they mirror (hidiff.core.rules.schedule_progress)."""
        pipe = self.pipe
        inverse = getattr(pipe, "inverse_scheduler", None) if pipe is not None else None
        return [inverse] if inverse is not None else []

    def _off_schedule(self, t: float) -> str:
        pipe = self.pipe
        owner = f"{type(pipe).__name__}'s scheduler" if pipe is not None else "the scheduler given to apply_hidiffusion"
        fix = f" (remove it from {type(pipe).__name__} first)" if pipe is not None else ""
        return (
            f"hidiff: {model_name(self.unet)} was called at timestep {t:g}, which is not in the timesteps of "
            f"{owner}, the schedule it follows: its step is estimated from its noise level, as the step of that "
            "schedule whose interval holds it (hidiff's rule for calls off the sampled schedule, docs/how-it-works.md), so RAU-Net's "
            "step ranges and the preset may not fit this run. If another pipeline shares this U-Net with its own "
            f"scheduler, apply HiDiffusion through that pipeline{fix} or give each pipeline its own U-Net. "
            f"{_INVERSION_FIX}"
        )

    def _walking_back(self, t: float) -> str:
        return (
            f"hidiff: {model_name(self.unet)} was called at timestep {t:g}, above the previous call's, in the "
            "schedule it follows: the calls walk it upwards, as an inversion does with its own inverse scheduler. "
            "From this call on each call is planned as the sampling step at its timestep (the run's first call was "
            f"planned as the first step of a sampling run). {_INVERSION_FIX}"
        )

    def plan_for(self, sample: torch.Tensor, timestep: Any) -> Plan:
        progress = self.locate(sample, timestep)
        return self.plan((int(sample.shape[-2]), int(sample.shape[-1])), progress.index, progress.total)

    # ------------------------------------------------------------------ the U-Net call
    def on_call(self, module: nn.Module, args: tuple, kwargs: dict) -> Optional[tuple]:
        sample = arg(args, kwargs, 0, "sample")
        plan = self.plan_for(sample, arg(args, kwargs, 1, "timestep"))
        if plan.active:
            check_tomesd(self.unet, self.config)  # tomesd applied after hidiff
        record = CallRecord.of(plan, int(sample.shape[0]))
        self._close(leave_call(self))  # a call that ended without its post-hook (killed thread)
        run = self.run_state()
        enter_call(self, CallState(plan, record, seeds=rules.row_seeds(self.config, record.batch, run.seeds)))
        run.last = self.last_record = record
        if not plan.active:
            return None
        return args, self.controlnet.fit(plan, kwargs, record)

    def on_done(self, module: nn.Module, args: tuple, output: Any) -> None:
        self._close(leave_call(self))

    def _close(self, call: Optional[CallState]) -> None:
        if call is not None and self.raunet is not None:
            self.raunet.release(call)

    @contextlib.contextmanager
    def mirrored(self, timesteps: Any) -> Iterator[None]:
        """Inside the block this thread's calls walk ``timesteps`` (sampling order) backwards:
        a DDIM inversion, planned as the sampling it inverts."""
        run = self.run_state()
        run.mirrored, run.seeds = [float(t) for t in timesteps], []
        try:
            yield
        finally:
            run.mirrored, run.tracker, run.seeds = None, StepTracker(), []


# ---------------------------------------------------------------------- public API
def apply_hidiffusion(
    pipe_or_unet: Any,
    *,
    raunet: Optional[bool] = None,
    window_attn: Optional[bool] = None,
    apply_raunet: Optional[bool] = None,
    apply_window_attn: Optional[bool] = None,
    config: Optional[HiDiffusionConfig] = None,
    scheduler: Any = None,
    **options: Any,
) -> Any:
    """Apply HiDiffusion to a diffusers pipeline or U-Net in place and return it.

    Args:
        pipe_or_unet: a Stable Diffusion pipeline (anything with a ``unet``) or a
            ``UNet2DConditionModel``.
        raunet, window_attn: turn RAU-Net / MSW-MSA on or off (default: on).
        apply_raunet, apply_window_attn: the published package's names for the same.
        config: a :class:`HiDiffusionConfig` to start from.
        scheduler: for a bare U-Net, the scheduler whose timesteps drive it (a pipeline's
            own scheduler is always used, even if swapped after this call).
        **options: fields of :class:`HiDiffusionConfig` (``t1_ratio=0.5``, ``preset=...``).

    Applying again replaces the earlier options. Every input is checked before the
    model is touched.
    """
    unet, pipe = find_unet(pipe_or_unet)
    layout = detect_layout(unet)
    _check_owner(
        unet,
        pipe,
        "apply it through",
        "Call hidiff.remove_hidiffusion on that pipeline (or on the U-Net itself) first, or give each pipeline its "
        "own U-Net (copy.deepcopy(pipe.unet)).",
    )
    for name, value in (("apply_raunet", apply_raunet), ("apply_window_attn", apply_window_attn)):
        if value is not None and not isinstance(value, bool):
            raise TypeError(f"{name} must be True or False, got {value!r}")
    if raunet is not None and apply_raunet is not None and raunet != apply_raunet:
        raise ValueError("raunet and apply_raunet disagree; pass only one of them")
    if window_attn is not None and apply_window_attn is not None and window_attn != apply_window_attn:
        raise ValueError("window_attn and apply_window_attn disagree; pass only one of them")
    if config is not None and not isinstance(config, HiDiffusionConfig):
        raise TypeError(f"config must be a hidiff.HiDiffusionConfig, got {type(config).__name__}")
    switches = {
        key: value
        for key, value in (
            ("raunet", raunet if raunet is not None else apply_raunet),
            ("window_attn", window_attn if window_attn is not None else apply_window_attn),
        )
        if value is not None
    }
    cfg = HiDiffusionConfig.from_options(config, **switches, **options)
    cfg.check_ratios(layout.kind)
    check_tomesd(unet, cfg)
    if pipe is None and scheduler is None:
        warnings.warn(
            f"hidiff: {model_name(unet)} was patched without its pipeline or a scheduler, so the step of each call "
            "is estimated from the timestep value over 1000 training steps: img2img strength, few-step presets "
            "(SDXL Turbo) and RAU-Net's step ranges cannot follow the real run. Pass the pipeline, or "
            "apply_hidiffusion(unet, scheduler=pipe.scheduler).",
            stacklevel=2,
        )
    remove_hidiffusion(unet)
    patch = Patch(unet, pipe, layout, cfg, scheduler)
    try:
        patch.attach()
    except BaseException:
        patch.detach()
        raise
    setattr(unet, PATCH_ATTRIBUTE, patch)
    return pipe_or_unet


def _check_owner(unet: nn.Module, pipe: Any, doing: str, fix: str) -> None:
    """Refuse to act through ``pipe`` on a U-Net patched through another live pipeline (one
    U-Net shared by the pipelines built from the same components)."""
    existing = getattr(unet, PATCH_ATTRIBUTE, None)
    if existing is not None and pipe is not None and existing.pipe is not None and existing.pipe is not pipe:
        raise ValueError(
            f"{model_name(unet)} is shared with another pipeline ({type(existing.pipe).__name__}) and patched through "
            f"it; one U-Net follows one pipeline's schedule, so hidiff will not {doing} {type(pipe).__name__}. {fix}"
        )


#: (module, function) of the library calls that save a model's weights to files.
_SAVERS = (("diffusers", "save_pretrained"), ("accelerate", "save_model"), ("safetensors", "save_model"))


def saving_call() -> Optional[str]:
    """``module.function`` of the library save call this state_dict() is made for, if any."""
    frame = sys._getframe(2)
    for _ in range(20):
        if frame is None:
            return None
        module = str(frame.f_globals.get("__name__", ""))
        for library, function in _SAVERS:
            if frame.f_code.co_name == function and module.split(".")[0] == library:
                return f"{library} {function}"
        frame = frame.f_back
    return None


def saved_stock_message(unet: nn.Module, saver: str) -> str:
    return (
        f"hidiff: {model_name(unet)} is saved by {saver} without HiDiffusion: the patch is applied at run time "
        "and is not part of the weights or the config, so the saved model loads stock. Apply HiDiffusion again "
        "after loading (hidiff.apply_hidiffusion(pipe))."
    )


def unpicklable_message(unet: nn.Module, followed: Any) -> str:
    whose = f"{type(followed).__name__}'s scheduler" if hasattr(followed, "unet") else type(followed).__name__
    return (
        f"hidiff: cannot pickle {model_name(unet)} (torch.save of the module or its pipeline) while HiDiffusion is "
        f"applied: the patch follows {whose}, which does not travel with the pickle, so a loaded copy would run "
        "RAU-Net at other steps. Save the weights instead (torch.save(unet.state_dict(), path) or "
        "save_pretrained) and apply HiDiffusion again after loading, or call hidiff.remove_hidiffusion first; "
        "copy.deepcopy works while patched."
    )


def remove_hidiffusion(pipe_or_unet: Any) -> Any:
    """Undo :func:`apply_hidiffusion` exactly; a no-op on a model that is not patched.

    A U-Net patched through one pipeline is not un-patched through another pipeline that
    shares it (that raises ValueError); remove it through its own pipeline or the U-Net.
    """
    unet, pipe = find_unet(pipe_or_unet)
    _check_owner(
        unet, pipe, "remove it through", "Remove it through that pipeline, or through the U-Net itself (pipe.unet)."
    )
    patch = getattr(unet, PATCH_ATTRIBUTE, None)
    if patch is not None:
        patch.detach()
        delattr(unet, PATCH_ATTRIBUTE)
    return pipe_or_unet


def get_patch(pipe_or_unet: Any) -> Optional[Patch]:
    """The live :class:`Patch` of a patched pipeline or U-Net, else None."""
    unet, _ = find_unet(pipe_or_unet)
    return getattr(unet, PATCH_ATTRIBUTE, None)


def is_patched(pipe_or_unet: Any) -> bool:
    return get_patch(pipe_or_unet) is not None


def last_call(pipe_or_unet: Any) -> Optional[CallRecord]:
    """What HiDiffusion did in the latest U-Net call of a patched model (None if none).

    Per thread (and asyncio task): the latest call made by the caller's thread, so a step
    callback reads its own run's record while other threads use the same pipeline; from a
    thread that has made no call, the latest call of any thread.
    """
    patch = get_patch(pipe_or_unet)
    return patch.latest_record() if patch is not None else None


def changes(pipe_or_unet: Any, **options: Any) -> dict[str, str]:
    """Module path -> what :func:`apply_hidiffusion` with ``options`` would do to it (nothing is changed)."""
    unet, pipe = find_unet(pipe_or_unet)
    return Patch(unet, pipe, detect_layout(unet), HiDiffusionConfig.from_options(**options), None).describe()


@contextlib.contextmanager
def hidiffusion(pipe_or_unet: Any, **options: Any) -> Iterator[Any]:
    """``with hidiffusion(pipe): pipe(...)``: applied inside the block, removed on exit (also on error).

    An earlier patch of the same model is put back on exit.
    """
    previous = get_patch(pipe_or_unet)
    apply_hidiffusion(pipe_or_unet, **options)
    try:
        yield pipe_or_unet
    finally:
        remove_hidiffusion(pipe_or_unet)
        if previous is not None:
            pipe = previous.pipe
            apply_hidiffusion(
                pipe if pipe is not None else previous.unet, config=previous.config, scheduler=previous._scheduler
            )


__all__ = [
    "apply_hidiffusion",
    "remove_hidiffusion",
    "hidiffusion",
    "get_patch",
    "is_patched",
    "last_call",
    "CallRecord",
    "Patch",
    "UnsupportedModelError",
]
