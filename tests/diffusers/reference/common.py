"""Shared by the exactness test (current diffusers + hidiff) and the reference runner
(diffusers 0.27.2 + hidiffusion 0.1.10, in its own virtual environment).

Both sides load the same saved U-Net and VAE with ``from_pretrained``, build the same
pipeline around them without text encoders (the embeddings are saved tensors, so no
tokenizer has to agree across transformers versions) and run the same call. The only
difference is which HiDiffusion is applied.
"""

import torch

#: Stable Diffusion's noise schedule, as both DDIM and Euler are configured for it.
SCHEDULER_KWARGS = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    steps_offset=1,
    timestep_spacing="leading",
)


def make_scheduler(diffusers, name):
    if name == "ddim":
        return diffusers.DDIMScheduler(clip_sample=False, set_alpha_to_one=False, **SCHEDULER_KWARGS)
    if name == "euler":
        return diffusers.EulerDiscreteScheduler(**SCHEDULER_KWARGS)
    raise ValueError(f"unknown scheduler {name!r}")


def build_pipeline(diffusers, model_dir, case):
    unet = diffusers.UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet")
    vae = diffusers.AutoencoderKL.from_pretrained(model_dir, subfolder="vae")
    scheduler = make_scheduler(diffusers, case["scheduler"])
    if case["family"] == "sdxl":
        pipe = diffusers.StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=None,
            text_encoder_2=None,
            tokenizer=None,
            tokenizer_2=None,
            unet=unet,
            scheduler=scheduler,
        )
    else:
        pipe = diffusers.StableDiffusionPipeline(
            vae=vae,
            text_encoder=None,
            tokenizer=None,
            unet=unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    # The published package picks its preset variant from this name (turbo, inpainting).
    pipe.register_to_config(_name_or_path=case["name_or_path"])
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_case(pipe, case, inputs, **extra):
    """The final latents of one text-to-image call. The global RNG is seeded first
    because the published window shifts draw from it. The scheduler gets its own
    generator: diffusers 0.27's Euler draws (unused) noise at every step and 0.42's does
    not, so with the global RNG the two diffusers versions would see different shifts."""
    kwargs = dict(
        height=case["height"],
        width=case["width"],
        num_inference_steps=case["steps"],
        guidance_scale=case["guidance"],
        latents=inputs["latents"].clone(),
        prompt_embeds=inputs["prompt_embeds"],
        output_type="latent",
        generator=torch.Generator().manual_seed(case["seed"] + 1),
    )
    if case["guidance"] > 1:
        kwargs["negative_prompt_embeds"] = inputs["negative_prompt_embeds"]
    if case["family"] == "sdxl":
        kwargs["pooled_prompt_embeds"] = inputs["pooled_prompt_embeds"]
        if case["guidance"] > 1:
            kwargs["negative_pooled_prompt_embeds"] = inputs["negative_pooled_prompt_embeds"]
    torch.manual_seed(case["seed"])
    with torch.no_grad():
        return pipe(**kwargs, **extra).images
