"""`hidiff generate`: PNGs that re-run to the same pixels, the pipeline picked from the inputs,
single-file checkpoints, --compare, and errors a user can act on (exit 2 usage, 1 failure)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

import hidiff.app.loading as loading
import hidiff.app.pipeline as pipeline
from hidiff import HiDiffusionConfig
from hidiff.app.args import UsageError
from hidiff.app.cli import main
from hidiff.diffusers.testing import tiny_pipeline

NATIVE = 8  # latent side of the saved tiny models: 64 px, so 128x96 is above native and HiDiffusion acts
SIZE = ["--width", "128", "--height", "96", "--steps", "2"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny SD 1.5-layout pipeline and a ControlNet for it, saved as diffusers folders."""
    from diffusers import ControlNetModel

    root = tmp_path_factory.mktemp("models")
    pipe = tiny_pipeline("sd15", sample_size=NATIVE)
    pipe.save_pretrained(root / "sd")
    tiny_pipeline("sdxl", sample_size=NATIVE).save_pretrained(root / "sdxl")
    tiny_pipeline("sd15", "inpaint", sample_size=NATIVE, in_channels=9).save_pretrained(root / "sd-inpainting")
    torch.manual_seed(1)
    ControlNetModel.from_unet(pipe.unet, conditioning_embedding_out_channels=(8, 16, 16, 16)).save_pretrained(
        root / "cn"
    )
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)).save(root / "photo.png")
    mask = np.zeros((96, 128), dtype=np.uint8)
    mask[:, 64:] = 255
    Image.fromarray(mask).save(root / "mask.png")
    return {
        "root": root,
        "pipe": pipe,
        "sd": str(root / "sd"),
        "sdxl": str(root / "sdxl"),
        "sd-inpainting": str(root / "sd-inpainting"),
        "cn": str(root / "cn"),
        "photo": str(root / "photo.png"),
        "mask": str(root / "mask.png"),
    }


def gen(*argv):
    return main(["generate", "--quiet", *map(str, argv)])


def pixels(path):
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def meta(path):
    with Image.open(path) as image:
        return image.text["parameters"], json.loads(image.text["hidiff"])


def test_png_metadata_reruns_to_the_same_pixels(models, tmp_path, capsys):
    out = tmp_path / "a.png"
    assert (
        gen(
            "--model",
            models["sd"],
            "--prompt",
            "one red circle",
            "--negative-prompt",
            "blur",
            *SIZE,
            "--seed",
            7,
            "--scheduler",
            "euler-a",
            "--batch",
            2,
            "--out",
            out,
        )
        == 0
    )
    captured = capsys.readouterr()
    summary = captured.out
    assert "100%" not in captured.err  # --quiet: no progress bar
    assert re.search(r"2 image\(s\) 128x96, 2 steps, hidiff sd-1024: [\d.]+ s, peak memory \d+ MiB", summary)
    first, second = tmp_path / "a-0.png", tmp_path / "a-1.png"
    assert not np.array_equal(pixels(first), pixels(second))  # image k has seed + k

    parameters, data = meta(second)
    prompt, negative, line = parameters.split("\n")
    assert prompt == "one red circle" and negative == "Negative prompt: blur"
    for part in ("Steps: 2", "Sampler: Euler a", "Seed: 8", "Size: 128x96", "Model: sd", "HiDiffusion: sd-1024"):
        assert part in line.split(", ")
    assert data["request"]["seed"] == 7 and data["request"]["batch"] == 2 and data["index"] == 1
    assert data["request"]["hidiff_config"] == HiDiffusionConfig().to_dict()
    assert data["run"]["pipeline"] == "StableDiffusionPipeline"
    assert data["run"]["scheduler"] == "EulerAncestralDiscreteScheduler"
    assert data["run"]["vae_tiling"] is False

    # the stochastic sampler and the seeded window shifts both follow the recorded seed
    assert gen("--from-image", second, "--out", tmp_path / "b.png") == 0
    assert np.array_equal(pixels(tmp_path / "b-1.png"), pixels(second))
    assert not (tmp_path / "b-0.png").exists()  # only the image that was asked for


def test_out_folder_gets_the_png_inside_and_an_existing_file_needs_overwrite(models, tmp_path, capsys):
    common = ["--model", models["sd"], "--prompt", "x", *SIZE, "--seed", 9, "--out", tmp_path]
    assert gen(*common) == 0
    written = tmp_path / "hidiff-9.png"
    assert meta(written)[1]["request"]["seed"] == 9
    assert not (tmp_path.parent / f"{tmp_path.name}.png").exists()  # not beside the folder
    capsys.readouterr()
    assert gen(*common) == 2
    assert f"{written} exists; pass --overwrite" in capsys.readouterr().err
    assert gen(*common[:-2], "--out", tmp_path / "shot", "--overwrite") == 0  # no suffix: .png added
    assert (tmp_path / "shot.png").exists()
    assert gen(*common, "--overwrite") == 0


def test_flags_given_with_from_image_override_its_metadata(models, tmp_path):
    out = tmp_path / "a.png"
    assert (
        gen("--model", models["sd"], "--prompt", "one red circle", *SIZE, "--seed", 3, "--t1", 0.6, "--out", out) == 0
    )
    assert gen("--from-image", out, "--seed", 4, "--no-window-attn", "--out", tmp_path / "b.png") == 0
    _, data = meta(tmp_path / "b.png")
    assert data["request"]["seed"] == 4 and data["request"]["prompt"] == "one red circle"
    assert data["request"]["hidiff_config"]["window_attn"] is False
    assert data["request"]["hidiff_config"]["t1_ratio"] == 0.6  # kept from the source image
    assert not np.array_equal(pixels(out), pixels(tmp_path / "b.png"))


def test_compare_writes_both_runs_side_by_side_with_their_times(models, tmp_path, capsys):
    out = tmp_path / "c.png"
    assert (
        main(
            ["generate", "--model", models["sd"], "--prompt", "x", *SIZE, "--seed", "1", "--compare", "--out", str(out)]
        )
        == 0
    )
    captured = capsys.readouterr()
    assert re.search(r"plain [\d.]+ s, hidiff [\d.]+ s: [\d.]+x", captured.out)
    assert "plain: 100%" in captured.err and "hidiff: 100%" in captured.err  # a bar over the steps
    plain, ours, both = (pixels(tmp_path / f"c-{s}.png") for s in ("plain", "hidiff", "compare"))
    assert not np.array_equal(plain, ours)  # HiDiffusion acted in one run only
    assert np.array_equal(both[:, :128], plain) and np.array_equal(both[:, 128:], ours)
    assert meta(tmp_path / "c-plain.png")[1]["request"]["hidiff"] is False
    assert "HiDiffusion: off" in meta(tmp_path / "c-plain.png")[0]
    with Image.open(tmp_path / "c-compare.png") as image:
        times = json.loads(image.text["hidiff-compare"])
    assert times["plain_s"] > 0 and times["hidiff_s"] > 0


@pytest.mark.parametrize(
    "task,inputs,pipeline",
    [
        ("img2img", ["--image", "photo", "--strength", 0.7], "StableDiffusionImg2ImgPipeline"),
        ("inpaint", ["--image", "photo", "--mask", "mask"], "StableDiffusionInpaintPipeline"),
        ("controlnet", ["--controlnet", "cn", "--control-image", "photo"], "StableDiffusionControlNetPipeline"),
        (
            "controlnet-inpaint",
            ["--controlnet", "cn", "--control-image", "photo", "--image", "photo", "--mask", "mask"],
            "StableDiffusionControlNetInpaintPipeline",
        ),
    ],
)
def test_inputs_choose_the_pipeline_and_rerun(models, tmp_path, task, inputs, pipeline):
    argv = [models.get(a, a) for a in inputs]
    out = tmp_path / "t.png"
    # no --width/--height: the size is the input image's (128x96)
    assert gen("--model", models["sd"], "--prompt", "x", "--steps", 3, "--seed", 5, *argv, "--out", out) == 0
    parameters, data = meta(out)
    assert data["run"]["pipeline"] == pipeline and "Size: 128x96" in parameters
    assert data["run"]["preset"] == "sd-1024"
    if "--strength" in argv:
        assert data["request"]["strength"] == 0.7 and "Denoising strength: 0.7" in parameters
    assert gen("--from-image", out, "--out", tmp_path / "r.png") == 0
    assert np.array_equal(pixels(tmp_path / "r.png"), pixels(out))


@pytest.mark.slow
@pytest.mark.parametrize(
    "inputs,pipeline",
    [
        ([], "StableDiffusionXLPipeline"),
        (["--image", "photo", "--mask", "mask"], "StableDiffusionXLInpaintPipeline"),
    ],
)
def test_sdxl_is_detected_from_the_unet_and_reruns(models, tmp_path, inputs, pipeline):
    out = tmp_path / "x.png"
    argv = [models.get(a, a) for a in inputs]
    # 6 steps: with 4 or fewer SDXL gets the few-step (Turbo) preset
    assert gen("--model", models["sdxl"], "--prompt", "x", *SIZE, "--steps", 6, "--seed", 1, *argv, "--out", out) == 0
    data = meta(out)[1]
    assert data["run"]["pipeline"] == pipeline
    assert data["run"]["preset"] == ("sdxl-2048-gentle" if inputs else "sdxl-2048")
    assert gen("--from-image", out, "--out", tmp_path / "r.png") == 0
    assert np.array_equal(pixels(tmp_path / "r.png"), pixels(out))


def test_inpainting_model_without_a_mask_exits_2(models, tmp_path, capsys):
    assert gen("--model", models["sd-inpainting"], "--prompt", "x", *SIZE, "--out", tmp_path / "o.png") == 2
    assert "inpainting model (9-channel U-Net): pass --image and --mask" in capsys.readouterr().err


def test_single_file_checkpoint_loads_like_its_folder(models, tmp_path, capsys):
    from safetensors.torch import save_file

    checkpoint = tmp_path / "tiny-sd15.safetensors"
    save_file(ldm_state_dict(models["pipe"]), str(checkpoint))
    assert loading.single_file_kind(loading.checkpoint_keys(str(checkpoint))) == "sd"
    common = ["--prompt", "x", *SIZE, "--seed", 2]
    if not loading.single_file_takes_config():  # older diffusers: only original YAML configs, fetched online
        assert gen("--model", checkpoint, "--config", models["sd"], *common, "--out", tmp_path / "file.png") == 1
        assert "--config needs a newer diffusers" in capsys.readouterr().err
        return
    assert gen("--model", checkpoint, "--config", models["sd"], *common, "--out", tmp_path / "file.png") == 0
    assert gen("--model", models["sd"], *common, "--out", tmp_path / "folder.png") == 0
    assert np.array_equal(pixels(tmp_path / "file.png"), pixels(tmp_path / "folder.png"))
    assert meta(tmp_path / "file.png")[1]["request"]["config_folder"] == models["sd"]


def test_single_file_sdxl_checkpoint_loads_like_its_folder(models, tmp_path, capsys):
    """An SDXL checkpoint in the original (SGM) layout: U-Net, VAE, and both text encoders,
    the second in OpenCLIP's layout. The encoders get different widths, as in SDXL, since
    diffusers tells them apart by width."""
    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import save_file

    from hidiff.diffusers.testing import (
        TINY_POOLED_DIM,
        TINY_TEXT_DIM,
        TINY_TIME_DIM,
        tiny_components,
        tiny_text_encoder,
    )

    wide = TINY_TEXT_DIM + 16
    components = tiny_components(
        "sdxl",
        sample_size=NATIVE,
        cross_attention_dim=TINY_TEXT_DIM + wide,
        projection_class_embeddings_input_dim=TINY_POOLED_DIM + 6 * TINY_TIME_DIM,
    )
    components["text_encoder_2"] = tiny_text_encoder(1, with_projection=True, hidden_size=wide)
    pipe = StableDiffusionXLPipeline(**components)
    pipe.save_pretrained(tmp_path / "sdxl")
    checkpoint = tmp_path / "tiny-sdxl.safetensors"
    save_file(ldm_state_dict(pipe), str(checkpoint))
    assert loading.single_file_kind(loading.checkpoint_keys(str(checkpoint))) == "sdxl"
    common = ["--prompt", "one red circle", *SIZE, "--seed", 3]
    if not loading.single_file_takes_config():  # older diffusers: only original YAML configs, fetched online
        assert gen("--model", checkpoint, "--config", tmp_path / "sdxl", *common, "--out", tmp_path / "f.png") == 1
        assert "--config needs a newer diffusers" in capsys.readouterr().err
        return
    assert gen("--model", checkpoint, "--config", tmp_path / "sdxl", *common, "--out", tmp_path / "file.png") == 0
    assert gen("--model", tmp_path / "sdxl", *common, "--out", tmp_path / "folder.png") == 0
    assert np.array_equal(pixels(tmp_path / "file.png"), pixels(tmp_path / "folder.png"))
    assert meta(tmp_path / "file.png")[1]["run"]["pipeline"] == "StableDiffusionXLPipeline"


def test_single_file_controlnet_loads_like_its_folder(models, tmp_path, capsys):
    """A ControlNet as its releases ship it (original layout, no prefix), configured offline
    from the base model's U-Net and the file's own tensor shapes."""
    from diffusers import ControlNetModel
    from safetensors.torch import save_file

    controlnet = ControlNetModel.from_pretrained(models["cn"])
    checkpoint = tmp_path / "control_tiny.safetensors"
    save_file(controlnet_ldm_state_dict(controlnet), str(checkpoint))
    common = ["--model", models["sd"], "--prompt", "x", *SIZE, "--seed", 4, "--control-image", models["photo"]]
    if not loading.single_file_takes_config():
        assert gen(*common, "--controlnet", checkpoint, "--out", tmp_path / "file.png") == 1
        assert "cannot configure a single-file ControlNet offline" in capsys.readouterr().err
        return
    assert gen(*common, "--controlnet", checkpoint, "--out", tmp_path / "file.png") == 0
    assert gen(*common, "--controlnet", models["cn"], "--out", tmp_path / "folder.png") == 0
    assert np.array_equal(pixels(tmp_path / "file.png"), pixels(tmp_path / "folder.png"))
    assert gen(*common, "--controlnet", models["photo"], "--out", tmp_path / "bad.png") == 2
    assert "a ControlNet file must be .safetensors, .pth or .ckpt" in capsys.readouterr().err
    not_a_controlnet = tmp_path / "unet.safetensors"
    save_file(ldm_state_dict(models["pipe"]), str(not_a_controlnet))
    assert gen(*common, "--controlnet", not_a_controlnet, "--out", tmp_path / "bad.png") == 2
    assert "not a ControlNet in the original layout" in capsys.readouterr().err


def test_sdxl_checkpoints_are_told_apart_by_their_keys(tmp_path):
    sdxl = [
        "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight",
        "model.diffusion_model.input_blocks.0.0.weight",
        "model.diffusion_model.label_emb.0.0.weight",
    ]
    assert loading.single_file_kind(sdxl) == "sdxl"
    assert loading.single_file_kind(["model.diffusion_model.input_blocks.0.0.weight"]) == "sd"
    with pytest.raises(UsageError, match="no Stable Diffusion U-Net"):
        loading.single_file_kind(["transformer_blocks.0.attn.to_q.weight"])


def test_vae_tiling_turns_on_when_a_one_piece_decode_would_not_fit(models, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(pipeline, "free_memory_bytes", lambda device: 10**6)  # 1 MB free
    assert gen("--model", models["sd"], "--prompt", "x", *SIZE, "--seed", 1, "--out", tmp_path / "v.png") == 0
    assert re.search(
        r"VAE tiling on: 128x96 x1 \(decoding in one piece needs about [\d.]+ [MG]B, 1.0 MB free\)",
        capsys.readouterr().out,
    )
    assert meta(tmp_path / "v.png")[1]["run"]["vae_tiling"] is True


def test_cfgpp_flag_runs_cfgpp_with_the_named_sampler(models, tmp_path):
    out = tmp_path / "g.png"
    common = ["--model", models["sd"], "--prompt", "x", *SIZE, "--seed", 1, "--scheduler", "ddim"]
    assert gen(*common, "--cfgpp", 0.4, "--out", out) == 0
    assert gen(*common, "--out", tmp_path / "plain.png") == 0
    parameters, data = meta(out)
    assert data["request"]["cfgpp"] == 0.4 and "CFG++: 0.4" in parameters
    assert data["run"]["scheduler"] != "DDIMScheduler"  # CFG++'s own DDIM subclass ran
    assert not np.array_equal(pixels(out), pixels(tmp_path / "plain.png"))
    assert gen("--from-image", out, "--out", tmp_path / "r.png") == 0
    assert np.array_equal(pixels(tmp_path / "r.png"), pixels(out))


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["--image", "notes.txt"], "is not an image"),
        (["--width", "100", "--height", "96"], "multiples of 8"),
        (["--mask", "mask"], "--mask needs --image"),
        (["--controlnet", "cn"], "--controlnet needs --control-image"),
        (["--controlnet", "cn", "--control-image", "missing.png"], "no such file"),
        (["--cfgpp", "0.5"], "--cfgpp needs --scheduler"),
        (["--scheduler", "ddim", "--cfgpp", "1.5"], "lam in [0, 1]"),
        (["--strength", "0"], "--strength: must lie in (0, 1]"),
    ],
)
def test_bad_usage_exits_2_before_loading(models, tmp_path, capsys, argv, needle):
    (tmp_path / "notes.txt").write_text("not a picture")
    paths = {"notes.txt": tmp_path / "notes.txt", "missing.png": tmp_path / "missing.png"}
    argv = [paths.get(a, models.get(a, a)) for a in argv]
    assert gen("--model", models["sd"], "--prompt", "x", *argv, "--out", tmp_path / "o.png") == 2
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "o.png").exists()


@pytest.mark.parametrize(
    "model,needle",
    [
        ("missing/dir/model.safetensors", "no such file or folder"),
        ("unet-only", "without model_index.json"),
    ],
)
def test_bad_model_paths_exit_2(models, tmp_path, capsys, model, needle):
    (tmp_path / "unet-only").mkdir()
    assert gen("--model", tmp_path / model, "--prompt", "x", "--out", tmp_path / "o.png") == 2
    assert needle in capsys.readouterr().err


def test_from_image_without_hidiff_metadata_exits_2(models, capsys):
    assert gen("--from-image", models["photo"]) == 2
    assert "no 'hidiff' metadata" in capsys.readouterr().err


def test_unreachable_hub_model_exits_1_and_says_how_to_pass_a_local_path(tmp_path, capsys):
    assert gen("--model", "hidiff-tests/no-such-model", "--prompt", "x", "--out", tmp_path / "o.png") == 1
    err = capsys.readouterr().err
    assert "Hugging Face Hub could not provide it" in err and "pass a local path" in err


def test_single_file_without_configs_offline_exits_1_naming_config(models, tmp_path, capsys):
    from safetensors.torch import save_file

    checkpoint = tmp_path / "tiny.safetensors"
    save_file(ldm_state_dict(models["pipe"]), str(checkpoint))
    assert gen("--model", checkpoint, "--prompt", "x", *SIZE, "--out", tmp_path / "o.png") == 1
    assert "--config FOLDER" in capsys.readouterr().err


# ------------------------------------------------------------------ an original-layout (LDM) checkpoint
# Written from the diffusers module names of an SD 1.x pipeline: the layout a .safetensors
# file from the original Stable Diffusion code (or A1111 / civitai) has.
RESNET_LDM = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
UNET_TOP_LDM = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
}  # SDXL
# SDXL's second text encoder in OpenCLIP's layout (its q, k, v projections are one in_proj)
OPEN_CLIP_LAYER = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}
OPEN_CLIP_TOP = {
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
}
VAE_ATTENTION_LDM = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _resnet_ldm(prefix, rest):
    name, _, param = rest.rpartition(".")
    return f"{prefix}.{RESNET_LDM.get(name, name)}.{param}"


def unet_key_ldm(key, layers, up_has_attention):
    """LDM name of a diffusers U-Net tensor: stage i, layer j sits in input block 1 + (layers + 1) i + j."""
    per_stage = layers + 1  # the resnet/attention layers, then the downsampler's own block
    for name, ldm in UNET_TOP_LDM.items():
        if key.startswith(name + "."):
            return ldm + key[len(name) :]
    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
        block = f"input_blocks.{1 + per_stage * int(m[1]) + int(m[3])}"
        return _resnet_ldm(f"{block}.0", m[4]) if m[2] == "resnets" else f"{block}.1.{m[4]}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
        return f"input_blocks.{per_stage * (int(m[1]) + 1)}.0.op.{m[2]}"
    if m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.*)", key):
        return _resnet_ldm(f"middle_block.{2 * int(m[1])}", m[2])
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.*)", key):
        return f"middle_block.1.{m[1]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
        block = f"output_blocks.{per_stage * int(m[1]) + int(m[3])}"
        return _resnet_ldm(f"{block}.0", m[4]) if m[2] == "resnets" else f"{block}.1.{m[4]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key):
        i = int(m[1])  # the upsampler follows the last layer's resnet (and attention, if any)
        return f"output_blocks.{per_stage * i + layers}.{2 if up_has_attention[i] else 1}.conv.{m[2]}"
    raise KeyError(f"no LDM name for U-Net tensor {key}")


def vae_key_ldm(key, num_up_blocks):
    coder, _, rest = key.partition(".")
    if coder not in ("encoder", "decoder"):
        return key  # quant_conv, post_quant_conv
    rest = rest.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
    flipped = lambda i: num_up_blocks - 1 - int(i)  # noqa: E731 - LDM numbers decoder stages from the bottom
    rules = [
        (r"down_blocks\.(\d+)\.resnets\.(.*)", lambda m: f"down.{m[1]}.block.{m[2]}"),
        (r"down_blocks\.(\d+)\.downsamplers\.0\.(.*)", lambda m: f"down.{m[1]}.downsample.{m[2]}"),
        (r"up_blocks\.(\d+)\.resnets\.(.*)", lambda m: f"up.{flipped(m[1])}.block.{m[2]}"),
        (r"up_blocks\.(\d+)\.upsamplers\.0\.(.*)", lambda m: f"up.{flipped(m[1])}.upsample.{m[2]}"),
        (r"mid_block\.resnets\.(\d+)\.(.*)", lambda m: f"mid.block_{int(m[1]) + 1}.{m[2]}"),
        (r"mid_block\.attentions\.0\.(.*)\.(weight|bias)", lambda m: f"mid.attn_1.{VAE_ATTENTION_LDM[m[1]]}.{m[2]}"),
    ]
    for pattern, rename in rules:
        if m := re.fullmatch(pattern, rest):
            return f"{coder}.{rename(m)}"
    return f"{coder}.{rest}"


def ldm_state_dict(pipe):
    """The pipeline as one original-layout checkpoint: SD 1.x (LDM) or, with a second text encoder, SDXL (SGM)."""
    unet, vae = pipe.unet, pipe.vae
    up_has_attention = [bool(getattr(block, "attentions", None)) for block in unet.up_blocks]
    state = {}
    for key, value in unet.state_dict().items():
        state["model.diffusion_model." + unet_key_ldm(key, unet.config.layers_per_block, up_has_attention)] = value
    for key, value in vae.state_dict().items():
        name = vae_key_ldm(key, len(vae.decoder.up_blocks))
        if ".attn_1." in name and value.ndim == 2:
            value = value[:, :, None, None]  # LDM's VAE attention projections are 1x1 convs
        state["first_stage_model." + name] = value
    sdxl = getattr(pipe, "text_encoder_2", None) is not None
    first = "conditioner.embedders.0.transformer." if sdxl else "cond_stage_model.transformer."
    for key, value in pipe.text_encoder.state_dict().items():
        key = key if key.startswith("text_model.") else "text_model." + key  # transformers >= 5.6 dropped the level
        state[first + key] = value
    if sdxl:
        state.update(
            {"conditioner.embedders.1.model." + k: v for k, v in open_clip_state_dict(pipe.text_encoder_2).items()}
        )
    return {k: v.contiguous() for k, v in state.items()}


def open_clip_state_dict(encoder):
    """A CLIPTextModelWithProjection's tensors under OpenCLIP's names."""
    weights, state = encoder.state_dict(), {}
    for key, name in OPEN_CLIP_TOP.items():
        state[name] = weights[key]
    state["text_projection"] = weights["text_projection.weight"].T  # OpenCLIP multiplies from the right
    for i in range(encoder.config.num_hidden_layers):
        ours, theirs = f"text_model.encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for part in ("weight", "bias"):
            state[f"{theirs}attn.in_proj_{part}"] = torch.cat(
                [weights[f"{ours}self_attn.{p}_proj.{part}"] for p in "qkv"]
            )
            for name, ldm in OPEN_CLIP_LAYER.items():
                state[f"{theirs}{ldm}.{part}"] = weights[f"{ours}{name}.{part}"]
    return state


def controlnet_ldm_state_dict(controlnet):
    """A ControlNet as its releases ship it: the U-Net encoder's LDM names plus the hint and zero convs."""
    blocks = len(controlnet.controlnet_cond_embedding.blocks)
    hint = {"conv_in": 0, **{f"blocks.{i}": 2 * (i + 1) for i in range(blocks)}, "conv_out": 2 * (blocks + 1)}
    state = {}
    for key, value in controlnet.state_dict().items():
        if m := re.fullmatch(r"controlnet_cond_embedding\.(.*)\.(weight|bias)", key):
            name = f"input_hint_block.{hint[m[1]]}.{m[2]}"
        elif m := re.fullmatch(r"controlnet_down_blocks\.(\d+)\.(.*)", key):
            name = f"zero_convs.{m[1]}.0.{m[2]}"
        elif key.startswith("controlnet_mid_block."):
            name = "middle_block_out.0." + key.split(".", 1)[1]
        else:
            name = unet_key_ldm(key, controlnet.config.layers_per_block, [])
        state[name] = value
    return {k: v.contiguous() for k, v in state.items()}
