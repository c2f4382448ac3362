"""HiDiffusion for Stable Diffusion WebUI (AUTOMATIC1111 v1.10, Forge, reForge).

The repository root is the extension: Extensions -> Install from URL with this repository's
address clones it into ``extensions/``, and the WebUI loads this script. It adds a
"HiDiffusion" accordion to txt2img and img2img (an always-visible script) whose controls
are the library's options (hidiff.webui.options), writes the settings into the infotext,
restores them from PNG Info, adds X/Y/Z plot axes, and runs HiDiffusion inside each
sampling (hidiff.webui.host). Only the standard library, gradio and the WebUI's own
modules are imported here; torch work is imported when a generation runs.
See docs/webui.md.
"""

from __future__ import annotations

import os
import sys

import gradio as gr
from modules import script_callbacks, scripts, shared

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from hidiff.webui import host, options  # noqa: E402

#: X/Y/Z plot axes: (axis label, option name); "enable" is the switch.
XYZ_AXES = (
    ("enable", "enable"),
    ("raunet", "raunet"),
    ("window_attn", "window_attn"),
    ("preset", "preset"),
    ("t1_ratio", "t1_ratio"),
    ("t2_ratio", "t2_ratio"),
    ("kv_downsample", "kv_downsample"),
)
#: Where the X/Y/Z plot puts its per-cell values on ``p`` (read by this script).
OVERRIDES = "hidiff_overrides"


def _component(control: options.Control, tab: str):
    elem = f"hidiffusion_{tab}_{control.name}"
    common = dict(label=control.label, elem_id=elem, tooltip=control.tooltip)
    if control.widget == "checkbox":
        return gr.Checkbox(value=control.default, **common)
    if control.widget == "dropdown":
        return gr.Dropdown(choices=list(control.choices or ()), value=control.default, **common)
    if control.widget == "slider":
        return gr.Slider(
            minimum=control.minimum, maximum=control.maximum, step=control.step, value=control.default, **common
        )
    return gr.Number(value=control.default, precision=0 if control.spec.kind == "int" else None, **common)


class Script(scripts.Script):
    def __init__(self) -> None:
        super().__init__()
        self._size = {}  # "width" / "height" / "steps" -> the tab's gradio component
        self._line = None
        self._inputs = None

    def title(self) -> str:
        return options.TITLE

    def show(self, is_img2img: bool):
        return scripts.AlwaysVisible

    def ui(self, is_img2img: bool):
        tab = "img2img" if is_img2img else "txt2img"
        with gr.Accordion(options.TITLE, open=False, elem_id=f"hidiffusion_{tab}"):
            enable = gr.Checkbox(
                label="Enable HiDiffusion",
                value=False,
                elem_id=f"hidiffusion_{tab}_enable",
                tooltip="Generate above the model's native size without duplicated objects (RAU-Net + MSW-MSA).",
            )
            line = gr.HTML(value="HiDiffusion is off.", elem_id=f"hidiffusion_{tab}_line")
            made = []
            controls = options.controls()
            main = [c for c in controls if not c.spec.advanced]
            with gr.Row():
                for control in main:
                    made.append(_component(control, tab))
            with gr.Accordion("Advanced", open=False, elem_id=f"hidiffusion_{tab}_advanced"):
                for control in controls:
                    if control.spec.advanced:
                        made.append(_component(control, tab))
        by_name = dict(zip([c.name for c in main] + [c.name for c in controls if c.spec.advanced], made))
        ordered = [by_name[c.name] for c in controls]
        self.infotext_fields = [(enable, options.paste_value(None))] + [
            (component, options.paste_value(control)) for component, control in zip(ordered, controls)
        ]
        self.paste_field_names = [options.ENABLE_KEY] + [c.infotext_key for c in controls]
        self._line, self._inputs = line, [enable, *ordered]
        self._wire()
        return [enable, *ordered]

    def after_component(self, component, **kwargs):
        elem = kwargs.get("elem_id") or ""
        for key in ("width", "height", "steps"):
            if elem in (f"txt2img_{key}", f"img2img_{key}"):
                self._size[key] = component
        self._wire()

    def _wire(self) -> None:
        if self._line is None or len(self._size) < 3 or getattr(self, "_wired", False):
            return
        self._wired = True
        sizes = [self._size["width"], self._size["height"], self._size["steps"]]
        for component in [*self._inputs, *sizes]:
            component.change(fn=_line, inputs=[*sizes, *self._inputs], outputs=[self._line], show_progress="hidden")

    def process(self, p, *args):
        settings = _settings(p, args)
        if settings is not None and settings.enable:
            p.extra_generation_params.update(options.infotext(settings))

    def process_before_every_sampling(self, p, *args, **kwargs):
        try:
            settings = options.read_args(_with_overrides(p, args))
        except ValueError as e:
            # A bad option fails the generation with its message (an error here would only be logged).
            host.refuse(p, str(e))
            return
        if settings.enable:
            host.prepare_sampling(
                p, settings, kwargs.get("noise"), lambda message: _notify(p, message), opts=shared.opts
            )


def _settings(p, args):
    try:
        return options.read_args(_with_overrides(p, args))
    except ValueError:
        return None  # refused at sampling, with its message


def _with_overrides(p, args):
    values = list(args)
    overrides = getattr(p, OVERRIDES, None) or {}
    names = ["enable"] + [c.name for c in options.controls()]
    defaults = options.api_args(False)
    values += defaults[len(values) :]
    for name, value in overrides.items():
        values[names.index(name)] = value
    return values


def _notify(p, message: str) -> None:
    print(message, file=sys.stderr)
    comment = getattr(p, "comment", None)
    if callable(comment):
        comment(message)
    p.extra_generation_params[options.ENABLE_KEY] = "skipped (model not supported)"


def _line(width, height, steps, *values):
    try:
        settings = options.read_args(values)
    except ValueError as e:
        return str(e)
    return host.what_happens(settings, int(width), int(height), int(steps), getattr(shared, "sd_model", None))


def _xyz_axes() -> None:
    """Add HiDiffusion axes to the X/Y/Z plot script, when it is loaded."""
    module = next((d.module for d in scripts.scripts_data if d.script_class.__module__ == "xyz_grid.py"), None)
    if module is None or any(getattr(o, "label", "").startswith("[HiDiffusion]") for o in module.axis_options):
        return
    by_name = {c.name: c for c in options.controls()}

    def apply(name):
        def set_value(p, x, xs):
            overrides = dict(getattr(p, OVERRIDES, None) or {})
            overrides[name] = x
            if name != "enable":
                overrides.setdefault("enable", True)
            setattr(p, OVERRIDES, overrides)

        return set_value

    for label, name in XYZ_AXES:
        control = by_name.get(name)
        if control is not None and control.choices:
            axis = module.AxisOption(
                f"[HiDiffusion] {label}", str, apply(name), choices=lambda c=control: list(c.choices)
            )
        elif name == "enable" or (control is not None and control.widget == "checkbox"):
            axis = module.AxisOption(f"[HiDiffusion] {label}", str, apply(name), choices=lambda: ["True", "False"])
        else:
            cast = int if control is not None and control.spec.kind == "int" else float
            axis = module.AxisOption(f"[HiDiffusion] {label}", cast, apply(name))
        module.axis_options.append(axis)


script_callbacks.on_before_ui(_xyz_axes)
