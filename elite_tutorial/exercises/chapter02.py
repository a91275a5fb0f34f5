"""Chapter 02's exercises: how big the words are against the vocabulary, a word's cross-attention map from
one layer's probabilities, and how much more of it falls on the object than around it.

Each check calls the student's function on inputs of its own (fixed seed, the toy preset on the CPU) and
compares it with what the package computes; see `feedback` for what a failure says."""
from __future__ import annotations

from functools import lru_cache

import torch

from ..attention_maps import AttentionCapture, capture_cross_attention
from ..attention_plots import inside_outside_ratio as package_inside_outside_ratio
from ..attention_plots import word_map
from ..words import word_norm_ratio as package_word_norm_ratio
from .feedback import attempt, expect_close, passed
from .inputs import keeps_global_rng, toy_components


@keeps_global_rng
def word_norm_ratio(student) -> None:
    """`word_norm_ratio(words, token_embeddings)` -> each word's norm over the vocabulary's mean token norm:
    words (..., width), token_embeddings (vocabulary, width). Returns (...,)."""
    name = "word_norm_ratio"
    table = toy_components().text_encoder.get_input_embeddings().weight.detach()
    generator = torch.Generator().manual_seed(0)
    scales = torch.tensor([0.3, 1.0, 5.0, 20.0, 70.0])[:, None] * table.norm(dim=-1).mean() / table.shape[1] ** 0.5
    words = torch.randn(4, 5, table.shape[1], generator=generator) * scales  # (4 concepts, 5 words, width)
    for case, given in (("4 concepts x 5 words", words), ("one word", words[0, 2])):
        got = attempt(name, student, given.clone(), table.clone())
        expect_close(name, got, package_word_norm_ratio(given, table), what=f"the ratios of {case}",
                     hint="each word's L2 norm is over its width (the last axis), one number per word; the reference "
                          "is the mean over the vocabulary of each token's norm (the table's norm over its last axis, "
                          "then the mean over the tokens), not a norm taken across the vocabulary.")
    passed(name, "1 is the size of a typical vocabulary token, the only kind of input the text encoder was trained on")


@lru_cache(maxsize=1)
def _capture() -> AttentionCapture:
    """The cross-attention of one toy UNet call on a 16 x 8 latent (a grid that is not square) with a
    plain prompt: every layer's probabilities, rows (1), heads, pixels, 77 tokens."""
    c = toy_components()
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        generator = torch.Generator().manual_seed(1)
        ids = c.tokenizer(["a photo of a red heart on the left"], padding="max_length", return_tensors="pt").input_ids
        context = c.text_encoder(ids).last_hidden_state
        with capture_cross_attention(c.unet) as capture:
            c.unet(torch.randn(1, 4, 16, 8, generator=generator), 500, encoder_hidden_states=context)
    return capture


@keeps_global_rng
def word_attention_map(student) -> None:
    """`word_attention_map(probs, positions, height, width)` -> the word's map (height, width): probs (heads,
    pixels, tokens) of one layer and one row, pixels in raster order; positions: the word's token positions."""
    name = "word_attention_map"
    capture = _capture()
    fine = [layer for layer in capture.layers if capture.resolution(layer) == (16, 8)][-1]
    coarse = [layer for layer in capture.layers if capture.resolution(layer) == (8, 4)][0]
    for layer, positions, words in ((fine, [5, 6], '"red heart"'), (coarse, [6], '"heart"')):
        height, width = capture.resolution(layer)
        expected = word_map(capture, positions, layers=[layer])
        got = attempt(name, student, capture.probabilities(layer)[0].clone(), list(positions), height, width)
        expect_close(name, got, expected, what=f"the map of {words} on a {height} x {width} grid",
                     hint="average over the heads (dim 0: a mean, so the map stays a share of each pixel's "
                          "attention), sum the columns of the word's token positions (dim -1), then lay the pixels "
                          "out row by row: reshape(height, width).")
    passed(name, "word_map does this for every layer of a resolution, and averages them")


@keeps_global_rng
def inside_outside_ratio(student) -> None:
    """`inside_outside_ratio(heat, mask)` -> mean of heat over the object / mean elsewhere: heat (h, w),
    mask (h, w) bool, True on the object. Returns a scalar."""
    name = "inside_outside_ratio"
    capture = _capture()
    layer = [layer for layer in capture.layers if capture.resolution(layer) == (16, 8)][-1]
    heart = word_map(capture, [6], layers=[layer])  # (16, 8)
    generator = torch.Generator().manual_seed(2)
    box = torch.zeros(16, 8, dtype=torch.bool)
    box[3:7, 1:4] = True  # 12 of 128 cells
    blob = torch.rand(16, 8, generator=generator) > 0.6
    flat = torch.full((16, 8), 0.25)
    for case, heat, mask in (("a word's map, a small box", heart, box), ("a word's map, a large blob", heart, blob),
                             ("a flat map", flat, box)):
        got = attempt(name, student, heat.clone(), mask.clone())
        expect_close(name, got, torch.tensor(package_inside_outside_ratio(heat, mask)), what=f"the ratio for {case}",
                     hint="divide the MEAN of heat over the object's cells by the MEAN over the other cells: a map "
                          "that is the same everywhere gives 1 whatever the object's size. A share of the total "
                          "(object sum / whole sum) mixes in how big the object is.")
    passed(name, "Above 1 the word looks at the object, below 1 around it")
