"""Chapter 03's exercises: the local mapper's tokens, the gate, and ELITE's cross-attention with its local branch.

Each check calls the student's function on inputs of its own (fixed seed; the toy components and the shipped
mappers) and compares it with what the package computes; see `feedback` for what a failure says."""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from PIL import Image

from ..attention import ELITEAttnProcessor, LocalTokens
from ..attention import local_gate as package_local_gate
from ..attention_maps import attention_probabilities
from ..components import ASSETS_DIR
from ..data import clip_pixels
from ..mappers import GlobalMapper, LocalMapper, clip_feature_levels, mask_local_tokens
from .feedback import _as_tensor, attempt, expect, expect_close, passed
from .inputs import toy_components

LAYER = "up_blocks.2.attentions.1.transformer_blocks.0.attn2"  # a 16 × 16 layer of the toy UNet


@lru_cache(maxsize=1)
def _toy():
    """The toy components and the shipped mappers (loaded once per session)."""
    components = toy_components()
    return (components, GlobalMapper.from_pretrained(ASSETS_DIR / "toy-global-mapper").eval(),
            LocalMapper.from_pretrained(ASSETS_DIR / "toy-local-mapper").eval())


@lru_cache(maxsize=1)
def _two_objects() -> tuple[list[torch.Tensor], torch.Tensor]:
    """CLIP feature levels of two concepts' objects alone (background blacked out), and their masks
    (2, 64, 64) bool, as the chapter prepares them."""
    from ..toyworld.concepts import CONCEPTS, concept_views  # noqa: PLC0415

    components, _, _ = _toy()
    size = components.image_encoder.config.image_size
    views = [concept_views(CONCEPTS[k])[0] for k in (0, 5)]
    pixels = torch.stack([clip_pixels(Image.fromarray((image * mask[..., None]).astype(np.uint8)), size)
                          for image, mask in views])
    with torch.no_grad():
        levels = clip_feature_levels(components.image_encoder, pixels)
    return levels, torch.from_numpy(np.stack([mask for _, mask in views]))


def local_tokens(student) -> None:
    """`local_tokens(local_mapper, levels, mask)` -> the masked local tokens (batch, patches, text_width)."""
    name = "local_tokens"
    _, _, local_mapper = _toy()
    levels, mask = _two_objects()
    with torch.no_grad():
        unmasked = local_mapper(levels)
        expected = mask_local_tokens(unmasked, mask)
        got = attempt(name, student, local_mapper, [level.clone() for level in levels], mask.clone())
    if got is not None and tuple(getattr(got, "shape", ())) == tuple(expected.shape) \
            and torch.allclose(torch.as_tensor(got).detach().float(), unmasked, atol=1e-5, rtol=1e-4):
        expect(name, False, "your tokens are right before the mask, but the background patches are not zero.",
               hint="resize the mask to the patch grid (side × side, `mode=\"nearest\"`; a bool mask needs "
                    ".float() first), flatten it to (batch, patches) and multiply each token by it.")
    expect_close(name, got, expected, what="the local tokens",
                 hint="per level i, token p is mapping[i](class token) + mapping_patch[i](patch p): keep every "
                      "patch (no mean over patches, unlike the global mapper), average the levels (mean, not "
                      "sum), then zero the background with the mask resized to the patch grid by nearest neighbour.")
    passed(name, "One token per patch, the class token's mapping in each, the background's set to zero")


def local_gate(student) -> None:
    """`local_gate(probs, primary_index)` -> w0's probability per head and pixel over its maximum per sample."""
    name = "local_gate"
    generator = torch.Generator().manual_seed(3)
    rows, heads, pixels, tokens, width = 3, 4, 64, 77, 16
    query = torch.randn(rows, heads, pixels, width, generator=generator)
    key = torch.randn(rows, heads, tokens, width, generator=generator)
    sharpness = torch.tensor([0.5, 1.0, 2.0]).view(-1, 1, 1, 1)  # each sample's maps peak at a different height
    probs = attention_probabilities(query * sharpness, key, width ** -0.5)
    primary_index = torch.tensor([5, 2, 7])
    expected = package_local_gate(probs, primary_index)
    got = attempt(name, student, probs.clone(), primary_index.clone())
    if got is not None and tuple(getattr(got, "shape", ())) == (rows, heads, pixels):
        expect(name, False, f"the gate has shape {tuple(got.shape)}, expected {tuple(expected.shape)}.",
               hint="keep the token axis with size 1 (`gather(-1, ...)` or `[..., [i]]`), so that the gate "
                    "multiplies a (rows, heads, pixels, d) attention output pixel by pixel.")
    expect_close(name, got, expected, what="the gate",
                 hint="take each row's column primary_index[row] of probs (w0's probability at every head and "
                      "pixel), then divide by that row's own maximum over its heads and pixels together: "
                      "amax over dims (1, 2, 3) with keepdim=True, not over the whole batch, not per head.")
    passed(name, "Each sample's gate peaks at exactly 1, where w0 is read most")


@lru_cache(maxsize=1)
def _layer_inputs():
    """A toy UNet cross-attention layer with ELITE's copies, and a guided batch for it: image features
    (4, 256, 64), the text context [empty, empty, prompt 1, prompt 2] (4, 77, 128), the local tokens
    of the two prompts' objects (2, 64, 128), their rows [2, 3] and w0's positions in them."""
    components, global_mapper, local_mapper = _toy()
    tokenizer = components.tokenizer
    prompts = ["", "", "a photo of a dog", "a cat on the left"]  # w0 stands at "dog" (5) and "cat" (2)
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
    levels, mask = _two_objects()
    with torch.no_grad():
        context = components.text_encoder(ids).last_hidden_state
        tokens = mask_local_tokens(local_mapper(levels), mask)
    attn = components.unet.get_submodule(LAYER)
    hidden_states = torch.randn(4, 256, attn.to_q.in_features, generator=torch.Generator().manual_seed(4))
    return (attn, hidden_states, context, *global_mapper.key_value(LAYER), tokens, *local_mapper.key_value(LAYER),
            torch.tensor([5, 2]), torch.tensor([2, 3]))


def elite_cross_attention(student) -> None:
    """`elite_cross_attention(attn, hidden_states, context, to_k, to_v, local_tokens, to_k_local, to_v_local,
    primary_index, scale, rows)` -> ELITE's attention output (batch, pixels, channels)."""
    name = "elite_cross_attention"
    attn, hidden_states, context, to_k, to_v, tokens, to_k_local, to_v_local, primary_index, rows = _layer_inputs()
    processor = ELITEAttnProcessor(LAYER, to_k, to_v, replaced=None, local_kv=(to_k_local, to_v_local))
    for scale in (0.8, 0.0):
        processor.local = LocalTokens(tokens, rows, primary_index, scale)
        with torch.no_grad():
            expected = processor(attn, hidden_states, encoder_hidden_states=context)
            got = attempt(name, student, attn, hidden_states.clone(), context.clone(), to_k, to_v, tokens.clone(),
                          to_k_local, to_v_local, primary_index.clone(), scale, rows.clone())
        got = _as_tensor(name, got, f"the result at λ={scale}")
        shape = tuple(got.shape)
        expect(name, shape == tuple(expected.shape), f"the result at λ={scale} has shape {shape}, expected "
               f"{tuple(expected.shape)}.", hint="return (batch, pixels, channels): the heads back together "
                                                 "(the scaffolding's last two lines) and through attn.to_out.")
        expect_close(name, got[:2], expected[:2], what=f"the unconditional rows (0, 1) at λ={scale}",
                     hint="these rows get the text branch alone: softmax(q kᵀ · attn.scale) v with the query "
                          "from attn.to_q and the keys and values from the copies to_k and to_v (not attn.to_k). "
                          "The local term goes to `rows` only.")
        expect_close(name, got[2:], expected[2:], what=f"the conditional rows (2, 3) at λ={scale}",
                     hint="these rows add scale · gate · softmax(q k_localᵀ · attn.scale) v_local to the text "
                          "branch, before to_out: k_local and v_local come from to_k_local and to_v_local applied "
                          "to the local tokens, and the gate is w0's map over its maximum per sample (03.2), "
                          "one number per head and pixel.")
    passed(name, "The same numbers as ELITEAttnProcessor: text branch everywhere, gated local detail on the prompt's rows")
