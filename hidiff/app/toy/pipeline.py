"""The toy model: an SD 1.5-layout U-Net in pixel space, a word-embedding text encoder, and its pipeline.

The U-Net is a ``UNet2DConditionModel`` with Stable Diffusion 1.5's blocks, module names
and 768-wide cross-attention at a small width, denoising 3-channel pixels directly (no
VAE). The text encoder is a learned embedding per word of the fixed vocabulary plus a
learned position embedding. :class:`ToyPipeline` is a ``DiffusionPipeline``: it saves
and loads with diffusers' ``save_pretrained`` / ``from_pretrained`` and HiDiffusion
patches it like any SD 1.5 pipeline (its U-Net is found and classified by structure).
"""

# No `from __future__ import annotations`: diffusers (0.35) reads the pipeline's
# __init__ annotations as real types when it loads components.
import inspect
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import torch
from diffusers import DDIMScheduler, DiffusionPipeline, ImagePipelineOutput, UNet2DConditionModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.image_processor import VaeImageProcessor
from diffusers.models.modeling_utils import ModelMixin  # noqa: F401  (diffusers' loader looks it up in this module)
from torch import nn

from ...diffusers.unet_configs import SD15_UNET
from .shapes import VOCABULARY

#: Native size in pixels: the U-Net's ``sample_size`` (pixel space, so no factor 8).
NATIVE = 16

#: Stable Diffusion 1.5's U-Net config (blocks, module names, two layers per block,
#: 768-wide cross-attention, so family detection reads it as SD 1.x) at a small width.
TOY_UNET_CONFIG: dict[str, Any] = dict(
    SD15_UNET,
    sample_size=NATIVE,
    in_channels=3,
    out_channels=3,
    block_out_channels=(16, 32, 64, 64),
    attention_head_dim=1,  # SD configs name the head count this way: one head
    norm_num_groups=8,
)

#: The sampler the toy model is trained for: v-prediction on a cosine schedule. The clean
#: estimate is not clipped: with classifier-free guidance above ~2, DDIM's clipping of x0
#: (while its noise estimate keeps the unclipped prediction) leaves the final picture noisy
#: (docs/cfgpp.md, "The toy model and guidance"); CFG++ refuses a clipping scheduler.
SCHEDULER_CONFIG: dict[str, Any] = dict(
    num_train_timesteps=1000,
    beta_schedule="squaredcos_cap_v2",
    prediction_type="v_prediction",
    clip_sample=False,
    set_alpha_to_one=True,
    timestep_spacing="trailing",
)

PAD = "<pad>"
#: Where the trained weights ship inside the package.
WEIGHTS = Path(__file__).with_name("weights")


class ToyTextEncoder(ModelMixin, ConfigMixin):
    """Prompt -> (B, max_words, 768) hidden states: one learned vector per word and per position.

    The empty prompt (all ``<pad>``) is the unconditional input of classifier-free guidance.
    """

    @register_to_config
    def __init__(self, vocabulary: Sequence[str] = VOCABULARY, max_words: int = 5, hidden_size: int = 768) -> None:
        super().__init__()
        self.words = [PAD, *vocabulary]
        self.index = {w: i for i, w in enumerate(self.words)}
        self.token_embedding = nn.Embedding(len(self.words), hidden_size)
        self.position_embedding = nn.Parameter(torch.zeros(max_words, hidden_size))
        nn.init.normal_(self.token_embedding.weight, std=0.5)
        nn.init.normal_(self.position_embedding, std=0.1)

    def tokenize(self, prompts: Sequence[str]) -> torch.Tensor:
        """Word ids, padded to ``max_words``; a clear error for unknown words or long prompts."""
        rows = []
        for prompt in prompts:
            words = prompt.lower().split()
            unknown = [w for w in words if w not in self.index or w == PAD]
            if unknown:
                raise ValueError(
                    f"prompt {prompt!r} has words outside the toy vocabulary: {unknown}; known words: {self.words[1:]}"
                )
            if len(words) > self.config.max_words:
                raise ValueError(
                    f"prompt {prompt!r} has {len(words)} words; the toy model reads at most {self.config.max_words}"
                )
            rows.append([self.index[w] for w in words] + [0] * (self.config.max_words - len(words)))
        return torch.tensor(rows, dtype=torch.long, device=self.token_embedding.weight.device)

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.token_embedding(token_ids) + self.position_embedding

    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        return self(self.tokenize(prompts))


def toy_components(seed: int = 0) -> dict[str, Any]:
    """Freshly initialised (untrained) components: what training starts from, and tests use."""
    torch.manual_seed(seed)
    return dict(
        unet=UNet2DConditionModel(**TOY_UNET_CONFIG),
        text_encoder=ToyTextEncoder(),
        scheduler=DDIMScheduler(**SCHEDULER_CONFIG),
    )


class ToyPipeline(DiffusionPipeline):
    """Text-to-image (and, given ``image``, image-to-image) sampling of the toy model in pixel space."""

    model_cpu_offload_seq = "text_encoder->unet"
    #: Pixel space: one pixel per U-Net cell (what the commands' size defaults and memory plans read).
    vae_scale_factor = 1

    def __init__(self, unet: UNet2DConditionModel, text_encoder: ToyTextEncoder, scheduler: Any) -> None:
        super().__init__()
        self.register_modules(unet=unet, text_encoder=text_encoder, scheduler=scheduler)
        # pixel space: pictures in [0, 1] <-> model input in [-1, 1], no resizing (no VAE)
        self.image_processor = VaeImageProcessor(vae_scale_factor=1, do_resize=False)

    def encode_prompt(
        self,
        prompt: Union[str, Sequence[str]],
        device: Any = None,
        num_images_per_prompt: int = 1,
        do_classifier_free_guidance: bool = True,
        negative_prompt: Union[None, str, Sequence[str]] = None,
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(prompt embeddings, negative embeddings or None) as Stable Diffusion pipelines return them;
        the negative prompt defaults to "" (the unconditional input the model was trained with)."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if isinstance(negative_prompt, (list, tuple)):
            if len(negative_prompt) != len(prompts):
                raise ValueError(f"{len(negative_prompt)} negative prompts for {len(prompts)} prompts")
            negatives = list(negative_prompt)
        else:
            negatives = [negative_prompt or ""] * len(prompts)
        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        negatives = [n for n in negatives for _ in range(num_images_per_prompt)]
        dtype = self.unet.dtype
        positive = self.text_encoder.encode(prompts).to(dtype)
        if not do_classifier_free_guidance:
            return positive, None
        return positive, self.text_encoder.encode(negatives).to(dtype)

    @property
    def native_size(self) -> int:
        return int(self.unet.config.sample_size)

    @torch.no_grad()
    def __call__(
        self,
        prompt: Union[str, Sequence[str]],
        height: Optional[int] = None,
        width: Optional[int] = None,
        num_inference_steps: int = 25,
        guidance_scale: float = 1.0,
        generator: Optional[torch.Generator] = None,
        image: Optional[torch.Tensor] = None,
        strength: float = 0.6,
        output_type: str = "pil",
        callback_on_step_end: Optional[Callable] = None,
        return_dict: bool = True,
        latents: Optional[torch.Tensor] = None,
        negative_prompt: Union[None, str, Sequence[str]] = None,
        num_images_per_prompt: int = 1,
    ) -> Any:
        """Sample images of ``prompt`` at ``height`` x ``width`` (default: native).

        ``image`` (B x 3 x H x W in [0, 1], or a PIL image) switches to image-to-image:
        it is noised to ``strength`` of the schedule and denoised from there.
        ``output_type``: ``"pil"``, ``"pt"`` (B x 3 x H x W in [0, 1]) or ``"np"``.
        ``callback_on_step_end(pipe, i, t, {})`` runs after every step, as in diffusers.
        ``guidance_scale`` > 1 turns on classifier-free guidance against ``negative_prompt``
        (default "", the unconditional input the model was trained on).
        ``latents``: the starting noise (B x 3 x H x W, scaled by the scheduler's
        ``init_noise_sigma`` as in diffusers), instead of drawing it from ``generator``.
        ``num_images_per_prompt`` and a list of generators (one per image, each image's noise
        drawn from its own) work as in diffusers' pipelines.
        """
        texts = [prompt] if isinstance(prompt, str) else list(prompt)
        prompts = [p for p in texts for _ in range(num_images_per_prompt)]
        if image is not None and not isinstance(image, torch.Tensor):
            image = _pil_to_tensor(image)
        if image is not None:
            image = image if image.ndim == 4 else image[None]
        height, width = self._size(height, width, image, latents, len(prompts))
        if output_type not in ("pil", "pt", "np"):
            raise ValueError(f"output_type must be 'pil', 'pt' or 'np', got {output_type!r}")
        if image is not None and not 0 < strength <= 1:
            raise ValueError(f"strength must be in (0, 1], got {strength}")
        device = self.unet.device
        guided = guidance_scale > 1
        cond, negative = self.encode_prompt(texts, device, num_images_per_prompt, guided, negative_prompt)
        if negative is not None:
            cond = torch.cat([negative, cond])
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        shape = (len(prompts), 3, height, width)
        x, timesteps = self._start(shape, generator, latents, image, strength, num_inference_steps)
        self._num_timesteps = len(timesteps)  # as diffusers' pipelines do; the published hidiffusion reads it
        extra = {"generator": generator} if "generator" in inspect.signature(self.scheduler.step).parameters else {}
        for i, t in enumerate(self.progress_bar(timesteps)):
            model_in = self.scheduler.scale_model_input(torch.cat([x, x]) if guided else x, t)
            out = self.unet(model_in, t, encoder_hidden_states=cond).sample
            if guided:
                uncond, text = out.chunk(2)
                out = uncond + guidance_scale * (text - uncond)
            x = self.scheduler.step(out, t, x, **extra).prev_sample
            if callback_on_step_end is not None:
                callback_on_step_end(self, i, t, {})
        images = _output(x, output_type)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)

    def _size(
        self, height: Optional[int], width: Optional[int], image: Any, latents: Any, count: int
    ) -> tuple[int, int]:
        """The picture's size: the input image's or the starting noise's, else as asked (default: native)."""
        if image is not None:
            height, width = int(image.shape[-2]), int(image.shape[-1])
        if latents is not None:
            if image is not None:
                raise ValueError("pass image (image-to-image) or latents (the starting noise), not both")
            if latents.ndim != 4 or latents.shape[1] != 3 or latents.shape[0] not in (1, count):
                raise ValueError(f"latents must be 1 or {count} x 3 x H x W, got {tuple(latents.shape)}")
            height, width = int(latents.shape[-2]), int(latents.shape[-1])
        height = height or self.native_size
        width = width or self.native_size
        factor = 2 ** (len(self.unet.config.block_out_channels) - 1)
        if height % factor or width % factor or height <= 0 or width <= 0:
            raise ValueError(f"height and width must be positive multiples of {factor}, got {height}x{width}")
        return height, width

    def _start(
        self, shape: tuple[int, ...], generator: Any, latents: Any, image: Any, strength: float, steps: int
    ) -> tuple[torch.Tensor, Any]:
        """The first sample and the timesteps to run: noise (text-to-image), or the input image noised
        to ``strength`` of the schedule (image-to-image)."""
        device, dtype = self.unet.device, self.unet.dtype
        timesteps = self.scheduler.timesteps
        if latents is not None:
            noise = latents.to(device, dtype).expand(shape)
        else:
            noise = _noise(shape, generator).to(device, dtype)
        if image is None:
            return noise * self.scheduler.init_noise_sigma, timesteps
        keep = max(1, min(steps, int(round(steps * strength))))
        timesteps = timesteps[steps - keep :]
        start = image.to(device, dtype).expand(shape[0], -1, -1, -1) * 2 - 1
        return self.scheduler.add_noise(start, noise, timesteps[:1].repeat(shape[0])), timesteps


def _output(x: torch.Tensor, output_type: str) -> Any:
    """The samples as pictures: ``pt`` tensors in [0, 1], ``np`` arrays or ``pil`` images."""
    images = ((x.float() + 1) / 2).clamp(0, 1).cpu()
    if output_type == "np":
        return images.permute(0, 2, 3, 1).numpy()
    if output_type == "pil":
        return [tensor_to_pil(img) for img in images]
    return images


def _noise(shape: tuple[int, ...], generator: Any) -> torch.Tensor:
    """Starting noise in float32 on the CPU: one draw, or one row per generator of a list."""
    if not isinstance(generator, (list, tuple)):
        return torch.randn(shape, generator=generator, dtype=torch.float32)
    if len(generator) != shape[0]:
        raise ValueError(f"{len(generator)} generators for {shape[0]} images; pass one per image")
    return torch.cat([torch.randn((1, *shape[1:]), generator=g, dtype=torch.float32) for g in generator])


def load_toy_pipeline(path: Optional[str] = None) -> Any:
    """The toy pipeline from a saved folder (default: the weights shipped in the package), in float32."""
    folder = Path(path) if path else WEIGHTS
    if not (folder / "model_index.json").exists():
        raise FileNotFoundError(
            f"no toy model in {folder} (model_index.json missing); pass --model with a folder written by "
            "tools/train_toy.py --export, or reinstall hidiff with its package data"
        )
    # shipped in float16; diffusers loads it into float32 modules unless told otherwise
    pipe = ToyPipeline.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tensor_to_pil(image: torch.Tensor) -> Any:
    """A 3 x H x W picture in [0, 1] as an RGB PIL image."""
    from PIL import Image

    array = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(array)


def _pil_to_tensor(image: Any) -> torch.Tensor:
    import numpy as np

    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1)
