"""Per-word maps from a capture: the right tokens, layers, heads and steps, and drawings of them."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from elite_tutorial.attention_maps import AttentionCapture
from elite_tutorial.attention_plots import (
    gate_map,
    injected_word_names,
    inside_outside_ratio,
    overlay,
    prompt_words,
    resolutions,
    word_grid,
    word_map,
)

FINE, COARSE = "down_blocks.0.attn2.processor", "mid_block.attn2.processor"


def synthetic_capture(keep_steps=False) -> AttentionCapture:
    """Two layers (4x4 and 2x2 grids), two heads, rows [unconditional; conditional], two steps."""
    capture = AttentionCapture(keep_steps=keep_steps, guided=True)
    generator = torch.Generator().manual_seed(0)
    for t in (800, 200):
        capture.on_unet_call(torch.zeros(2, 4, 4, 4), t)
        for layer, pixels in ((FINE, 16), (COARSE, 4)):
            capture.record(layer, torch.rand(2, 2, pixels, 77, generator=generator).softmax(-1))
            capture.record_gate(layer, torch.rand(1, 2, pixels, generator=generator))
    return capture


def test_prompt_words_merge_sub_tokens_and_name_the_injected_words(tiny):
    words = prompt_words(tiny.tokenizer, "a close-up photo of a S, on the left")
    assert [w.label for w in words] == ["a", "close-up", "photo", "of", "a", "w0", ",", "on", "the", "left"]
    assert words[1].positions == (2, 3, 4) and words[5].positions == (8,) and words[6].positions == (9,)
    full = prompt_words(tiny.tokenizer, "a photo of S on the left", injected_word_names("full"))
    assert [w.label for w in full][3:9] == ["w0", "w1", "w2", "w3", "w4", "on"]
    assert full[8].positions == (9,)  # every later word moves right by the 4 extra words
    assert [w.label for w in prompt_words(tiny.tokenizer, "a red circle")] == ["a", "red", "circle"]
    assert injected_word_names([2, 0]) == ("w2", "w0")


def test_word_map_averages_heads_layers_and_steps_of_the_conditional_row():
    capture = synthetic_capture(keep_steps=True)
    assert resolutions(capture) == [4, 2]
    fine = capture.probabilities(FINE)[1]  # conditional row: (heads, pixels, tokens)
    torch.testing.assert_close(word_map(capture, [3, 4], resolution=4), fine[:, :, [3, 4]].sum(-1).mean(0).reshape(4, 4))
    torch.testing.assert_close(word_map(capture, [3], resolution=4, head=1), fine[1, :, 3].reshape(4, 4))
    coarse = capture.probabilities(COARSE)[1][:, :, 3].mean(0).reshape(1, 1, 2, 2)
    upsampled = F.interpolate(coarse, size=(4, 4), mode="bilinear", align_corners=False)[0, 0]
    torch.testing.assert_close(word_map(capture, [3]), (word_map(capture, [3], resolution=4) + upsampled) / 2)
    late = capture.probabilities(FINE, [1])[1][:, :, 3].mean(0).reshape(4, 4)
    torch.testing.assert_close(word_map(capture, [3], resolution=4, steps=[1]), late)
    unconditional = capture.probabilities(FINE)[0][:, :, 3].mean(0).reshape(4, 4)
    torch.testing.assert_close(word_map(capture, [3], row=0, resolution=4), unconditional)
    with pytest.raises(ValueError, match="resolution 8"):
        word_map(capture, [3], resolution=8)


def test_inside_outside_ratio_divides_the_mean_on_the_object_by_the_mean_around_it():
    heat = torch.tensor([[4.0, 4.0, 1.0, 1.0], [4.0, 4.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0], [2.0, 2.0, 2.0, 2.0]])
    mask = np.zeros((4, 4), bool)
    mask[:2, :2] = True
    assert inside_outside_ratio(heat, mask) == pytest.approx(4.0 / (16.0 / 12.0))
    fine = np.kron(mask, np.ones((4, 4), bool))  # the same object at 16 x 16: resized to the map's grid by area
    fine[0, 0] = False  # a cell three quarters object still counts as object
    assert inside_outside_ratio(heat, fine) == pytest.approx(3.0)
    assert inside_outside_ratio(torch.ones(4, 4), mask) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="covers no cell"):
        inside_outside_ratio(heat, np.zeros((4, 4), bool))
    with pytest.raises(ValueError, match="covers every cell"):
        inside_outside_ratio(heat, np.ones((16, 16)))


def test_gate_map_reads_the_local_branch_rows():
    capture = synthetic_capture()
    torch.testing.assert_close(gate_map(capture, resolution=2), capture.gate(COARSE)[0].mean(0).reshape(2, 2))


def test_overlay_blends_a_normalised_colour_map_over_the_image():
    image = np.full((8, 8, 3), 200, np.uint8)
    heat = torch.zeros(2, 2)
    heat[0, 0] = 5.0
    assert np.array_equal(np.asarray(overlay(image, heat, opacity=0.0)), image)
    full = np.asarray(overlay(image, heat, opacity=1.0))
    assert full.shape == (8, 8, 3)
    assert not np.array_equal(full[0, 0], full[7, 7])  # the hot corner is coloured differently
    assert overlay(image.astype(np.float32) / 255, heat).size == (8, 8)  # float images in [0, 1] too


def test_word_grid_has_the_image_and_one_titled_map_per_word(tiny, tmp_path):
    capture = synthetic_capture()
    words = prompt_words(tiny.tokenizer, "a photo of a S")
    figure = word_grid(np.zeros((4, 4, 3), np.uint8), capture, words)
    assert [ax.get_title() for ax in figure.axes] == ["image", "a", "photo", "of", "a", "w0"]
    figure.savefig(tmp_path / "grid.png")
    assert Image.open(tmp_path / "grid.png").size[0] > 0
