"""Full-size sd14 architecture (random weights, no download): shapes through the real model sizes."""
import torch

from elite_tutorial import encode_prompts_with_words, sd14_architecture
from elite_tutorial.mappers import clip_feature_levels, feature_layer_indices
from elite_tutorial.toyworld.models import TINY_WORDS
from elite_tutorial.toyworld.tokenizer import build_clip_tokenizer


def test_sd14_architecture_forward_with_an_injected_prompt():
    models = sd14_architecture()
    assert feature_layer_indices(models.image_encoder.config.num_hidden_layers) == (4, 8, 12, 16)
    tokenizer = build_clip_tokenizer(TINY_WORDS)  # the real 49k vocabulary would need a download
    words = torch.randn(2, 5, 768)
    with torch.no_grad():
        prompt_embeds = encode_prompts_with_words("a photo of a S", words, tokenizer, models.text_encoder)
        assert prompt_embeds.shape == (2, 77, 768)
        noise = models.unet(torch.randn(2, 4, 8, 8), 500, encoder_hidden_states=prompt_embeds).sample
        assert noise.shape == (2, 4, 8, 8) and torch.isfinite(noise).all()
        levels = clip_feature_levels(models.image_encoder, torch.randn(1, 3, 224, 224))
    assert [tuple(level.shape) for level in levels] == [(1, 257, 1024)] * 5
    # the five levels are distinct depths, the first one the final hidden state
    assert not torch.equal(levels[0], levels[4])
    assert all(torch.isfinite(level).all() for level in levels)
