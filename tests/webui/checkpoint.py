"""What the WebUI end-to-end test makes for itself: a random-weight SD 1.5 checkpoint and A1111's tokenizer files.

Run in a Python with ComfyUI importable (``.comfy``; tests/webui/conftest.py sets it up), as
``tests/webui/test_e2e.py`` does, or by hand::

    .comfy/bin/python tests/webui/checkpoint.py [OUT.safetensors] [--hf-home DIR]

The checkpoint is full width (SD 1.5's U-Net, VAE and CLIP ViT-L text encoder) in the original
single-file key layout every WebUI reads: ``model.diffusion_model.*`` (ComfyUI's ldm
``UNetModel``), ``first_stage_model.*`` (ComfyUI's ldm ``AutoencoderKL``) and
``cond_stage_model.transformer.text_model.*`` (transformers' ``CLIPTextModel``): those classes
name their weights as the original code did, so no key is renamed here. Weights are seeded
normals (``hidiff.comfy.testing.seed_weights``): every LayerNorm / GroupNorm gets a small random
affine, since untrained norms (weight 1, bias 0) at CLIP's output make the WebUIs' prompt-emphasis
renormalisation divide 0 by 0 (NaN conditioning, a black image). Stored in fp16 (2.1 GB).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import torch

#: SD 1.5's VAE (the original config's ddconfig) and its latent width.
VAE_CONFIG = {
    "double_z": True,
    "z_channels": 4,
    "resolution": 256,
    "in_channels": 3,
    "out_ch": 3,
    "ch": 128,
    "ch_mult": [1, 2, 4, 4],
    "num_res_blocks": 2,
    "attn_resolutions": [],
    "dropout": 0.0,
}
LATENT_CHANNELS = 4

#: The hub repository A1111's text encoder and tokenizer come from (ldm's FrozenCLIPEmbedder).
CLIP_REPO = "openai/clip-vit-large-patch14"


def comfy_package() -> str:
    """The folder of the importable ``comfy`` package (a namespace package: no ``__file__``)."""
    import comfy

    return os.path.abspath(list(comfy.__path__)[0])


def _clip_config() -> Any:
    from transformers import CLIPTextConfig

    with open(os.path.join(comfy_package(), "sd1_clip_config.json")) as f:
        config = json.load(f)
    return CLIPTextConfig(**{k: v for k, v in config.items() if k not in ("architectures", "torch_dtype")})


def _parts() -> list[tuple[str, Any]]:
    """(key prefix, a function building the part) for SD 1.5's three parts, built uninitialised."""
    from comfy.ldm.models.autoencoder import AutoencoderKL
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    from hidiff.comfy.testing import accepted, unet_config

    def unet() -> torch.nn.Module:
        return UNetModel(
            **accepted(unet_config("sd15", model_channels=320, context_dim=768, channel_mult=[1, 2, 4, 4]))
        )

    def vae() -> torch.nn.Module:
        return AutoencoderKL(ddconfig=dict(VAE_CONFIG), embed_dim=LATENT_CHANNELS)

    def text_encoder() -> torch.nn.Module:
        from transformers import CLIPTextModel

        return CLIPTextModel(_clip_config())

    return [
        ("model.diffusion_model.", unet),
        ("first_stage_model.", vae),
        ("cond_stage_model.transformer.", text_encoder),
    ]


def _original_key(prefix: str, key: str) -> str:
    """The original layout keeps transformers' ``text_model.`` level, which transformers 5 no longer names."""
    if prefix.startswith("cond_stage_model") and not key.startswith("text_model."):
        return "text_model." + key
    return key


def sd15_state_dict(seed: int = 0, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """A random SD 1.5 in the original single-file layout, one part at a time (about 4 GB at the peak)."""
    from hidiff.comfy.testing import seed_weights

    state: dict[str, torch.Tensor] = {}
    for index, (prefix, build) in enumerate(_parts()):
        part = build()
        seed_weights(part, seed + index)
        for key, tensor in part.state_dict().items():
            state[prefix + _original_key(prefix, key)] = tensor.detach().to(dtype).contiguous()
        del part
    return state


def make_sd15_checkpoint(path: str, seed: int = 0) -> str:
    """Write a random SD 1.5 checkpoint (fp16 safetensors) to ``path``; return ``path``."""
    from safetensors.torch import save_file

    state = sd15_state_dict(seed)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    partial = path + ".part"
    save_file(state, partial, metadata={"format": "pt", "made_by": "hidiff tests/webui/checkpoint.py"})
    os.replace(partial, path)
    return path


def make_clip_hub_cache(hf_home: str) -> str:
    """A Hugging Face cache under ``hf_home`` holding what A1111 reads from ``openai/clip-vit-large-patch14``.

    A1111 builds its text encoder with ``CLIPTokenizer.from_pretrained`` and (weights skipped)
    ``CLIPTextModel.from_pretrained`` on that repository: offline, both need the tokenizer files
    and ``config.json`` in the cache. They are ComfyUI's copies of that tokenizer (``comfy/sd1_tokenizer``)
    and text-encoder config, with the hub's 77-token ``model_max_length``. Returns the snapshot folder;
    run the WebUI with ``HF_HOME=hf_home`` and ``HF_HUB_OFFLINE=1``.
    """
    source = comfy_package()
    revision = "0" * 40
    repo = os.path.join(hf_home, "hub", "models--" + CLIP_REPO.replace("/", "--"))
    snapshot = os.path.join(repo, "snapshots", revision)
    os.makedirs(snapshot, exist_ok=True)
    os.makedirs(os.path.join(repo, "refs"), exist_ok=True)
    with open(os.path.join(repo, "refs", "main"), "w") as f:
        f.write(revision)
    # The cache layout version transformers 4.x checks (else it warns that offline calls will fail).
    with open(os.path.join(hf_home, "hub", "version.txt"), "w") as f:
        f.write("1")
    for name in ("vocab.json", "merges.txt", "special_tokens_map.json"):
        with (
            open(os.path.join(source, "sd1_tokenizer", name), "rb") as src,
            open(os.path.join(snapshot, name), "wb") as dst,
        ):
            dst.write(src.read())
    with open(os.path.join(source, "sd1_tokenizer", "tokenizer_config.json")) as f:
        tokenizer_config = json.load(f)
    tokenizer_config["model_max_length"] = 77
    with open(os.path.join(snapshot, "tokenizer_config.json"), "w") as f:
        json.dump(tokenizer_config, f, indent=2)
    with open(os.path.join(source, "sd1_clip_config.json")) as f:
        config = json.load(f)
    config["_name_or_path"] = CLIP_REPO
    with open(os.path.join(snapshot, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return snapshot


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", nargs="?", help="the .safetensors file to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hf-home", help="write A1111's offline tokenizer cache under this folder")
    args = parser.parse_args()
    if not (args.out or args.hf_home):
        parser.error("nothing to make: give OUT.safetensors and/or --hf-home DIR")
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:0] = [os.path.dirname(os.path.dirname(here)), here]
    import conftest  # noqa: F401  (imports ComfyUI as the tests do)

    if args.out:
        make_sd15_checkpoint(args.out, args.seed)
        print(f"wrote {args.out}")
    if args.hf_home:
        print(f"wrote {make_clip_hub_cache(args.hf_home)}")


if __name__ == "__main__":
    main()
