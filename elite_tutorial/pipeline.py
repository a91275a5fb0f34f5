"""`ELITEPipeline`: encode a concept from one image, then generate it in new prompts.

    pipe = ELITEPipeline(components, GlobalMapper.from_pretrained(...))
    concept = pipe.encode("assets/concepts/teal_heart/0.png")
    images = pipe("a photo of a S on the left", concept, generator=torch.Generator().manual_seed(42)).images

Generation is diffusers' `StableDiffusionPipeline` fed with `prompt_embeds`: the prompt is encoded
with the concept's words at the placeholder `S` (`words.encode_prompts_with_words`), the empty prompt
of classifier-free guidance is encoded by diffusers, and both go through one batched UNet call per
step, with ELITE's attention processors installed on the UNet for the duration of the call only.

Sampling defaults: for a full-size (512 px) model, the authors' (LMS scheduler, 100 steps, guidance
5); for the toy preset, its own scheduler, 25 steps, guidance 5.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import LMSDiscreteScheduler

from .attention import elite_attention
from .components import Components
from .data import ImageLike, clip_pixels, load_image, load_mask
from .mappers import GlobalMapper, clip_feature_levels
from .words import DEFAULT_PLACEHOLDER, encode_prompts_with_words


@dataclass
class Concept:
    """What ELITE keeps of one image of a concept.

    - `words`: (5, text_width) word embeddings, w0 (primary) first, then the auxiliary w1..w4.
    - `pixel_values`: (3, S, S) the image as the image encoder read it (CLIP-normalised).
    - `mask`: (S, S) bool, the object (True) at the encoder's input size, or None.
    """

    words: torch.Tensor
    pixel_values: torch.Tensor
    mask: torch.Tensor | None = None

    def select(self, token_index: int | list[int] | str = 0) -> torch.Tensor:
        """The words to inject: (n, text_width). `token_index`: an int (one word; 0 = w0), a list
        of ints (those words, in that order), or "full" (all five)."""
        count = self.words.shape[0]
        if isinstance(token_index, str):
            if token_index != "full":
                raise ValueError(f"token_index must be an int, a list of ints or 'full'; got {token_index!r}.")
            return self.words
        indices = [token_index] if isinstance(token_index, int) else list(token_index)
        if not indices or any(not isinstance(i, int) or not 0 <= i < count for i in indices):
            raise ValueError(f"token_index {token_index!r} is out of range: this concept has words 0..{count - 1}.")
        return self.words[indices]


@dataclass(frozen=True)
class SamplingDefaults:
    num_inference_steps: int
    guidance_scale: float
    authors_scheduler: bool  # LMS, as in the authors' inference scripts


FULL_SIZE_DEFAULTS = SamplingDefaults(num_inference_steps=100, guidance_scale=5.0, authors_scheduler=True)
TOY_DEFAULTS = SamplingDefaults(num_inference_steps=25, guidance_scale=5.0, authors_scheduler=False)


class ELITEPipeline:
    """ELITE on a set of `Components`: `encode(image, mask)` -> `Concept`; `__call__` -> images."""

    def __init__(self, components: Components, global_mapper: GlobalMapper, local_mapper=None):
        global_mapper.check_compatible(components)
        if local_mapper is not None:
            raise NotImplementedError("The local mapping network is not part of this version of the pipeline yet.")
        self.components = components
        self.global_mapper = global_mapper.to(components.device, components.dtype).eval()
        self.local_mapper = local_mapper
        full_size = components.unet.config.sample_size >= 64  # 512 px images
        self.defaults = FULL_SIZE_DEFAULTS if full_size else TOY_DEFAULTS
        self.sd_pipeline = components.text_to_image_pipeline()
        if self.defaults.authors_scheduler:
            self.sd_pipeline.scheduler = LMSDiscreteScheduler.from_config(components.scheduler.config)

    @property
    def image_size(self) -> int:
        """The image encoder's input size (224 for ViT-L/14)."""
        return self.components.image_encoder.config.image_size

    @torch.no_grad()
    def encode(self, image: ImageLike, mask: ImageLike | None = None) -> Concept:
        """Read a concept from one image (path, PIL image or array; any mode and size).

        `mask` (white = object) is kept for the local branch; the global words read the whole
        image, as in the authors' code.
        """
        rgb = load_image(image)
        pixels = clip_pixels(rgb, self.image_size)
        object_mask = None
        if mask is not None:
            object_mask = torch.from_numpy(load_mask(mask, size=(self.image_size, self.image_size)))
        levels = clip_feature_levels(self.components.image_encoder, pixels[None])
        words = self.global_mapper([level.to(self.components.dtype) for level in levels])[0]
        return Concept(words=words, pixel_values=pixels, mask=object_mask)

    def prompt_embeddings(self, prompt: str | list[str], concept: Concept | list[Concept],
                          token_index: int | list[int] | str = 0, placeholder: str = DEFAULT_PLACEHOLDER) -> torch.Tensor:
        """(batch, 77, text_width): the prompts with the concept's selected words at the placeholder."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        concepts = concept if isinstance(concept, list) else [concept] * len(prompts)
        if len(concepts) != len(prompts):
            raise ValueError(f"Got {len(prompts)} prompts and {len(concepts)} concepts; give one concept, or one per prompt.")
        words = torch.stack([c.select(token_index) for c in concepts])
        c = self.components
        return encode_prompts_with_words(prompts, words, c.tokenizer, c.text_encoder, placeholder)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        concept: Concept | list[Concept],
        token_index: int | list[int] | str = 0,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        generator: torch.Generator | None = None,
        placeholder: str = DEFAULT_PLACEHOLDER,
        capture_attention: dict | None = None,
        **kwargs,
    ):
        """Generate images of `concept` in `prompt` (which contains the placeholder `S` once).

        `capture_attention`: a dict that receives every cross-attention layer's head-averaged
        probabilities per UNet call, (2 * batch, pixels, 77): the unconditional half first.

        Other keyword arguments go to `StableDiffusionPipeline.__call__` (`num_images_per_prompt`,
        `output_type`, `height`, `width`, `latents`, ...). Returns its output (`.images`).
        """
        prompt_embeds = self.prompt_embeddings(prompt, concept, token_index, placeholder)
        with elite_attention(self.components.unet, self.global_mapper, capture=capture_attention):
            return self.sd_pipeline(
                prompt_embeds=prompt_embeds,
                num_inference_steps=num_inference_steps or self.defaults.num_inference_steps,
                guidance_scale=self.defaults.guidance_scale if guidance_scale is None else guidance_scale,
                generator=generator,
                **kwargs,
            )
