import os

import pytest
import torch

# Deterministic CPU maths for bitwise comparisons; two threads match the CI machine.
# HIDIFF_TEST_THREADS=1 on a machine shared with other jobs: OpenMP threads that wait for
# a busy core make tiny models many times slower.
torch.set_num_threads(int(os.environ.get("HIDIFF_TEST_THREADS", 0)) or min(2, os.cpu_count() or 1))

from helpers import ENVIRONMENTS, small_native  # noqa: E402

from hidiff.diffusers.testing import tiny_pipeline  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: over about 5 s on 2 cores; `pytest -m 'not slow'` is the quick run")
    for name, (_, how) in ENVIRONMENTS.items():
        config.addinivalue_line("markers", f"{name}: {how}")


def pytest_collection_modifyitems(config, items):
    if os.environ.get("HIDIFF_CI") == "1":
        return
    for name, (path, how) in ENVIRONMENTS.items():
        if os.path.exists(path):
            continue
        skip = pytest.mark.skip(reason=f"{how} (absent here; CI builds it and runs these)")
        for item in items:
            if item.get_closest_marker(name):
                item.add_marker(skip)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module (``pytestmark = pytest.mark.usefixtures("one_thread")``): tiny
    models gain nothing from threads, busy OpenMP threads spin on a shared CPU, and the CLI's
    subprocesses run with OMP_NUM_THREADS=1, so in-process results match theirs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def sd_pipe():
    pipe = tiny_pipeline("sd15")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def sdxl_pipe():
    pipe = tiny_pipeline("sdxl", **small_native("sdxl"))
    pipe.set_progress_bar_config(disable=True)
    return pipe
