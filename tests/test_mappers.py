import pytest
import torch

from elite_tutorial.mappers import clip_feature_levels, feature_layer_indices


@pytest.mark.parametrize("layers, expected", [(24, (4, 8, 12, 16)), (12, (2, 4, 6, 8)), (6, (1, 2, 3, 4))])
def test_feature_levels_keep_the_relative_depths_of_vit_l(layers, expected):
    assert feature_layer_indices(layers) == expected


def test_too_shallow_a_tower_is_refused():
    with pytest.raises(ValueError, match="at least 4 layers"):
        feature_layer_indices(3)


def test_levels_are_the_documented_hidden_states(tiny):
    pixels = torch.randn(2, 3, 32, 32)
    levels = clip_feature_levels(tiny.image_encoder, pixels)
    hidden = tiny.image_encoder(pixels, output_hidden_states=True).hidden_states
    expected = [hidden[-1], hidden[1], hidden[2], hidden[3], hidden[4]]
    assert all(torch.equal(a, b) for a, b in zip(levels, expected))
    assert levels[0].shape == (2, 1 + 64, 32)
