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

With a `LocalMapper` the processors also run ELITE's **local branch**: the same query attends over the
object's local tokens through the local k/v copies; that output is gated, pixel by pixel and head by
head, by w0's attention map from the text branch (normalised by its maximum, per sample) and scaled
by λ, then added to the text branch's output before `to_out`. The tokens of one call are given as
`LocalTokens` (`set_local_tokens`, or `elite_attention(..., local=...)`).
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention
from torch import nn


class AttentionRecorder(Protocol):
    """What the processors report to (`attention_maps.AttentionCapture`): the processors depend on
    this, the capture on the processors, never the reverse."""

    def record(self, layer: str, probs: torch.Tensor) -> None: ...

    def record_gate(self, layer: str, gate: torch.Tensor) -> None: ...


def cross_attention_layers(unet: UNet2DConditionModel) -> list[str]:
    """Processor names of every cross-attention (`attn2`) layer, in UNet order."""
    return [name for name in unet.attn_processors if name.endswith("attn2.processor")]


def attention_probabilities(query: torch.Tensor, key: torch.Tensor, scale: float,
                            attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T * scale + mask), the probabilities the fused kernel never materialises.

    query (n, heads, pixels, d), key (n, heads, tokens, d) -> (n, heads, pixels, tokens), in fp32
    whatever the inputs' dtype (as CUDA autocast computes softmax, and the CPU then does too).
    """
    scores = query @ key.transpose(-1, -2) * scale
    return (scores + (attention_mask if attention_mask is not None else 0)).float().softmax(dim=-1)


@dataclass
class LocalTokens:
    """What ELITE's local branch reads during UNet calls.

    tokens: (rows, patches, text_width), the masked local tokens (`mappers.mask_local_tokens`).
    rows: (rows,) long, the rows of the UNet batch they belong to. Under batched classifier-free
        guidance these are the conditional rows: the unconditional ones get no local term, as in the
        authors' code.
    primary_index: (rows,) long, the position of w0 among each of those rows' prompt tokens.
    scale: λ; 1 in training, 0.8 by default at inference. 0 leaves the text branch's result exactly.
    capture: an `AttentionRecorder` (an `attention_maps.AttentionCapture`) that records the gate
        (rows, heads, pixels) per layer, or None.
    """

    tokens: torch.Tensor
    rows: torch.Tensor
    primary_index: torch.Tensor
    scale: float = 0.8
    capture: AttentionRecorder | None = None

    def __post_init__(self):
        if not (len(self.tokens) == len(self.rows) == len(self.primary_index)):
            raise ValueError(f"LocalTokens: {len(self.tokens)} token sets, {len(self.rows)} rows and "
                             f"{len(self.primary_index)} primary indices; they must match.")


def local_gate(probs: torch.Tensor, primary_index: torch.Tensor) -> torch.Tensor:
    """ELITE's local gate: w0's attention probability at each pixel, per head, in the text branch,
    divided by its maximum per sample (over that sample's heads and pixels together).

    probs: (rows, heads, pixels, tokens), the text branch's probabilities of the rows with local tokens;
    primary_index: (rows,) long, w0's position among each row's tokens. Returns (rows, heads, pixels, 1):
    each sample's largest value is 1.
    """
    index = primary_index.to(probs.device).view(-1, 1, 1, 1).expand(-1, *probs.shape[1:3], 1)
    gate = probs.gather(-1, index)
    return gate / gate.amax(dim=(1, 2, 3), keepdim=True)


class ELITEAttnProcessor:
    """An `attn2` processor whose keys and values come from ELITE's copies `to_k`, `to_v`, with
    ELITE's local branch when given local k/v copies and `local` tokens.

    Same maths as diffusers' `AttnProcessor2_0` for Stable Diffusion's cross-attention (fused
    `F.scaled_dot_product_attention`), with `attn.to_k`/`attn.to_v` swapped for the copies.
    """

    def __init__(self, layer: str, to_k: nn.Linear, to_v: nn.Linear, replaced, capture: AttentionRecorder | None = None,
                 local_kv: tuple[nn.Linear, nn.Linear] | None = None):
        self.layer, self.to_k, self.to_v = layer, to_k, to_v
        self.replaced = replaced  # the processor this one stands in for; restored on removal
        self.capture = capture    # an AttentionRecorder: the explicit path, which hands it the probabilities
        self.local_kv = local_kv  # (to_k_local, to_v_local) of a LocalMapper, or None
        self.local: LocalTokens | None = None

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb=None, **kwargs) -> torch.Tensor:
        """hidden_states: (batch, pixels, channels); encoder_hidden_states: (batch, tokens, context_width).
        Returns (batch, pixels, channels)."""
        if encoder_hidden_states is None:
            raise ValueError(f"{self.layer}: ELITE's processor is for cross-attention; it got no text context.")
        batch, pixels, _ = hidden_states.shape
        head_dim = attn.to_q.out_features // attn.heads

        def heads(x: torch.Tensor) -> torch.Tensor:  # (n, length, heads * d) -> (n, heads, length, d)
            return x.view(len(x), -1, attn.heads, head_dim).transpose(1, 2)

        query = heads(attn.to_q(hidden_states))
        key = heads(_project(self.to_k, encoder_hidden_states, query.dtype))
        value = heads(_project(self.to_v, encoder_hidden_states, query.dtype))
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, encoder_hidden_states.shape[1], batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if self.capture is None:
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask)
        else:  # the same maths, with the probabilities in hand: (batch, heads, pixels, tokens)
            probs = attention_probabilities(query, key, attn.scale, attention_mask)
            self.capture.record(self.layer, probs)
            out = probs @ value
        if self.local is not None and self.local.scale != 0:
            out = out.index_add(0, self.local.rows.to(out.device), self._local_term(attn, query, key, attention_mask, heads))
        out = out.transpose(1, 2).reshape(batch, pixels, attn.heads * head_dim)
        return attn.to_out[1](attn.to_out[0](out))

    def _local_term(self, attn: Attention, query, key, attention_mask, heads) -> torch.Tensor:
        """λ · gate · attention over the local tokens, for the rows that have them: (rows, heads, pixels, d)."""
        if self.local_kv is None:
            raise ValueError(f"{self.layer}: local tokens were given, but no LocalMapper was installed.")
        local = self.local
        rows = local.rows.to(query.device)
        query = query[rows]
        probs = attention_probabilities(query, key[rows], attn.scale, None if attention_mask is None else attention_mask[rows])
        gate = local_gate(probs, local.primary_index)  # w0's map over its maximum per sample: (rows, heads, pixels, 1)
        if local.capture is not None:
            local.capture.record_gate(self.layer, gate[..., 0])
        to_k_local, to_v_local = self.local_kv
        tokens = local.tokens.to(query.device)
        attended = F.scaled_dot_product_attention(query, heads(_project(to_k_local, tokens, query.dtype)),
                                                  heads(_project(to_v_local, tokens, query.dtype)))
        # the gate is one number per query row, so gating the probabilities (as the authors write it)
        # and gating the attended values are the same; the gate is fp32 under autocast, the output not
        return (local.scale * gate * attended).to(attended.dtype)


def _project(linear: nn.Linear, context: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A k/v copy applied in its own dtype (fp32 copies under bf16 autocast stay fp32), result in `dtype`."""
    return linear(context.to(linear.weight.dtype)).to(dtype)


def _check_supported(unet: UNet2DConditionModel, layer: str) -> None:
    """Stable Diffusion's attn2 layers have none of these options; refuse a UNet that does."""
    attn = unet.get_submodule(layer.removesuffix(".processor"))
    unsupported = [name for name in ("spatial_norm", "group_norm", "norm_cross", "norm_q", "norm_k")
                   if getattr(attn, name, None) is not None]
    if attn.residual_connection or attn.rescale_output_factor != 1.0:
        unsupported.append("residual_connection/rescale_output_factor")
    if unsupported:
        raise ValueError(f"{layer}: ELITE's processor supports Stable Diffusion's cross-attention; this layer uses {unsupported}.")


def install_elite_attention(unet: UNet2DConditionModel, mapper, capture: AttentionRecorder | None = None,
                            local_mapper=None) -> None:
    """Give every `attn2` layer an `ELITEAttnProcessor` with the mapper's k/v copies (idempotent).
    With `capture`, each layer hands it its attention probabilities on every call (see
    `attention_maps.capture_cross_attention`, the usual way to capture). With `local_mapper`, the
    processors carry its local k/v copies; the local branch runs while `set_local_tokens` has given
    them tokens."""
    processors = unet.attn_processors
    layers = cross_attention_layers(unet)
    for layer in layers:
        _check_supported(unet, layer)
        current = processors[layer]
        replaced = current.replaced if isinstance(current, ELITEAttnProcessor) else current
        local_kv = local_mapper.key_value(layer) if local_mapper is not None else None
        processors[layer] = ELITEAttnProcessor(layer, *mapper.key_value(layer), replaced=replaced, capture=capture,
                                               local_kv=local_kv)
    unet.set_attn_processor(processors)


def set_local_tokens(unet: UNet2DConditionModel, local: LocalTokens | None) -> None:
    """The local tokens ELITE's processors read from now on (None: the text branch alone)."""
    processors = [p for p in unet.attn_processors.values() if isinstance(p, ELITEAttnProcessor)]
    if not processors:
        raise ValueError("Install ELITE's attention (install_elite_attention) before giving it local tokens.")
    for processor in processors:
        processor.local = local


def remove_elite_attention(unet: UNet2DConditionModel) -> None:
    """Put back the processors that ELITE's replaced (a no-op where none is installed)."""
    processors = {name: (p.replaced if isinstance(p, ELITEAttnProcessor) else p) for name, p in unet.attn_processors.items()}
    unet.set_attn_processor(processors)


@contextmanager
def elite_attention(unet: UNet2DConditionModel, mapper, capture: AttentionRecorder | None = None, local_mapper=None,
                    local: LocalTokens | None = None) -> Iterator[UNet2DConditionModel]:
    """ELITE's processors inside the block; the UNet's previous processors, exactly, after it.
    `capture`, `local_mapper`: see `install_elite_attention`; `local`: see `set_local_tokens`."""
    previous = unet.attn_processors
    install_elite_attention(unet, mapper, capture, local_mapper)
    if local is not None:
        set_local_tokens(unet, local)
    try:
        yield unet
    finally:
        unet.set_attn_processor(previous)
