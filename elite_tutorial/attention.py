"""ELITE's cross-attention: the text context goes through the mapper's own k/v copies.

ELITE trains a copy of every cross-attention (`attn2`) layer's `to_k`/`to_v` (initialised from the
UNet's), and uses the copies for *all* text context: the prompt with the injected words and the empty
prompt of classifier-free guidance alike (as the authors' code does). The UNet's own weights are
never changed; the copies live in the `GlobalMapper`.

The UNet is changed only through `unet.set_attn_processor`, by layer name:

    with elite_attention(unet, mapper):      # installed here, previous processors back on exit
        unet(latents, t, encoder_hidden_states=prompt_embeds)

or `install_elite_attention(unet, mapper)` / `remove_elite_attention(unet)`. Installing twice does not
stack: each ELITE processor remembers the processor it replaced, and a second install replaces the
ELITE processor, not wraps it.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention
from torch import nn

from .attention_maps import cross_attention_layers


class ELITEAttnProcessor:
    """An `attn2` processor whose keys and values come from ELITE's copies `to_k`, `to_v`.

    Same maths as diffusers' `AttnProcessor2_0` for Stable Diffusion's cross-attention (fused
    `F.scaled_dot_product_attention`), with `attn.to_k`/`attn.to_v` swapped for the copies.
    """

    def __init__(self, layer: str, to_k: nn.Linear, to_v: nn.Linear, replaced, capture: dict | None = None):
        self.layer, self.to_k, self.to_v = layer, to_k, to_v
        self.replaced = replaced  # the processor this one stands in for; restored on removal
        self.capture = capture    # if a dict: {layer: [head-mean probabilities per call]}, explicit path

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb=None, **kwargs) -> torch.Tensor:
        """hidden_states: (batch, pixels, channels); encoder_hidden_states: (batch, tokens, context_width).
        Returns (batch, pixels, channels)."""
        if encoder_hidden_states is None:
            raise ValueError(f"{self.layer}: ELITE's processor is for cross-attention; it got no text context.")
        batch, pixels, _ = hidden_states.shape
        query = attn.to_q(hidden_states)
        key = self.to_k(encoder_hidden_states.to(self.to_k.weight.dtype)).to(query.dtype)
        value = self.to_v(encoder_hidden_states.to(self.to_v.weight.dtype)).to(query.dtype)
        head_dim = query.shape[-1] // attn.heads

        def heads(x: torch.Tensor) -> torch.Tensor:  # (batch, n, heads * d) -> (batch, heads, n, d)
            return x.view(batch, -1, attn.heads, head_dim).transpose(1, 2)

        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, encoder_hidden_states.shape[1], batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if self.capture is None:
            out = F.scaled_dot_product_attention(heads(query), heads(key), heads(value), attn_mask=attention_mask)
        else:  # the same maths, with the probabilities in hand: (batch, heads, pixels, tokens)
            scores = heads(query) @ heads(key).transpose(-1, -2) * attn.scale
            probs = (scores + (attention_mask if attention_mask is not None else 0)).softmax(dim=-1)
            self.capture.setdefault(self.layer, []).append(probs.detach().mean(1).float().cpu())
            out = probs @ heads(value)
        out = out.transpose(1, 2).reshape(batch, pixels, attn.heads * head_dim)
        return attn.to_out[1](attn.to_out[0](out))


def _check_supported(unet: UNet2DConditionModel, layer: str) -> None:
    """Stable Diffusion's attn2 layers have none of these options; refuse a UNet that does."""
    attn = unet.get_submodule(layer.removesuffix(".processor"))
    unsupported = [name for name in ("spatial_norm", "group_norm", "norm_cross", "norm_q", "norm_k")
                   if getattr(attn, name, None) is not None]
    if attn.residual_connection or attn.rescale_output_factor != 1.0:
        unsupported.append("residual_connection/rescale_output_factor")
    if unsupported:
        raise ValueError(f"{layer}: ELITE's processor supports Stable Diffusion's cross-attention; this layer uses {unsupported}.")


def install_elite_attention(unet: UNet2DConditionModel, mapper, capture: dict | None = None) -> None:
    """Give every `attn2` layer an `ELITEAttnProcessor` with the mapper's k/v copies (idempotent).
    With `capture` (a dict), each layer appends its head-averaged attention probabilities
    (batch, pixels, tokens) to `capture[processor name]` on every call."""
    processors = unet.attn_processors
    layers = cross_attention_layers(unet)
    for layer in layers:
        _check_supported(unet, layer)
        current = processors[layer]
        replaced = current.replaced if isinstance(current, ELITEAttnProcessor) else current
        processors[layer] = ELITEAttnProcessor(layer, *mapper.key_value(layer), replaced=replaced, capture=capture)
    unet.set_attn_processor(processors)


def remove_elite_attention(unet: UNet2DConditionModel) -> None:
    """Put back the processors that ELITE's replaced (a no-op where none is installed)."""
    processors = {name: (p.replaced if isinstance(p, ELITEAttnProcessor) else p) for name, p in unet.attn_processors.items()}
    unet.set_attn_processor(processors)


@contextmanager
def elite_attention(unet: UNet2DConditionModel, mapper, capture: dict | None = None) -> Iterator[UNet2DConditionModel]:
    """ELITE's processors inside the block; the UNet's previous processors, exactly, after it.
    `capture`: see `install_elite_attention`."""
    previous = unet.attn_processors
    install_elite_attention(unet, mapper, capture)
    try:
        yield unet
    finally:
        unet.set_attn_processor(previous)
