"""A node pack for the real-server tests: tiny random-weight models made on the spot.

``HiDiffTestCheckpoint`` returns (MODEL, CLIP-free positive / negative CONDITIONING, VAE)
built with ComfyUI's own classes from a small SD 1.5-layout (or, for the refusal test, a
two-level, unsupported) U-Net config with seeded weights, so a workflow can run model ->
HiDiffusion -> KSampler -> VAEDecode -> SaveImage without any file.
"""

import os
import sys

import torch

try:
    import hidiff.comfy.testing  # noqa: F401
except ImportError:  # a ComfyUI Python without hidiff installed: the checkout this kit lives in
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.realpath(__file__))))))

from hidiff.comfy.testing import build_patcher, seed_weights, unet_config  # noqa: E402

SD15 = unet_config("sd15")
# Two levels: a layout no HiDiffusion family has (the refusal test).
UNSUPPORTED = dict(
    SD15,
    num_res_blocks=[2, 2],
    channel_mult=[1, 2],
    transformer_depth=[1, 1, 0, 0],
    transformer_depth_output=[1, 1, 1, 0, 0, 0],
)


def _vae(seed):
    import comfy.sd
    from comfy.ldm.models.autoencoder import AutoencoderKL

    dd = {
        "double_z": True,
        "z_channels": 4,
        "resolution": 256,
        "in_channels": 3,
        "out_ch": 3,
        "ch": 32,
        "ch_mult": [1, 1, 1, 1],
        "num_res_blocks": 1,
        "attn_resolutions": [],
        "dropout": 0.0,
    }
    source = AutoencoderKL(ddconfig=dd, embed_dim=4)
    seed_weights(source, seed)
    return comfy.sd.VAE(sd=source.state_dict(), config={"params": {"ddconfig": dd, "embed_dim": 4}})


class HiDiffTestCheckpoint:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "layout": (["sd15", "unsupported"], {"default": "sd15"}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 2**31}),
            }
        }

    RETURN_TYPES = ("MODEL", "CONDITIONING", "CONDITIONING", "VAE")
    FUNCTION = "load"
    CATEGORY = "testing"

    def load(self, layout, seed):
        model, _ = build_patcher("sd15", SD15 if layout == "sd15" else UNSUPPORTED, seed)
        g = torch.Generator().manual_seed(seed + 1)
        positive = [[torch.randn(1, 8, 64, generator=g), {}]]
        negative = [[torch.randn(1, 8, 64, generator=g), {}]]
        return (model, positive, negative, _vae(seed + 2))


NODE_CLASS_MAPPINGS = {"HiDiffTestCheckpoint": HiDiffTestCheckpoint}
NODE_DISPLAY_NAME_MAPPINGS = {"HiDiffTestCheckpoint": "hidiff test: tiny checkpoint"}
