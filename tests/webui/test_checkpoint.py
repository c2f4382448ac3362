"""The end-to-end test's own inputs (tests/webui/checkpoint.py): the SD 1.5 checkpoint's keys and shapes,
and the offline tokenizer cache AUTOMATIC1111 reads. Needs ComfyUI (run in ``.comfy``); the
weights are built on the meta device, so this is quick."""

from __future__ import annotations

import pytest
from comfytest import HAVE_COMFY

pytestmark = pytest.mark.skipif(not HAVE_COMFY, reason="builds with ComfyUI's ldm classes: run in .comfy")


def test_checkpoint_has_the_original_sd15_layout():
    import torch
    from checkpoint import _original_key, _parts

    shapes = {}
    with torch.device("meta"):
        for prefix, build in _parts():
            for key, tensor in build().state_dict().items():
                shapes[prefix + _original_key(prefix, key)] = tuple(tensor.shape)
    counts = {
        part: sum(k.startswith(prefix) for k in shapes)
        for part, prefix in (
            ("unet", "model.diffusion_model."),
            ("vae", "first_stage_model."),
            ("text", "cond_stage_model.transformer.text_model."),
        )
    }
    # What a converted SD 1.5 holds (Forge's loader counts the same: unet 686, vae 248, text_encoder 196)
    assert counts == {"unet": 686, "vae": 248, "text": 196} and len(shapes) == 1130, counts
    expected = {
        "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
        "model.diffusion_model.input_blocks.1.1.proj_in.weight": (320, 320, 1, 1),  # conv proj_in: SD 1.x
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
        "model.diffusion_model.middle_block.1.proj_out.weight": (1280, 1280, 1, 1),
        "model.diffusion_model.output_blocks.11.1.norm.weight": (320,),
        "model.diffusion_model.out.2.weight": (4, 320, 3, 3),
        "first_stage_model.quant_conv.weight": (8, 8, 1, 1),
        "first_stage_model.decoder.mid.attn_1.q.weight": (512, 512, 1, 1),
        "first_stage_model.encoder.down.3.block.1.norm2.weight": (512,),
        "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": (49408, 768),
        "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight": (77, 768),
        "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc1.weight": (3072, 768),
        "cond_stage_model.transformer.text_model.final_layer_norm.bias": (768,),
    }
    assert {k: shapes.get(k) for k in expected} == expected


def test_tokenizer_cache_serves_clip_offline(tmp_path):
    from checkpoint import CLIP_REPO, make_clip_hub_cache
    from transformers import CLIPTextConfig, CLIPTokenizer

    make_clip_hub_cache(str(tmp_path))
    hub = str(tmp_path / "hub")
    tokenizer = CLIPTokenizer.from_pretrained(CLIP_REPO, cache_dir=hub, local_files_only=True)
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tokenizer.model_max_length == 77
    config = CLIPTextConfig.from_pretrained(CLIP_REPO, cache_dir=hub, local_files_only=True)
    assert (config.hidden_size, config.num_hidden_layers, config.vocab_size) == (768, 12, 49408)
