"""What ELITE is compared with: Textual Inversion, and the class word.

Textual Inversion (Gal et al., 2022) learns a concept by *optimising* one word embedding: the
placeholder's embedding starts as a related word's ("heart") and gradient descent through the frozen
text encoder and UNet fits it to the concept's images with the usual noise-prediction loss, prompts
drawn from the same templates ELITE trains with. The recipe is the diffusers example's
(`textual_inversion.py`: batch 1 x accumulation 4, lr 5e-4 scaled by the batch, constant schedule,
AdamW, 3000 steps, random horizontal flips), and a shorter one for the toy preset.

    result = textual_inversion(components, [image], initializer="heart", recipe=TI_PROFILES["toy"])
    prompt_embeds = encode_prompts_with_words("a photo of a S on the left", result.embedding[None, None], ...)

The embedding is used with the UNet's own cross-attention (Textual Inversion trains no k/v).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from PIL import Image

from .components import Components
from .data import IMAGENET_TEMPLATES, ImageLike, load_image
from .train_loop import Loop, noise_seed
from .training import _noised_latents
from .words import encode_prompts_with_words


@dataclass(frozen=True)
class TextualInversionRecipe:
    steps: int
    batch_size: int
    gradient_accumulation: int
    learning_rate: float        # per sample: scaled by batch * accumulation, as the example's --scale_lr
    weight_decay: float = 1e-2  # the example's AdamW default
    flip_probability: float = 0.5


TI_PROFILES = {
    # the diffusers example's defaults
    "sd14": TextualInversionRecipe(steps=3000, batch_size=1, gradient_accumulation=4, learning_rate=5e-4),
    # the toy preset: the same number of samples per step in one batch, fewer steps
    "toy": TextualInversionRecipe(steps=400, batch_size=8, gradient_accumulation=1, learning_rate=5e-4),
    "smoke": TextualInversionRecipe(steps=3, batch_size=2, gradient_accumulation=1, learning_rate=5e-4),
}


@dataclass
class TextualInversionResult:
    """embedding: (text_width,) the learnt word; losses: per step; seconds: wall time of the optimisation."""

    embedding: torch.Tensor
    losses: list[float]
    seconds: float


def _pixels(image: Image.Image, size: int, flip: bool) -> torch.Tensor:
    image = image.resize((size, size), Image.Resampling.BICUBIC)
    if flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)


def textual_inversion(components: Components, images: list[ImageLike], initializer: str,
                      recipe: TextualInversionRecipe, seed: int = 0, progress: bool = True) -> TextualInversionResult:
    """Optimise one word embedding so that "<template with S>" reproduces `images` (see module doc), in
    the project's one training loop (`train_loop.Loop`).

    `initializer`: a word that is one token for this tokenizer (the concept's class word).
    Every step's images, flips, templates, noise and timesteps come from (seed, step): reruns agree.
    (Micro-batches after a step's first draw from (seed, step, micro).)
    """
    c = components
    ids = c.tokenizer(initializer, add_special_tokens=False).input_ids
    if len(ids) != 1:
        raise ValueError(f"The initializer {initializer!r} is {len(ids)} tokens; give a word that is one token.")
    references = [load_image(image) for image in images]
    if not references:
        raise ValueError("Textual Inversion needs at least one image of the concept.")
    size = c.unet.config.sample_size * 2 ** (len(c.vae.config.block_out_channels) - 1)
    embedding = c.text_encoder.get_input_embeddings().weight[ids[0]].detach().clone().float().requires_grad_(True)
    scale = recipe.batch_size * recipe.gradient_accumulation
    optimizer = torch.optim.AdamW([embedding], lr=recipe.learning_rate * scale, weight_decay=recipe.weight_decay)
    noise_scheduler = DDPMScheduler.from_config(c.scheduler.config)

    def make_batch(rng: np.random.Generator) -> dict:
        chosen = rng.integers(len(references), size=recipe.batch_size)
        pixels = torch.stack([_pixels(references[i], size, rng.random() < recipe.flip_probability) for i in chosen])
        prompts = [IMAGENET_TEMPLATES[rng.integers(len(IMAGENET_TEMPLATES))].format("S") for _ in chosen]
        return {"pixels": pixels, "prompts": prompts, "seed": noise_seed(rng)}

    def step_losses(_model, batch: dict, generator: torch.Generator) -> dict[str, torch.Tensor]:
        noisy, noise, timesteps = _noised_latents(c, batch["pixels"], noise_scheduler, generator)
        words = embedding.to(c.text_encoder.dtype).expand(len(batch["prompts"]), 1, -1)
        context = encode_prompts_with_words(batch["prompts"], words, c.tokenizer, c.text_encoder)
        prediction = c.unet(noisy, timesteps, encoder_hidden_states=context).sample
        return {"loss": F.mse_loss(prediction.float(), noise.float())}

    def key(step: int, micro: int) -> tuple[int, ...]:  # a step's first micro-batch: the step's own generator
        return (seed, step) if micro == 0 else (seed, step, micro)

    loop = Loop(None, optimizer, step_losses, make_batch, key=key,
                steps=recipe.steps, device=c.device, accumulation=recipe.gradient_accumulation,
                record=lambda losses: {k: round(v, 6) for k, v in losses.items()}, description="textual inversion",
                progress=progress)
    start = time.perf_counter()
    history = loop.run()
    return TextualInversionResult(embedding.detach(), [step["loss"] for step in history], time.perf_counter() - start)
