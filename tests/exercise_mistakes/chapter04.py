"""Chapter 04: one typical mistake per exercise, keyed by its check's name; each must fail its check with a message
(tests/test_exercises.py). Each source defines the exercise's function, written wrong."""

MISTAKES = {
    # 04: the softmax over the pixels; the grid laid out column by column; nearest-neighbour upsampling
    "attention_probabilities_by_hand": """
def attention_probabilities_by_hand(query, key, scale):
    return (query @ key.transpose(-1, -2) * scale).softmax(dim=-2)
""",
    "head_mean_map": """
def head_mean_map(probs, row, position, height, width):
    return probs[row, :, :, position].mean(0).reshape(width, height).T
""",
    "mean_over_layers": """
def mean_over_layers(maps, size):
    import torch
    import torch.nn.functional as F
    return torch.stack([F.interpolate(m[None, None], size=size, mode="nearest")[0, 0] for m in maps]).mean(0)
""",
}
