"""Names kept after the issue-26 renames and splits: the old ones are aliases of the new, and the
public API imports from the modules the code moved to."""

from __future__ import annotations

import hidiff
from hidiff.diffusers import cfgpp, cfgpp_samplers, inversion, model


def test_detect_layout_is_detect_architecture():
    assert hidiff.detect_layout is hidiff.detect_architecture is model.detect_architecture
    assert model.detect_layout is model.detect_architecture
    assert hidiff.Layout is hidiff.Architecture


def test_cfgpp_names_after_the_split():
    assert hidiff.invert is inversion.invert
    assert hidiff.enable_cfgpp is cfgpp.enable_cfgpp and hidiff.disable_cfgpp is cfgpp.disable_cfgpp
    assert cfgpp.stock_scheduler is cfgpp_samplers.stock_scheduler
    assert cfgpp.sampler_classes is cfgpp_samplers.sampler_classes
    assert set(cfgpp.sampler_classes()) == set(cfgpp.SAMPLERS)
