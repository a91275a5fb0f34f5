"""Textual Inversion: it fits its one word to the concept, and only that word."""
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from PIL import Image

from elite_tutorial.baselines import TI_PROFILES, textual_inversion
from elite_tutorial.words import encode_prompts_with_words


def concept_image() -> Image.Image:
    pixels = np.zeros((32, 32, 3), np.uint8)
    pixels[8:24, 8:24] = (220, 40, 40)
    return Image.fromarray(pixels)


@torch.no_grad()
def fixed_batch_loss(components, embedding, image) -> float:
    """The noise-prediction loss of "a photo of a S" on one fixed set of noises and timesteps."""
    generator = torch.Generator().manual_seed(123)
    pixels = torch.from_numpy(np.asarray(image, np.float32) / 127.5 - 1).permute(2, 0, 1)[None].repeat(8, 1, 1, 1)
    latents = components.vae.encode(pixels).latent_dist.mode() * components.vae.config.scaling_factor
    noise = torch.randn(latents.shape, generator=generator)
    timesteps = torch.linspace(100, 900, 8).long()
    noisy = DDPMScheduler.from_config(components.scheduler.config).add_noise(latents, noise, timesteps)
    context = encode_prompts_with_words("a photo of a S", embedding.expand(8, 1, -1), components.tokenizer,
                                        components.text_encoder)
    return float(F.mse_loss(components.unet(noisy, timesteps, encoder_hidden_states=context).sample, noise))


def test_textual_inversion_lowers_the_loss_and_changes_nothing_else(tiny):
    before = {k: v.clone() for k, v in tiny.unet.state_dict().items()}
    token_table = tiny.text_encoder.get_input_embeddings().weight.clone()
    initial = token_table[tiny.tokenizer("red", add_special_tokens=False).input_ids[0]]
    recipe = replace(TI_PROFILES["smoke"], steps=30, learning_rate=5e-2)
    result = textual_inversion(tiny, [concept_image()], "red", recipe, progress=False)
    assert result.embedding.shape == initial.shape and len(result.losses) == 30 and result.seconds > 0
    assert fixed_batch_loss(tiny, result.embedding, concept_image()) < fixed_batch_loss(tiny, initial, concept_image())
    assert all(torch.equal(before[k], v) for k, v in tiny.unet.state_dict().items())
    assert torch.equal(tiny.text_encoder.get_input_embeddings().weight, token_table)
    again = textual_inversion(tiny, [concept_image()], "red", replace(recipe, steps=3), progress=False)
    rerun = textual_inversion(tiny, [concept_image()], "red", replace(recipe, steps=3), progress=False)
    torch.testing.assert_close(again.embedding, rerun.embedding)  # seeded per step


def test_textual_inversion_refuses_a_multi_token_initializer(tiny):
    with pytest.raises(ValueError, match="one token"):
        textual_inversion(tiny, [concept_image()], "xqzvw", TI_PROFILES["smoke"], progress=False)
