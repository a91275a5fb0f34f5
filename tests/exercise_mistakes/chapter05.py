"""Chapter 05: one typical mistake per exercise, keyed by its check's name; each must fail its check with a message
(tests/test_exercises.py). Each source defines the exercise's function, written wrong."""

MISTAKES = {
    # 05: an image counted faithful only when all three attributes are right; an edit counted without the
    # concept; embeddings compared unnormalised; resampling without replacement (a permutation)
    "fidelity": """
import numpy as np
def fidelity(predictions, identity):
    right = [[label == identity[name] for label in predictions[name]] for name in identity]
    return float(np.all(right, axis=0).mean())
""",
    "edit_success": """
import numpy as np
def edit_success(predictions, identity, attribute, wanted):
    return float(np.mean([label == wanted for label in predictions[attribute]]))
""",
    "mean_cosine_similarity": """
def mean_cosine_similarity(images, references):
    return (images @ references.T).mean(dim=-1)
""",
    "bootstrap_interval": """
import numpy as np
def bootstrap_interval(values, confidence=0.95, resamples=10_000, seed=0):
    values = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = np.array([values[rng.permutation(len(values))].mean() for _ in range(resamples)])
    tail = (1 - confidence) / 2 * 100
    return [float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail))]
""",
}
