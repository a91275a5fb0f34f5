"""Recording cross-attention probabilities of a diffusers UNet.

`record_cross_attention(unet)` installs, for every cross-attention layer (`attn2`), a processor
that computes the attention explicitly (softmax(QK^T / sqrt(d)) V, the same maths as the fused
kernel), keeps the probabilities, and returns the same output. On exit the UNet's previous
processors are restored, so outside the `with` block the fast fused path runs again.
"""
from __future__ import annotations

from collections import defaultdict
from contextlib import contextmanager

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention


class CrossAttentionRecorder:
    """Attention processor that records head-averaged probabilities.

    `maps[layer]` is a list (one entry per call) of (batch, query_pixels, tokens) tensors on the CPU.
    """

    def __init__(self, layer: str, maps: dict[str, list[torch.Tensor]]):
        self.layer, self.maps = layer, maps

    def __call__(self, attn: Attention, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if encoder_hidden_states is None:
            raise ValueError(f"{self.layer}: the recorder is for cross-attention layers only")
        batch = hidden_states.shape[0]
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        key = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
        value = attn.head_to_batch_dim(attn.to_v(encoder_hidden_states))
        probs = attn.get_attention_scores(query, key, attention_mask)  # (batch * heads, pixels, tokens)
        self.maps[self.layer].append(probs.detach().view(batch, attn.heads, *probs.shape[1:]).mean(1).float().cpu())
        out = attn.batch_to_head_dim(torch.bmm(probs, value))
        return attn.to_out[1](attn.to_out[0](out))


def cross_attention_layers(unet: UNet2DConditionModel) -> list[str]:
    """Processor names of every cross-attention (`attn2`) layer, in UNet order."""
    return [name for name in unet.attn_processors if name.endswith("attn2.processor")]


@contextmanager
def record_cross_attention(unet: UNet2DConditionModel, layers: list[str] | None = None):
    """Record the head-averaged probabilities of the given `attn2` layers (default: all).

    Yields a dict {processor name: [ (batch, pixels, tokens) per call ]}.
    """
    layers = cross_attention_layers(unet) if layers is None else layers
    previous = unet.attn_processors
    maps: dict[str, list[torch.Tensor]] = defaultdict(list)
    processors = {name: (CrossAttentionRecorder(name, maps) if name in layers else proc) for name, proc in previous.items()}
    unet.set_attn_processor(processors)
    try:
        yield maps
    finally:
        unet.set_attn_processor(previous)
