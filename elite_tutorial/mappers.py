"""CLIP image features at ELITE's five levels (the mapping networks that read them come next).

ELITE reads CLIP ViT-L/14 (24 layers) at five depths, in this order: the final hidden state, then the
outputs of layers 4, 8, 12 and 16 (`hidden_states[k]`, where `hidden_states[0]` is the patch
embedding). Deep features say *what* the object is; shallow ones keep *how it looks*.

For a vision tower with another depth (the toy and tiny presets) the four intermediate layers are
taken at the same relative depths, k * num_layers / 24, rounded: 6 layers -> 1, 2, 3, 4.
"""
from __future__ import annotations

import torch
from transformers import CLIPVisionModel

ELITE_LAYERS_OF_24 = (4, 8, 12, 16)
NUM_LEVELS = 1 + len(ELITE_LAYERS_OF_24)


def feature_layer_indices(num_layers: int) -> tuple[int, ...]:
    """The `hidden_states` indices ELITE reads below the last layer, for a tower of `num_layers`."""
    if num_layers < len(ELITE_LAYERS_OF_24):
        raise ValueError(f"A vision tower needs at least {len(ELITE_LAYERS_OF_24)} layers for ELITE's levels; this one has {num_layers}.")
    indices = tuple(max(1, round(k * num_layers / 24)) for k in ELITE_LAYERS_OF_24)
    if len(set(indices)) != len(indices):
        raise ValueError(f"{num_layers} layers give repeated feature levels {indices}.")
    return indices


def clip_feature_levels(image_encoder: CLIPVisionModel, pixel_values: torch.Tensor) -> list[torch.Tensor]:
    """The five feature levels, `[last_hidden_state, hidden_states[4], [8], [12], [16]]` for ViT-L/14.

    pixel_values: (batch, 3, S, S), CLIP-normalised (224 px for ViT-L/14).
    Returns 5 tensors (batch, 1 + patches, vision_width): the class token first, then the patch
    tokens in raster order (257 x 1024 for ViT-L/14).
    """
    output = image_encoder(pixel_values.to(image_encoder.device, image_encoder.dtype), output_hidden_states=True)
    layers = feature_layer_indices(image_encoder.config.num_hidden_layers)
    return [output.last_hidden_state] + [output.hidden_states[k] for k in layers]
