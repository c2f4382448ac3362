import os

import pytest
import torch

# Deterministic CPU maths for bitwise comparisons; two threads match the CI machine.
# HIDIFF_TEST_THREADS=1 on a machine shared with other jobs: OpenMP threads that wait for
# a busy core make tiny models many times slower.
torch.set_num_threads(int(os.environ.get("HIDIFF_TEST_THREADS", 0)) or min(2, os.cpu_count() or 1))

from helpers import ENVIRONMENTS, small_native  # noqa: E402

from hidiff.diffusers.testing import tiny_pipeline  # noqa: E402

#: Tests that took 3 s or more (all their cases together) in a --durations run on this 2-core
#: machine; `pytest -m "not slow"` leaves them out. New slow tests mark themselves (@pytest.mark.slow).
SLOW_TESTS = frozenset(
    {
        "test_above_native_follows_preset",
        "test_apply_again_replaces_options",
        "test_apply_twice_equals_apply_once",
        "test_every_sampler_runs_and_is_reproducible",
        "test_a_colour_edit_on_the_shipped_toy_changes_the_colour_and_keeps_the_object",
        "test_at_or_below_native_nothing_changes_unless_asked",
        "test_bench_a_real_model_times_its_unet_and_its_text_encoders_and_vae_apart",
        "test_bench_json_with_the_published_package_and_a_chart",
        "test_context_manager_removes_on_exit_and_on_error",
        "test_controlnet_img2img_and_inpaint",
        "test_controlnet_mode_can_be_forced",
        "test_equals_published_hidiffusion",
        "test_every_size_with_both_rau_paths_and_windows",
        "test_exception_inside_unet_restores_the_strided_conv",
        "test_exception_mid_generation_leaves_next_run_correct",
        "test_freeu_works_and_hidiff_removes_cleanly",
        "test_ip_adapter_loaded_before_or_after_apply",
        "test_lora_is_not_ignored_under_rau_net",
        "test_lora_on_the_strided_conv_follows_rau_net",
        "test_model_cpu_offload_before_or_after_apply",
        "test_pag_pipeline_keeps_its_step_and_windows",
        "test_patched_then_removed_equals_never_patched",
        "test_pipeline_exception_in_callback_leaves_next_run_clean",
        "test_pipeline_steps_follow_sd1024_preset",
        "test_playground_style_edm_scheduler_gets_gentle_preset",
        "test_published_method_runs_the_published_package_on_the_same_model_and_seeds",
        "test_sampler_equals_a_hand_written_loop_of_its_rule",
        "test_saved_model_loads_and_patches",
        "test_sd_controlnet_residuals_follow_rau_net",
        "test_sdxl_inpaint_pipeline_gets_gentle_preset",
        "test_sdxl_is_detected_from_the_unet_and_reruns",
        "test_sdxl_patched_then_removed_equals_never_patched",
        "test_sdxl_text2img_controlnet_runs_native_then_stops",
        "test_seeded_shifts_reproducible_and_leave_global_rng_alone",
        "test_several_unet_calls_per_step_share_the_step",
        "test_shipped_model_draws_one_object_natively_and_duplicates_at_4x_unless_hidiff",
        "test_t2i_adapter_residuals_follow_rau_net",
        "test_task_acts_and_keeps_shape",
        "test_torch_compile_runs_and_stops_compiling",
    }
)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: over about 5 s on 2 cores; `pytest -m 'not slow'` is the quick run")
    for name, (_, how) in ENVIRONMENTS.items():
        config.addinivalue_line("markers", f"{name}: {how}")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if getattr(item, "originalname", item.name) in SLOW_TESTS:
            item.add_marker(pytest.mark.slow)
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
