"""Chapter 04's exercises: the attention probabilities a capture records, and how a word's map is read from them.

The checks share one capture of their own: one call of the toy UNet (fixed seed) on a guided batch
[empty prompt; "a photo of a dog on the left"], on a latent wider than it is tall (16 × 24), so that a
grid's height and width cannot be swapped unnoticed. See `feedback` for what a failure says."""
from __future__ import annotations

from functools import lru_cache

import torch

from ..attention_maps import AttentionCapture, capture_cross_attention
from ..attention_plots import word_map
from .feedback import _as_tensor, attempt, expect, expect_close, passed
from .inputs import toy_components

PROMPT = "a photo of a dog on the left"
DOG = 5  # the token position of "dog" (0 is the start token)
LAYER = "up_blocks.2.attentions.1.transformer_blocks.0.attn2.processor"  # a finest-grid layer (16 × 24 here)


@lru_cache(maxsize=1)
def _capture() -> tuple[AttentionCapture, torch.Tensor, torch.Tensor, float]:
    """A capture of one toy UNet call, and the query and key of `LAYER` in it as its `to_q` and `to_k`
    produced them, split into heads: (2, heads, pixels, d) and (2, heads, 77, d); and the layer's scale."""
    components = toy_components()
    unet, tokenizer = components.unet, components.tokenizer
    ids = tokenizer(["", PROMPT], padding="max_length", max_length=tokenizer.model_max_length,
                    return_tensors="pt").input_ids
    latents = torch.randn(1, unet.config.in_channels, 16, 24, generator=torch.Generator().manual_seed(0))
    attn = unet.get_submodule(LAYER.removesuffix(".processor"))
    projected = {}
    hooks = [module.register_forward_hook(lambda m, args, out, which=which: projected.setdefault(which, out))
             for which, module in (("query", attn.to_q), ("key", attn.to_k))]
    try:
        with torch.no_grad(), capture_cross_attention(unet, guided=True) as capture:
            context = components.text_encoder(ids).last_hidden_state
            unet(torch.cat([latents] * 2), torch.tensor([500]), encoder_hidden_states=context)
    finally:
        for hook in hooks:
            hook.remove()
    head_dim = attn.to_q.out_features // attn.heads

    def heads(x: torch.Tensor) -> torch.Tensor:  # (n, length, heads * d) -> (n, heads, length, d)
        return x.view(len(x), -1, attn.heads, head_dim).transpose(1, 2)
    return capture, heads(projected["query"]), heads(projected["key"]), attn.scale


def attention_probabilities_by_hand(student) -> None:
    """`attention_probabilities_by_hand(query, key, scale)` -> softmax(q kᵀ · scale) over the tokens."""
    name = "attention_probabilities_by_hand"
    capture, query, key, scale = _capture()
    expected = capture.probabilities(LAYER)  # what the layer handed the capture: (rows, heads, pixels, tokens)
    got = _as_tensor(name, attempt(name, student, query.clone(), key.clone(), scale), "the probabilities")
    if got.shape == expected.shape and torch.isfinite(got).all():
        sums = got.sum(-1)
        expect(name, torch.allclose(sums, torch.ones_like(sums), atol=1e-4),
               f"each pixel's attention should sum to 1 over the {expected.shape[-1]} tokens; yours sums to "
               f"{float(sums.min()):.4g} to {float(sums.max()):.4g}.",
               hint="take the softmax over the last axis, the tokens (dim=-1), not over the pixels.")
    expect_close(name, got, expected, what="the probabilities",
                 hint="scores = query @ key.transpose(-1, -2) · scale (scale = 1/√d, the layer's attn.scale), "
                      "then softmax over the tokens (dim=-1).")
    passed(name, "These are the numbers the capture records for every layer and step")


def head_mean_map(student) -> None:
    """`head_mean_map(probs, row, position, height, width)` -> one token's map (height, width), mean over heads."""
    name = "head_mean_map"
    capture, *_ = _capture()
    row = capture.conditional_rows.start
    for layer, position in ((LAYER, DOG), (capture.layers[1], 1)):
        height, width = capture.resolution(layer)
        expected = word_map(capture, [position], row=row, layers=[layer])
        got = attempt(name, student, capture.probabilities(layer), row, position, height, width)
        expect_close(name, got, expected, what=f"the map of token {position} on the {height} × {width} grid",
                     hint="take probs[row], the token's column (..., position), the mean over the heads (the "
                          "first axis left), then reshape the pixels to (height, width): they are in raster "
                          "order, row by row, so pixel p sits at (p // width, p % width); no transpose.")
    passed(name, "Pixels are stored row by row: a flat map reshapes straight to (height, width)")


def mean_over_layers(student) -> None:
    """`mean_over_layers(maps, size)` -> the maps, each upsampled bilinearly to `size`, averaged."""
    name = "mean_over_layers"
    capture, *_ = _capture()
    row = capture.conditional_rows.start
    for position in (DOG, 1):
        maps = [word_map(capture, [position], row=row, layers=[layer]) for layer in capture.layers]
        size = max((tuple(m.shape) for m in maps), key=lambda shape: shape[0] * shape[1])
        expected = word_map(capture, [position], row=row)  # every layer, upsampled to the finest grid
        got = attempt(name, student, [m.clone() for m in maps], size)
        expect_close(name, got, expected, what=f"the mean map of token {position} ({len(maps)} layers)",
                     hint="upsample each map to `size` with F.interpolate(m[None, None], size=size, "
                          "mode=\"bilinear\", align_corners=False)[0, 0] (not nearest), then take the mean over "
                          "all the maps: each layer counts once, not each resolution.")
    passed(name, "This is word_map's map over every layer, the one the overlays draw")
