"""A node pack for the real-server tests: tiny random-weight models made on the spot.

``HiDiffTestCheckpoint`` returns (MODEL, CLIP-free positive / negative CONDITIONING, VAE)
built with ComfyUI's own classes from a small SD 1.5-layout (or, for the refusal test, a
two-level, unsupported) U-Net config with seeded weights, so a workflow can run model ->
HiDiffusion -> KSampler -> VAEDecode -> SaveImage without any file.
"""

import math

import torch

SD15 = {
    "use_checkpoint": False,
    "image_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 32,
    "num_res_blocks": [2, 2, 2, 2],
    "channel_mult": [1, 2, 2, 2],
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    "transformer_depth_middle": 1,
    "use_spatial_transformer": True,
    "legacy": False,
    "context_dim": 64,
    "use_linear_in_transformer": False,
    "adm_in_channels": None,
    "use_temporal_resblock": False,
    "use_temporal_attention": False,
    "num_heads": 8,
    "num_head_channels": -1,
}
# Two levels: a layout no HiDiffusion family has (the refusal test).
UNSUPPORTED = dict(
    SD15,
    num_res_blocks=[2, 2],
    channel_mult=[1, 2],
    transformer_depth=[1, 1, 0, 0],
    transformer_depth_output=[1, 1, 1, 0, 0, 0],
)


def _seed(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.numel() == 0:
                continue
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel()))
            elif name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.copy_(0.02 * torch.randn(p.shape, generator=g))


def _model(config, seed):
    import inspect

    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    params = inspect.signature(UNetModel.__init__).parameters
    mc = comfy.supported_models.SD15({k: v for k, v in config.items() if k in params})
    mc.set_inference_dtype(torch.float32, None)
    model = mc.get_model({}, "", device=torch.device("cpu"))
    _seed(model.diffusion_model, seed)
    return comfy.model_patcher.ModelPatcher(
        model,
        load_device=comfy.model_management.get_torch_device(),
        offload_device=comfy.model_management.unet_offload_device(),
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
    _seed(source, seed)
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
        model = _model(SD15 if layout == "sd15" else UNSUPPORTED, seed)
        g = torch.Generator().manual_seed(seed + 1)
        positive = [[torch.randn(1, 8, 64, generator=g), {}]]
        negative = [[torch.randn(1, 8, 64, generator=g), {}]]
        return (model, positive, negative, _vae(seed + 2))


NODE_CLASS_MAPPINGS = {"HiDiffTestCheckpoint": HiDiffTestCheckpoint}
NODE_DISPLAY_NAME_MAPPINGS = {"HiDiffTestCheckpoint": "hidiff test: tiny checkpoint"}
