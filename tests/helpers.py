"""What the tests share: model builders and runners, snapshots of a model, the environments
some tests need. Fixtures and collection hooks live in conftest.py."""

import os

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: Marker -> (the environment a test needs, how to build it). Absent on a developer's machine,
#: such tests are skipped with that reason; under HIDIFF_CI=1 (set by .ci/run) they run, and
#: fail if the environment is missing.
ENVIRONMENTS = {
    "reference": (
        os.environ.get("HIDIFF_REFERENCE_PYTHON") or os.path.join(ROOT, ".venv-ref", "bin", "python"),
        "needs the published hidiffusion 0.1.10 environment .venv-ref: bash tools/setup.sh",
    ),
    "comfy": (
        os.path.join(ROOT, ".comfy", "bin", "python"),
        "needs the ComfyUI environment .comfy: bash tools/install_comfy.sh",
    ),
    "invokeai": (
        os.path.join(ROOT, ".invokeai", "bin", "python"),
        "needs the InvokeAI environment .invokeai: bash tools/install_invokeai.sh",
    ),
}


def pytest_in(environment, *args, timeout=2400):
    """Run pytest with ``args`` in another environment's Python (a key of ENVIRONMENTS, e.g. a real
    ComfyUI's or InvokeAI's), from the repository root; fail with its output unless it passed.
    Returns pytest's summary line."""
    import subprocess
    import sys

    python, how = ENVIRONMENTS[environment]
    assert os.path.exists(python), how
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    env.setdefault("OMP_NUM_THREADS", "1")
    proc = subprocess.run(
        [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )
    sys.stdout.write(proc.stdout[-4000:])
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    assert proc.returncode == 0, (
        f"pytest {' '.join(args)} failed in {python}:\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"
    )
    assert " passed" in summary and "no tests ran" not in summary, summary
    return summary


def reference_python():
    """The Python with the published hidiffusion==0.1.10 (diffusers 0.27.2) that the tests compare against."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    path = os.environ.get("HIDIFF_REFERENCE_PYTHON") or str(root / ".venv-ref" / "bin" / "python")
    if not Path(path).exists():
        pytest.fail(
            f"no reference Python at {path}: build it with `bash tools/setup.sh` "
            "(or point HIDIFF_REFERENCE_PYTHON at a Python with hidiffusion==0.1.10 and diffusers 0.27.2)"
        )
    return path


#: Tiny SDXL U-Nets at a native 512x512 (sample_size 64) instead of SDXL's 1024: the same
#: layout and the same schedule at a quarter of the pixels, for tests where only the scale
#: over native matters (presets go by that scale). CI time is mostly tiny SDXL attention.
XL_SMALL_NATIVE = 64


def small_native(family):
    """U-Net overrides for :data:`XL_SMALL_NATIVE` (none for the SD families)."""
    return {"sample_size": XL_SMALL_NATIVE} if family == "sdxl" else {}


def run_recorded(pipe, height, width, steps, seed=0, **kwargs):
    """Final latents and hidiff's record of every step (``hidiff.last_call`` at each step end)."""
    import hidiff

    records = []

    def on_step_end(p, i, t, callback_kwargs):
        records.append(hidiff.last_call(p))
        return callback_kwargs

    images = latents_of(pipe, height, width, seed=seed, steps=steps, callback_on_step_end=on_step_end, **kwargs)
    return images, records


def latents_of(pipe, height, width, seed=0, steps=2, **kwargs):
    """Run ``pipe`` to the final latents with a seeded generator."""
    out = pipe(
        "one red circle",
        height=height,
        width=width,
        num_inference_steps=steps,
        generator=torch.Generator().manual_seed(seed),
        output_type="latent",
        **kwargs,
    )
    return out.images


def snapshot(module):
    """Everything of a module that applying HiDiffusion could change."""
    from torch import nn

    procs = getattr(module, "attn_processors", None) if hasattr(type(module), "attn_processors") else None
    return {
        "state": {k: v.detach().clone() for k, v in module.state_dict().items()},
        "convs": {
            n: (tuple(m.stride), tuple(m.padding), tuple(m.dilation))
            for n, m in module.named_modules()
            if isinstance(m, nn.Conv2d)
        },
        "classes": {n: type(m) for n, m in module.named_modules()},
        "procs": {k: type(v) for k, v in procs.items()} if procs else None,
        "num_upsamplers": getattr(module, "num_upsamplers", None),
    }


def assert_same_state(module, before):
    after = snapshot(module)
    assert after["state"].keys() == before["state"].keys()
    for key, value in before["state"].items():
        assert torch.equal(after["state"][key], value), key
    for key in ("convs", "classes", "procs", "num_upsamplers"):
        assert after[key] == before[key], key


def assert_untouched(module, before):
    """No hook left anywhere, nothing changed, not patched."""
    import hidiff

    for name, m in module.named_modules():
        assert not m._forward_hooks, f"forward hook left on {name or 'the model'}"
        assert not m._forward_pre_hooks, f"forward pre-hook left on {name or 'the model'}"
    assert not torch.nn.modules.module._global_forward_hooks
    assert not torch.nn.modules.module._global_forward_pre_hooks
    assert_same_state(module, before)
    assert hidiff.is_patched(module) is False


def unet2d_model(down, up):
    """A small diffusers UNet2DModel (no text conditioning) with the given block types, for refusals."""
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=16,
        block_out_channels=(32, 64, 64, 64),
        down_block_types=down,
        up_block_types=up,
        norm_num_groups=16,
    ).eval()


class SharedPipelines:
    """Tiny pipelines built once per test module (building them is most of a test's cost).
    ``restore`` takes off what a test applied, so the next test finds each one stock; call it
    from an autouse fixture after every test."""

    def __init__(self):
        self._pipes = {}

    def get(self, family="sd15", task="text2img", **unet_overrides):
        from hidiff.diffusers.testing import tiny_pipeline

        key = (family, task, tuple(sorted(unet_overrides.items())))
        if key not in self._pipes:
            self._pipes[key] = tiny_pipeline(family, task, **unet_overrides)
        return self._pipes[key]

    def restore(self):
        import hidiff

        for pipe in self._pipes.values():
            hidiff.disable_cfgpp(pipe)
            hidiff.remove_hidiffusion(pipe)
