"""Options declared once: the docs table, the CLI flags and batch's keys are all made from
option_specs(), and none of them misses a field."""

from __future__ import annotations

import argparse

from hidiff.app import options_doc
from hidiff.app.args import add_config_flags, config_dest, config_flag, config_from_args
from hidiff.app.batch import CONFIG_KEYS
from hidiff.core.config import HiDiffusionConfig, option_specs


def test_the_docs_table_is_the_one_option_specs_make():
    document = options_doc.DOC.read_text()
    assert options_doc.with_table(document) == document, (
        "docs/options.md's options table is stale: run python -m hidiff.app.options_doc"
    )
    for spec in option_specs():
        assert f"| `{spec.name}` | `{config_flag(spec)}` |" in document


def test_stale_table_is_replaced_and_missing_markers_refused():
    stale = f"intro\n{options_doc.BEGIN}\n| old |\n{options_doc.END}\nafter\n"
    fresh = options_doc.with_table(stale)
    assert "| old |" not in fresh and fresh.startswith("intro\n") and fresh.endswith("after\n")
    assert options_doc.options_table() in fresh
    try:
        options_doc.with_table("no markers")
    except ValueError as error:
        assert "markers" in str(error)
    else:
        raise AssertionError("a document without markers must be refused")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    add_config_flags(parser)
    return parser


def test_every_field_has_a_flag_with_its_help_and_default_none():
    actions = {a.dest: a for a in _parser()._actions}
    for spec in option_specs():
        action = actions[config_dest(spec)]
        assert config_flag(spec) in action.option_strings
        assert spec.help.replace("%", "%%") in action.help
        assert action.default is None  # not given: the base config's value stays


def test_flags_set_every_field_away_from_its_default():
    """One non-default value per field through its flag reaches the config."""
    chosen = {}
    for spec in option_specs():
        if spec.kind == "bool":
            chosen[spec.name] = not spec.default if spec.default is not None else False
        elif spec.choices:
            chosen[spec.name] = next(c for c in spec.choices if c != spec.default)
        else:
            chosen[spec.name] = 0.25 if spec.kind == "float" else 7
    chosen["t1_ratio"], chosen["t2_ratio"] = 0.5, 0.25
    argv = []
    for spec in option_specs():
        value = chosen[spec.name]
        flag = config_flag(spec)
        argv += [flag if value else "--no-" + flag[2:]] if spec.kind == "bool" else [flag, str(value)]
    config = config_from_args(_parser().parse_args(argv))
    assert config == HiDiffusionConfig(**chosen)


def test_preset_auto_sets_none_over_a_base_config():
    base = HiDiffusionConfig(preset="sd-2048")
    assert config_from_args(_parser().parse_args(["--preset", "auto"]), base=base).preset is None
    assert config_from_args(_parser().parse_args([]), base=base).preset == "sd-2048"


def test_batch_takes_every_field_by_its_name_or_its_flag():
    for spec in option_specs():
        assert CONFIG_KEYS[config_dest(spec)] == spec.name
        if spec.name != "controlnet":  # a Request field (the ControlNet model): only controlnet_mode
            assert CONFIG_KEYS[spec.name] == spec.name
    assert "controlnet" not in CONFIG_KEYS
