"""The WebUI script's controls, API arguments and infotext round trip (no WebUI, no torch work)."""

from __future__ import annotations

import pytest

from hidiff.core.config import HiDiffusionConfig, option_specs
from hidiff.webui import options


def test_controls_are_the_library_options_with_their_defaults_and_help():
    controls = options.controls()
    offered = {s.name for s in option_specs()} - set(options.NOT_OFFERED)
    assert [c.name for c in controls][: len(options.CONTROL_ORDER)] == list(options.CONTROL_ORDER)
    assert {c.name for c in controls} == offered
    defaults = HiDiffusionConfig()
    for control in controls:
        assert control.tooltip.startswith(control.spec.help)
        assert control.to_library(control.default) == getattr(defaults, control.name), control.name


def test_default_arguments_read_back_as_the_default_config():
    settings = options.read_args(options.api_args(True))
    assert settings.enable and settings.config == HiDiffusionConfig() and settings.options == {}
    assert options.infotext(settings) == {"HiDiffusion": True}
    assert not options.read_args([]).enable  # an untouched accordion is off
    assert options.infotext(options.read_args(options.api_args(False, preset="sd-2048"))) == {}


CHANGED = dict(
    raunet=False,
    preset="sd-2048",
    t1_ratio=0.5,
    t2_ratio=0.25,
    aggressive=False,
    window_shift="reference",
    window_seed=12345678901234567890,
    kv_downsample=2,
    kv_levels=2,
    at_native="apply",
)


def test_infotext_round_trip_restores_every_changed_option():
    settings = options.read_args(options.api_args(True, **CHANGED))
    assert settings.options == CHANGED
    params = options.infotext(settings)
    # The infotext as the WebUI writes and parses it: "key: value" text, values read back as strings.
    text = ", ".join(f"{k}: {v}" for k, v in params.items())
    parsed = dict(part.split(": ", 1) for part in text.split(", "))
    restored = options.from_infotext(parsed)
    again = options.read_args(restored)
    assert again.enable and again.config == settings.config
    # Each control gets its own value through infotext_fields' functions.
    for i, control in enumerate(options.controls()):
        assert options.paste_value(control)(parsed) == restored[1 + i]
    assert options.paste_value(None)(parsed) is True
    # An infotext without HiDiffusion turns the accordion off and the options to their defaults.
    assert options.from_infotext({"Steps": "20"}) == options.api_args(False)


@pytest.mark.parametrize(
    "name,value,words",
    [
        ("preset", "sd-9000", "one of auto, sd-1024"),
        ("kv_downsample", "3", "one of 1, 2, 4"),
        ("aggressive", "maybe", "one of auto, on, off"),
        ("t1_ratio", "abc", "a number (-1 for preset)"),
        ("window_seed", 1.5, "a whole number"),
    ],
)
def test_a_bad_value_is_refused_naming_the_option(name, value, words):
    args = options.api_args(True)
    args[1 + [c.name for c in options.controls()].index(name)] = value
    with pytest.raises(ValueError) as info:
        options.read_args(args)
    assert f"HiDiffusion option {name}" in str(info.value) and words in str(info.value)


def test_a_config_the_library_refuses_is_refused_with_its_message():
    with pytest.raises(ValueError, match="T2 ratio 0.5 exceeds T1 ratio 0.2"):
        options.read_args(options.api_args(True, preset="sd-1024", t1_ratio=0.2, t2_ratio=0.5))


def test_api_args_refuse_unknown_options():
    with pytest.raises(TypeError, match="unknown HiDiffusion option.*wndow_attn"):
        options.api_args(True, wndow_attn=False)


def test_the_script_module_imports_nothing_heavy():
    """The WebUI has torch loaded before it loads scripts; nothing beyond it comes with the script's imports."""
    import subprocess
    import sys

    code = (
        "import sys; import hidiff.webui.options, hidiff.webui.host; "
        "print(sorted(m for m in ('diffusers', 'transformers', 'gradio', 'hidiff.webui.patch', 'hidiff.webui.structure')"
        " if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
