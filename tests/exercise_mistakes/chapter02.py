"""Chapter 02: one typical mistake per exercise, keyed by its check's name; each must fail its check with a message
(tests/test_exercises.py). Each source defines the exercise's function, written wrong."""

MISTAKES = {
    # 02: the vocabulary's norms taken across the tokens; the heads summed instead of averaged;
    # the object's share of the total instead of a ratio of means
    "word_norm_ratio": """
def word_norm_ratio(words, token_embeddings):
    return words.norm(dim=-1) / token_embeddings.norm(dim=0).mean()
""",
    "word_attention_map": """
def word_attention_map(probs, positions, height, width):
    return probs.sum(dim=0)[:, positions].sum(dim=-1).reshape(height, width)
""",
    "inside_outside_ratio": """
def inside_outside_ratio(heat, mask):
    return heat[mask].sum() / heat.sum()
""",
}
