"""`ELITEPipeline`: encode a concept from one image, then generate it in new prompts.

    pipe = ELITEPipeline(components, GlobalMapper.from_pretrained(...))
    concept = pipe.encode("assets/concepts/red_dotted_heart/0.png")
    images = pipe("a photo of a S on the left", concept, generator=torch.Generator().manual_seed(42)).images

Generation is diffusers' `StableDiffusionPipeline` fed with `prompt_embeds`: the prompt is encoded
with the concept's words at the placeholder `S` (`words.encode_prompts_with_words`), the empty prompt
of classifier-free guidance is encoded by diffusers, and both go through one batched UNet call per
step, with ELITE's attention processors installed on the UNet for the duration of the call only.

With a `LocalMapper` (`ELITEPipeline(components, global_mapper, local_mapper)`), `encode` also reads
the object alone (the image with its background blacked out by the mask, as the authors prepare it)
into local tokens, and generation runs ELITE's local attention branch on the conditional rows, scaled
by `local_scale` (λ, default 0.8; 0 gives exactly the global-only images).

Sampling defaults: for a full-size (512 px) model, the authors' (LMS scheduler, 100 steps, guidance
5); for the toy preset, its own scheduler, 25 steps, guidance 5.
"""
from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import LMSDiscreteScheduler
from PIL import Image

from .attention import LocalTokens, elite_attention
from .attention_maps import AttentionCapture
from .components import Components
from .data import ImageLike, clip_pixels, cut_out, global_view_image, load_image, load_mask
from .mappers import GlobalMapper, LocalMapper, clip_feature_levels, mask_local_tokens
from .words import DEFAULT_PLACEHOLDER, check_known_words, encode_prompts_with_words, tokenize_with_placeholder


@dataclass
class Concept:
    """What ELITE keeps of one image of a concept.

    - `words`: (5, text_width) word embeddings, w0 (primary) first, then the auxiliary w1..w4.
    - `pixel_values`: (3, S, S) the image as the image encoder read it (CLIP-normalised).
    - `mask`: (S, S) bool, the object (True) at the encoder's input size, or None.
    - `local_tokens`: (patches, text_width) the masked local tokens (with a `LocalMapper`), or None.
    """

    words: torch.Tensor
    pixel_values: torch.Tensor
    mask: torch.Tensor | None = None
    local_tokens: torch.Tensor | None = None

    def select(self, token_index: int | list[int] | str = 0) -> torch.Tensor:
        """The words to inject: (n, text_width). `token_index`: an int (one word; 0 = w0), a list
        of ints (those words, in that order), or "full" (all five)."""
        count = self.words.shape[0]
        if isinstance(token_index, str):
            if token_index != "full":
                raise ValueError(f"token_index must be an int, a list of ints or 'full'; got {token_index!r}.")
            return self.words
        if not isinstance(token_index, (int, list, tuple)) or isinstance(token_index, bool):
            raise TypeError(f"token_index must be an int, a list of ints or 'full'; got {token_index!r}.")
        indices = [token_index] if isinstance(token_index, int) else list(token_index)
        if not indices or any(not isinstance(i, int) or not 0 <= i < count for i in indices):
            raise ValueError(f"token_index {token_index!r} is out of range: this concept has words 0..{count - 1}.")
        return self.words[indices]


def _mask_for(image: Image.Image, mask: ImageLike) -> np.ndarray:
    """The object mask (H, W) bool of `image`; a mask of another size is resized to it, with a note."""
    found = load_mask(mask)
    if found.shape != (image.height, image.width):
        warnings.warn(f"The mask is {found.shape[1]}x{found.shape[0]} and the image {image.width}x{image.height}: "
                      "the mask is resized to the image (nearest neighbour).", stacklevel=3)
        found = np.array(Image.fromarray(found).resize(image.size, Image.Resampling.NEAREST))
    return found


def _whole(value, minimum: int = 1) -> bool:
    return not isinstance(value, bool) and isinstance(value, numbers.Integral) and value >= minimum


OUTPUT_TYPES = ("pil", "np", "pt", "latent")  # what StableDiffusionPipeline returns
DEFAULT_LOCAL_SCALE = 0.8  # λ at inference, as the authors' sampling scripts use


def _check_sampling_arguments(num_inference_steps, guidance_scale, local_scale, max_steps: int) -> None:
    """Refuse the values diffusers would run with, silently wrong: no steps (noise comes out), more
    steps than the scheduler has timesteps (every step the same timestep, without end), or a NaN or
    negative scale (guidance quietly off, a black image); warn at values that are allowed but rarely meant."""
    steps = num_inference_steps
    if steps is not None and not (_whole(steps) and steps <= max_steps):
        raise ValueError(f"num_inference_steps must be a whole number from 1 to {max_steps} (the scheduler's training "
                         f"timesteps), not {steps!r} (leave it out for the default).")
    for name, value in (("guidance_scale", guidance_scale), ("local_scale", local_scale)):
        if value is not None and not (
                isinstance(value, numbers.Real) and math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, not {value!r}"
                             + (" (leave it out for the default; 1 or less turns guidance off)." if name == "guidance_scale"
                                else f" (0 turns the local branch off; the default is {DEFAULT_LOCAL_SCALE})."))
    if guidance_scale is not None and guidance_scale > 30:
        warnings.warn(f"guidance_scale {guidance_scale} is far above the usual 5 to 10: expect burnt, saturated images.",
                      stacklevel=3)
    if local_scale is not None and local_scale > 2:
        warnings.warn(f"local_scale (λ) {local_scale} is above 2: the local branch will swamp the words "
                      "(the authors use 0.6 to 1).", stacklevel=3)


def _image_size_options(kwargs: dict, default: int, factor: int) -> dict:
    """`height` and `width`, each defaulting on its own (diffusers resets both when one is missing),
    checked to be positive multiples of the VAE's factor and of 8 (which diffusers asks for); and
    `num_images_per_prompt` at least 1."""
    sizes, multiple = {}, math.lcm(factor, 8)
    for name in ("height", "width"):
        value = kwargs.get(name)
        if value is not None and not (_whole(value, multiple) and value % multiple == 0):
            raise ValueError(f"{name} must be a positive multiple of {multiple} (the VAE's downsampling factor is "
                             f"{factor}, and diffusers asks for 8), not {value!r}; leave it out for {default}.")
        sizes[name] = default if value is None else value
    count = kwargs.get("num_images_per_prompt")
    if count is not None and not _whole(count):
        raise ValueError(f"num_images_per_prompt must be a whole number of at least 1, not {count!r}.")
    return sizes


def _check_latents(kwargs: dict, prompts: int, channels: int, factor: int) -> None:
    """Given starting `latents` must be (prompts x images per prompt, channels, height / factor,
    width / factor); diffusers would start from them whatever their shape and return images of it."""
    latents = kwargs.get("latents")
    if latents is None:
        return
    wanted = (prompts * (kwargs.get("num_images_per_prompt") or 1), channels, kwargs["height"] // factor, kwargs["width"] // factor)
    if not isinstance(latents, torch.Tensor) or tuple(latents.shape) != wanted:
        got = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
        raise ValueError(f"latents must be a tensor of shape {wanted} (images, channels, height / {factor}, width / {factor}), "
                         f"not {got}.")


def _refuse_non_finite(what: str, values) -> None:
    """Raise if `values` (a tensor or array) hold NaN or infinities, naming the likely causes."""
    finite = torch.isfinite(values).all() if isinstance(values, torch.Tensor) else np.isfinite(values).all()
    if not finite:
        raise FloatingPointError(f"Generation produced NaN or infinite {what}: usually a very large guidance_scale or "
                                 "local_scale, fp16 overflow (try float32), or broken mapper weights.")


def _finite_latents(pipeline, step: int, timestep, callback_kwargs: dict) -> dict:
    """diffusers' step-end callback: stop at the first step whose latents are not finite (PIL images
    would hide it: NaN pixels are cast to 0)."""
    _refuse_non_finite(f"latents at step {step + 1}", callback_kwargs["latents"])
    return callback_kwargs


@dataclass(frozen=True)
class SamplingDefaults:
    num_inference_steps: int
    guidance_scale: float
    authors_scheduler: bool  # LMS, as in the authors' inference scripts


FULL_SIZE_DEFAULTS = SamplingDefaults(num_inference_steps=100, guidance_scale=5.0, authors_scheduler=True)
TOY_DEFAULTS = SamplingDefaults(num_inference_steps=25, guidance_scale=5.0, authors_scheduler=False)


def _prompts_and_concepts(prompt, concept) -> tuple[list[str], list[Concept]]:
    """One concept per prompt, or a TypeError/ValueError naming what is wrong with the arguments."""
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, (list, tuple)) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise TypeError(f"prompt must be a string, or a non-empty list of strings, containing S; not {prompt!r}.")
    concepts = concept if isinstance(concept, list) else [concept] * len(prompts)
    if not all(isinstance(c, Concept) for c in concepts):
        wrong = next(c for c in concepts if not isinstance(c, Concept))
        raise TypeError(f"concept must be what pipe.encode(image, mask) returns (a Concept), or a list of them; "
                        f"got {type(wrong).__name__} {wrong!r:.60}.")
    if len(concepts) != len(prompts):
        raise ValueError(f"Got {len(prompts)} prompts and {len(concepts)} concepts; give one concept, or one per prompt.")
    return list(prompts), concepts


class ELITEPipeline:
    """ELITE on a set of `Components`: `encode(image, mask)` -> `Concept`; `__call__` -> images."""

    def __init__(self, components: Components, global_mapper: GlobalMapper, local_mapper: LocalMapper | None = None):
        global_mapper.check_compatible(components)
        self.components = components
        self.global_mapper = global_mapper.to(components.device, components.dtype).eval()
        self.local_mapper = None
        if local_mapper is not None:
            local_mapper.check_compatible(components)
            self.local_mapper = local_mapper.to(components.device, components.dtype).eval()
        full_size = components.unet.config.sample_size >= 64  # 512 px images
        self.defaults = FULL_SIZE_DEFAULTS if full_size else TOY_DEFAULTS
        self.sd_pipeline = components.text_to_image_pipeline()
        self.attention_capture: AttentionCapture | None = None  # set by `capture_cross_attention(pipe)`
        if self.defaults.authors_scheduler:
            self.sd_pipeline.scheduler = LMSDiscreteScheduler.from_config(components.scheduler.config)

    @property
    def image_size(self) -> int:
        """The image encoder's input size (224 for ViT-L/14)."""
        return self.components.image_encoder.config.image_size

    @torch.no_grad()
    def encode(self, image: ImageLike, mask: ImageLike | None = None) -> Concept:
        """Read a concept from one image (path, PIL image, numpy array or torch tensor; any mode and
        size; see `data.load_image`).

        `mask` (white = object; a mask of another size is resized to the image, with a warning; an
        empty or unreadable mask raises ValueError) gates the local branch. The global words read
        the view their mapper was trained on (`GlobalMapper.input_view`): the whole image, as in the
        authors' code, or, cut out by the mask, the object alone (`data.object_crop`) or the padded box
        around it (`data.box_crop`); without a mask, the whole image, with a warning. With a
        `LocalMapper` and no mask, the whole image counts as the object (with a warning): the local
        tokens then carry the background too.
        """
        rgb = load_image(image)
        pixels = clip_pixels(rgb, self.image_size)
        full_mask = None if mask is None else _mask_for(rgb, mask)
        object_mask = None
        if full_mask is not None:
            side = (self.image_size, self.image_size)
            object_mask = torch.from_numpy(np.array(Image.fromarray(full_mask).resize(side, Image.Resampling.NEAREST)))
        words = self.global_mapper(self._levels(self._global_view(rgb, pixels, full_mask)))[0]
        local_tokens = None
        if self.local_mapper is not None:
            if full_mask is None:
                warnings.warn("No mask given: the local branch reads the whole image as the object.", stacklevel=2)
                full_mask = np.ones((rgb.height, rgb.width), dtype=bool)
            tokens = self.local_mapper(self._levels(clip_pixels(cut_out(rgb, full_mask), self.image_size)))
            grid_mask = torch.from_numpy(full_mask)[None].to(tokens.device)
            local_tokens = mask_local_tokens(tokens, grid_mask)[0]
            if not local_tokens.any():  # the mask, read at one pixel per patch, missed the object
                side = math.isqrt(tokens.shape[1])
                warnings.warn(f"The mask's object is smaller than one patch of the image encoder's {side} x {side} grid: "
                              "every local token is zero and the local branch adds nothing. Crop the image closer "
                              "around the object.", stacklevel=2)
        return Concept(words=words, pixel_values=pixels, mask=object_mask, local_tokens=local_tokens)

    def _global_view(self, rgb: Image.Image, pixels: torch.Tensor, mask: np.ndarray | None) -> torch.Tensor:
        """The CLIP input (3, S, S) of the global mapper: `pixels` (the whole image), the object alone
        or the padded box around it (`data.global_view_image`)."""
        view = self.global_mapper.input_view
        if view == "image":
            return pixels
        if mask is None:
            what = "the object alone" if view == "object" else "the box around the object"
            warnings.warn(f"This global mapper was trained on {what}; without a mask it reads the "
                          "whole image. Pass the object's mask to encode().", stacklevel=3)
            return pixels
        return clip_pixels(global_view_image(rgb, mask, view), self.image_size)

    def _levels(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        """(3, S, S) CLIP input -> the 5 feature levels (1, 1 + patches, vision_width)."""
        levels = clip_feature_levels(self.components.image_encoder, pixels[None])
        return [level.to(self.components.dtype) for level in levels]

    def prompt_embeddings(self, prompt: str | list[str], concept: Concept | list[Concept],
                          token_index: int | list[int] | str = 0, placeholder: str = DEFAULT_PLACEHOLDER) -> torch.Tensor:
        """(batch, 77, text_width): the prompts with the concept's selected words at the placeholder."""
        prompts, concepts = _prompts_and_concepts(prompt, concept)
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
        local_scale: float | None = None,
        **kwargs,
    ):
        """Generate images of `concept` in `prompt` (which contains the placeholder `S` once).

        `local_scale`: λ of the local branch (with a `LocalMapper`; default 0.8, 0 = global only).
        Cross-attention maps and the local gate are recorded with
        `attention_maps.capture_cross_attention(pipe)` around the call.

        Other keyword arguments go to `StableDiffusionPipeline.__call__` (`num_images_per_prompt`,
        `output_type`, `height`, `width`, `latents`, ...). Returns its output (`.images`).
        """
        _check_sampling_arguments(num_inference_steps, guidance_scale, local_scale,
                                  self.sd_pipeline.scheduler.config.num_train_timesteps)
        if local_scale and self.local_mapper is None:  # silently global-only otherwise
            raise ValueError(f"local_scale={local_scale} asks for the local branch, but this pipeline has no LocalMapper: "
                             "build it with ELITEPipeline(components, global_mapper, local_mapper), or leave local_scale out.")
        local_scale = DEFAULT_LOCAL_SCALE if local_scale is None else local_scale
        generators = generator if isinstance(generator, list) else [generator]
        if generator is not None and not (generators and all(isinstance(g, torch.Generator) for g in generators)):
            raise TypeError(f"generator must be a torch.Generator (e.g. torch.Generator().manual_seed(42)) or a list "
                            f"of them, one per image; not {generator!r}.")
        factor = self.sd_pipeline.vae_scale_factor
        kwargs.update(_image_size_options(kwargs, self.components.unet.config.sample_size * factor, factor))
        _check_latents(kwargs, len(_prompts_and_concepts(prompt, concept)[0]), self.components.unet.config.in_channels, factor)
        if kwargs.get("output_type", "pil") not in OUTPUT_TYPES:  # diffusers would warn and return numpy
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, not {kwargs['output_type']!r}.")
        if isinstance(kwargs.get("negative_prompt"), str):
            check_known_words(self.components.tokenizer, kwargs["negative_prompt"])
        prompt_embeds = self.prompt_embeddings(prompt, concept, token_index, placeholder)
        guidance_scale = self.defaults.guidance_scale if guidance_scale is None else guidance_scale
        local = self._local_tokens(prompt, concept, placeholder, local_scale, guidance_scale > 1,
                                   kwargs.get("num_images_per_prompt") or 1)
        with elite_attention(self.components.unet, self.global_mapper, capture=self.attention_capture,
                             local_mapper=self.local_mapper if local is not None else None, local=local):
            output = self.sd_pipeline(
                prompt_embeds=prompt_embeds,
                num_inference_steps=num_inference_steps or self.defaults.num_inference_steps,
                guidance_scale=guidance_scale,
                generator=generator,
                **{"callback_on_step_end": _finite_latents, **kwargs},
            )
        if kwargs.get("output_type") in ("np", "pt", "latent"):
            _refuse_non_finite("images", output.images)
        return output

    def _local_tokens(self, prompt, concept, placeholder: str, scale: float, guided: bool,
                      per_prompt: int) -> LocalTokens | None:
        """The local branch's input for diffusers' batch: with guidance, [unconditional; conditional]
        rows, each prompt's rows repeated `per_prompt` times; only the conditional rows get tokens."""
        if self.local_mapper is None:
            return None
        prompts, concepts = _prompts_and_concepts(prompt, concept)
        if any(c.local_tokens is None for c in concepts):
            raise ValueError("This concept has no local tokens: encode it with this pipeline (it has a LocalMapper).")
        _, start = tokenize_with_placeholder(self.components.tokenizer, prompts, 1, placeholder)
        tokens = torch.stack([c.local_tokens for c in concepts]).repeat_interleave(per_prompt, dim=0)
        rows = torch.arange(len(tokens)) + (len(tokens) if guided else 0)
        return LocalTokens(tokens, rows, start.repeat_interleave(per_prompt), scale, self.attention_capture)
