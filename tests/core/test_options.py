"""The option metadata on HiDiffusionConfig's fields: one spec per field, and the config's
validation driven by them (a bad value is refused at construction, naming the field)."""

from __future__ import annotations

import dataclasses

import pytest

from hidiff.core.config import HiDiffusionConfig, OptionSpec, option_spec, option_specs
from hidiff.core.presets import PRESETS


def test_one_spec_per_field_in_field_order_with_the_field_default():
    config_fields = dataclasses.fields(HiDiffusionConfig)
    specs = option_specs()
    assert [s.name for s in specs] == [f.name for f in config_fields]
    defaults = HiDiffusionConfig()
    for spec in specs:
        assert spec.default == getattr(defaults, spec.name), spec.name
        assert spec.help.strip() and spec.help[0].isupper(), spec.name
        assert spec.kind in ("bool", "choice", "float", "int")
        assert (spec.default is None) <= spec.optional, spec.name
        if spec.kind == "choice":
            assert spec.choices, spec.name
        if spec.choices is not None and spec.default is not None:
            assert spec.default in spec.choices, spec.name
    assert option_spec("preset").choices == tuple(PRESETS)
    assert option_spec("kv_downsample").choices == (1, 2, 4)


def test_unknown_spec_name_is_refused_naming_the_options():
    with pytest.raises(KeyError, match="raunet"):
        option_spec("raunett")


def _bad_values(spec: OptionSpec) -> list:
    """Values the spec must refuse: wrong type, None where not optional, out of range/choices."""
    bad: list = ["not-a-value"] if spec.kind != "choice" else ["not-a-choice", 1]
    if not spec.optional:
        bad.append(None)
    if spec.kind in ("float", "int") and spec.minimum is not None:
        bad.append(type(spec.minimum)(spec.minimum) - 1)
    if spec.kind in ("float", "int") and spec.maximum is not None:
        bad.append(spec.maximum + 1)
    if spec.kind == "float":
        bad += [float("nan"), True]
    if spec.kind == "int":
        bad += [1.0, True]
        if spec.choices:
            bad.append(max(spec.choices) + 1)
    return bad


@pytest.mark.parametrize("spec", option_specs(), ids=lambda s: s.name)
def test_each_bad_value_is_refused_at_construction_naming_the_field(spec):
    for value in _bad_values(spec):
        with pytest.raises((TypeError, ValueError), match=spec.name):
            spec.check(value)
        with pytest.raises((TypeError, ValueError), match=spec.name):
            HiDiffusionConfig(**{spec.name: value})


@pytest.mark.parametrize("spec", option_specs(), ids=lambda s: s.name)
def test_each_good_value_is_accepted(spec):
    good = list(spec.choices or ()) + [spec.default]
    if spec.kind == "float":
        good += [spec.minimum, spec.maximum]
    if spec.kind == "bool":
        good += [True, False]
    for value in good:
        spec.check(value)
    if spec.optional:
        spec.check(None)
