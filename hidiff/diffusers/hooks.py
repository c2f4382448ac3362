"""Hooks as data, and the state of the U-Net call in progress.

Every change hidiff makes to a diffusers model is a torch forward (pre-)hook held by a
:class:`HookGroup` (one per technique). A hook is a :class:`Hook` object naming its
group and the group's method, not a closure: a ``copy.deepcopy`` of the model copies
the group with it (so the copy's hooks serve the copy and can be removed from it), and
``torch.save`` of the module pickles it.

The state of one U-Net call (its plan, the window stacks, its call record: the core's
:class:`hidiff.core.rules.CallRecord`)
is a :class:`CallState` made when the call starts and held in a context variable until
it ends: each thread (and each asyncio task) sees only its own calls, and nothing of a
call stays on the long-lived patch.
"""

from __future__ import annotations

import contextvars
import weakref
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn

from ..core.planner import Plan
from ..core.rules import Arranged, CallRecord


@dataclass
class CallState:
    """One U-Net call in progress."""

    plan: Plan
    record: CallRecord
    seeds: list[int]  # window seed of each batch row (hidiff.core.rules.row_seeds)
    maps: dict = field(default_factory=dict)  # id(Transformer2DModel) -> (H, W) of its token map
    open_windows: dict[int, list[Arranged]] = field(default_factory=dict)  # id(attn1) -> arranged inputs to merge
    conv_saved: list = field(default_factory=list)  # (conv, stride, padding, dilation) to restore
    conv_locked: int = 0


# Weakly keyed by patch: a call cut short by a KeyboardInterrupt (torch runs no post-hook
# for it) leaves its state here until the next call, and that must not keep the model alive.
_CALLS: contextvars.ContextVar[Optional[weakref.WeakKeyDictionary]] = contextvars.ContextVar(
    "hidiff_calls", default=None
)


def current_call(owner: Any) -> Optional[CallState]:
    """The call of ``owner`` (a patch) in progress in this thread or task, if any."""
    calls = _CALLS.get()
    return calls.get(owner) if calls else None


def enter_call(owner: Any, state: CallState) -> contextvars.Token:
    calls = weakref.WeakKeyDictionary(_CALLS.get() or {})
    calls[owner] = state
    return _CALLS.set(calls)


def leave_call(owner: Any) -> Optional[CallState]:
    calls = weakref.WeakKeyDictionary(_CALLS.get() or {})
    state = calls.pop(owner, None)
    _CALLS.set(calls)
    return state


class Hook:
    """A registered hook: ``owner.<method>(*bound, *hook arguments)``."""

    __slots__ = ("owner", "method", "bound")

    def __init__(self, owner: Any, method: str, *bound: Any) -> None:
        self.owner, self.method, self.bound = owner, method, bound

    # Kept out of torch.compile as a whole frame, not only in _dispatch: otherwise dynamo
    # compiles this frame once per hook until its recompile limit (docs/speed.md).
    @torch.compiler.disable
    def __call__(self, *args: Any) -> Any:
        return _dispatch(self, args)

    def __getstate__(self) -> tuple:
        return (self.owner, self.method, self.bound)

    def __setstate__(self, state: tuple) -> None:
        self.owner, self.method, self.bound = state


@torch.compiler.disable
def _dispatch(hook: Hook, args: tuple) -> Any:
    # Outside torch.compile: a hook's decisions (step, shift draws, conv geometry) are Python
    # state that a traced graph would freeze into constants.
    return getattr(hook.owner, hook.method)(*hook.bound, *args)


class HookGroup:
    """The hooks of one technique on one U-Net: ``attach``, ``detach``, ``describe``."""

    name = ""

    def __init__(self, patch: Any) -> None:
        self.patch = patch
        self.handles: list = []

    def pre(self, module: nn.Module, method: str, *bound: Any) -> None:
        self.handles.append(module.register_forward_pre_hook(Hook(self, method, *bound), with_kwargs=True))

    def post(self, module: nn.Module, method: str, *bound: Any, with_kwargs: bool = False) -> None:
        hook = Hook(self, method, *bound)
        self.handles.append(module.register_forward_hook(hook, with_kwargs=with_kwargs, always_call=True))

    def attach(self, unet: nn.Module) -> None:
        raise NotImplementedError

    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def describe(self, unet: nn.Module) -> dict[str, str]:
        """Module path -> what this group does to it."""
        raise NotImplementedError

    def call(self) -> Optional[CallState]:
        return current_call(self.patch)

    def record_map(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Pre-hook on a Transformer2DModel: the H x W of its token map, exact on odd sizes
        (its input is still (B, C, H, W), where N alone would not tell H from W)."""
        call = self.call()
        x = arg(args, kwargs, 0, "hidden_states")
        if call is not None and isinstance(x, torch.Tensor) and x.ndim == 4:
            call.maps[id(module)] = (int(x.shape[-2]), int(x.shape[-1]))


def first_tensor(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, tuple):
        return output[0]
    return output.sample


def replace_first(output: Any, x: torch.Tensor) -> Any:
    if isinstance(output, torch.Tensor):
        return x
    if isinstance(output, tuple):
        return (x,) + tuple(output[1:])
    output.sample = x
    return output


def replace_arg(args: tuple, kwargs: dict, index: int, name: str, value: Any) -> tuple[tuple, dict]:
    """Put ``value`` where the call passed argument ``name`` (position ``index`` or keyword)."""
    if len(args) > index:
        return args[:index] + (value,) + args[index + 1 :], kwargs
    return args, {**kwargs, name: value}


def arg(args: tuple, kwargs: dict, index: int, name: str) -> Any:
    return args[index] if len(args) > index else kwargs.get(name)
