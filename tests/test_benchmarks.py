"""The training-step benchmark compares like with like: both sides compute the same step."""
import importlib.util
from pathlib import Path

import torch

from elite_tutorial.attention import elite_attention
from elite_tutorial.mappers import GlobalMapper

spec = importlib.util.spec_from_file_location(
    "global_training_step", Path(__file__).resolve().parent.parent / "benchmarks" / "global_training_step.py")
benchmark = importlib.util.module_from_spec(spec)
spec.loader.exec_module(benchmark)


def test_authors_eager_attention_equals_ours(tiny):
    unet, mapper = tiny.unet, GlobalMapper.from_components(tiny)
    with torch.no_grad():
        for layer in mapper.attention_layers:
            mapper.to_v_global[layer].weight.mul_(-0.7)  # copies unlike the UNet's own
    latents, t, context = torch.randn(2, 4, 16, 16), torch.tensor([3, 700]), torch.randn(2, 77, 32)
    previous = unet.attn_processors
    unet.set_attn_processor(benchmark.authors_processors(unet, mapper))
    try:
        with torch.no_grad():
            authors = unet(latents, t, encoder_hidden_states=context).sample
    finally:
        unet.set_attn_processor(previous)
    with torch.no_grad(), elite_attention(unet, mapper):
        ours = unet(latents, t, encoder_hidden_states=context).sample
    torch.testing.assert_close(ours, authors, rtol=1e-4, atol=1e-5)
