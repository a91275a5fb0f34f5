"""Chapter 01's exercises: the global mapper's word for one CLIP level, the words written into a prompt's
token embeddings, and the stage-1 training loss.

Each check calls the student's function on inputs of its own (fixed seed, the toy preset on the CPU) and
compares it with what the package computes; see `feedback` for what a failure says."""
from __future__ import annotations

from dataclasses import replace
from functools import lru_cache

import numpy as np
import torch
from diffusers import DDPMScheduler

from ..attention import elite_attention
from ..components import ASSETS_DIR
from ..mappers import GlobalMapper
from ..toyworld.sources import ToyWorldSource
from ..training import PROFILES, training_step_losses
from ..words import injected_token_embeddings, placeholder_token_id, tokenize_with_placeholder
from .feedback import attempt, expect, expect_close, passed
from .inputs import keeps_global_rng, toy_components


def _fresh_mapper(seed: int = 0) -> GlobalMapper:
    """A new global mapper for the toy components, its weights drawn from `seed` (the global RNG untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return GlobalMapper.from_components(toy_components()).eval()


@keeps_global_rng
def level_word(student) -> None:
    """`level_word(level, mapping, mapping_patch)` -> one level's word: level (B, 1 + patches, vision_width),
    the class token first; the two MLPs of that level. Returns (B, 1, text_width)."""
    name = "level_word"
    mapper = _fresh_mapper()
    config = toy_components().image_encoder.config
    patches = (config.image_size // config.patch_size) ** 2
    generator = torch.Generator().manual_seed(1)
    levels = [torch.randn(3, 1 + patches, mapper.vision_width, generator=generator) for _ in range(mapper.num_levels)]
    with torch.no_grad():
        words = mapper(levels)  # (3, 5, text_width)
        for i in (0, 3):
            got = attempt(name, student, levels[i].clone(), mapper.mapping[i], mapper.mapping_patch[i])
            expect_close(name, got, words[:, i:i + 1], what=f"word w{i}",
                         hint="the class token is level[:, :1] (keep its axis: the word is (B, 1, text_width)) and goes "
                              "through `mapping`; every patch token level[:, 1:] goes through `mapping_patch` first, and "
                              "only then are they averaged over the patches (dim 1), never over the batch.")
    passed(name, "Five levels, five such words: that is GlobalMapper.forward")


@keeps_global_rng
def inject_words(student) -> None:
    """`inject_words(token_embeddings, input_ids, placeholder_id, words)` -> a copy of the token embeddings
    (B, 77, width) with the placeholder's positions in `input_ids` (B, 77) holding `words` (B, n, width), in order."""
    name = "inject_words"
    c = toy_components()
    placeholder = placeholder_token_id(c.tokenizer)
    embedding = c.text_encoder.get_input_embeddings()
    generator = torch.Generator().manual_seed(2)
    prompts = ["a photo of a S on the left", "S in the center", "a small S"]  # the placeholder at three positions
    for count in (5, 1):
        ids, start = tokenize_with_placeholder(c.tokenizer, prompts, num_words=count)
        words = torch.randn(len(prompts), count, embedding.embedding_dim, generator=generator)
        positions = start[:, None] + torch.arange(count)
        with torch.no_grad():
            plain = embedding(ids)
            with injected_token_embeddings(c.text_encoder, positions, words):
                expected = embedding(ids)
        given = plain.clone()
        got = attempt(name, student, given, ids.clone(), placeholder, words.clone())
        expect(name, torch.equal(given, plain), "your function changed the token_embeddings it was given.",
               hint="work on a copy (`token_embeddings.clone()`) and return it: the embedding layer's output "
                    "must stay as it was, as the hook returns a new tensor.")
        expect_close(name, got, expected, what=f"the embeddings with {count} word(s)",
                     hint="find the placeholder in each row of input_ids (`input_ids == placeholder_id`): it sits at "
                          "another position in each prompt. Row b's n placeholder positions get words[b, 0..n-1], in "
                          "order; every other position keeps its token's embedding.")
    passed(name, "This is what the hook on the token-embedding layer writes, in training (5 words) and at inference (w0)")


@lru_cache(maxsize=1)
def _training_batch() -> dict:
    """Two toy training samples, as the stage-1 loop draws them (fixed seed)."""
    size = toy_components().image_encoder.config.image_size
    return ToyWorldSource(clip_size=size).batch(np.random.default_rng(3), 2)


@keeps_global_rng
def stage1_losses(student) -> None:
    """`stage1_losses(components, mapper, batch, reg_weight, noise_scheduler, generator)` -> {"loss_mle",
    "loss_reg"}, scalars with gradients to the mapper; batch: "pixel_values" (B, 3, H, W) in [-1, 1],
    "clip_pixels" (B, 3, S, S) in [0, 1], "prompts" (B strings with S). ELITE's processors are installed."""
    name = "stage1_losses"
    c = toy_components()
    mapper = GlobalMapper.from_pretrained(ASSETS_DIR / "toy-global-mapper").to(c.device)
    recipe = replace(PROFILES["toy"], reg_weight=0.05)  # not the usual 0.01: the weight must come from the argument
    scheduler = DDPMScheduler.from_config(c.scheduler.config)
    batch = {key: value.clone() if isinstance(value, torch.Tensor) else list(value) for key, value in _training_batch().items()}
    with elite_attention(c.unet, mapper):
        with torch.no_grad():
            expected = training_step_losses(c, mapper, batch, recipe, scheduler, torch.Generator().manual_seed(4))
        got = attempt(name, student, c, mapper, {key: batch[key] for key in ("pixel_values", "clip_pixels", "prompts")},
                      recipe.reg_weight, scheduler, torch.Generator().manual_seed(4))
    expect(name, isinstance(got, dict) and {"loss_mle", "loss_reg"} <= set(got),
           f"the result should be a dict with keys 'loss_mle' and 'loss_reg', got {type(got).__name__}"
           f"{' with keys ' + str(sorted(got)) if isinstance(got, dict) else ''}.",
           hint="return {'loss_mle': ..., 'loss_reg': ...}.")
    expect_close(name, got["loss_mle"], expected["loss_mle"], what="loss_mle", atol=1e-6, rtol=1e-5,
                 hint="the UNet predicts the noise that was added: loss_mle is the mean squared error between its "
                      "prediction and `noise` (not the latents), over every element. Its context is the prompts "
                      "encoded with all five words at S (`encode_prompts_with_words`), and the given lines must "
                      "draw from the generator in their order.")
    expect_close(name, got["loss_reg"], expected["loss_reg"], what="loss_reg", atol=1e-7, rtol=1e-5,
                 hint="loss_reg = reg_weight × the mean of |words| over every element (batch, 5 words, width): "
                      "a mean, not a sum, and reg_weight from the argument.")
    expect(name, all(isinstance(got[key], torch.Tensor) and got[key].requires_grad for key in ("loss_mle", "loss_reg")),
           "a loss carries no gradient, so training could not move the mapper.",
           hint="compute the words, the prompt embeddings and the UNet's prediction outside `torch.no_grad()`: "
                "only the frozen inputs (latents, noise, CLIP levels) are made without gradients.")
    passed(name, "These two numbers, summed and back-propagated into the mapper, are one step of stage 1")
