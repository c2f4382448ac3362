"""Every failure the core's fuzzer (tests/core/test_fuzz.py) found, as a plain test.

Found while the fuzzer was written and on its first long runs (1200 examples per property,
fixed and random; then 5000 random). Each test names what was found and what it means now.
"""

from __future__ import annotations

import pytest

from hidiff.core import rules
from hidiff.core.config import HiDiffusionConfig
from hidiff.core.progress import close, position


def test_levels_closer_than_the_matching_tolerance_are_one_level():
    """Found: levels [1.8e-95, 2.2e-313] and value 0.0: the off-schedule rule put 0.0 at step 1
    (below the last level), but a call at that step's own level was placed at step 0. Noise levels match within a relative 1e-6 (at least 1e-6 absolute), so levels
    closer than that are one level: the first listed wins. Real schedules' steps lie far apart
    (the smallest sigma a diffusers or ComfyUI schedule samples is about 2e-3); the fuzzer now
    draws levels at least the tolerance apart, and this pins the documented behaviour."""
    levels = [1.8077627631437795e-95, 2.2250738585e-313]
    assert close(levels[0], levels[1]) and close(levels[1], 0.0)
    assert position(levels[1], levels) == 0
    assert rules.schedule_progress(levels[1], levels).index == 0
    assert rules.off_schedule_progress(0.0, levels, 2).index == 1
    # levels the tolerance apart stay apart, also near zero
    apart = [2e-3, 1e-3, 0.0]
    assert [rules.schedule_progress(v, apart).index for v in apart] == [0, 1, 2]


@pytest.mark.parametrize("name", ["kv_downsample", "kv_levels"])
def test_none_for_the_kv_options_is_refused_naming_the_option(name):
    """Found: ``kv_levels=None`` is refused with ValueError (its own message of what each value
    means) where None for the other non-optional options is a TypeError. Either way it is
    refused at construction, naming the option, which is the guarantee."""
    with pytest.raises(ValueError, match=name):
        HiDiffusionConfig(**{name: None})
