"""Chapter 05's exercises: the figures of the main table, from the judge's readings and the embeddings
to the intervals over concepts.

Each check calls the student's function on inputs of its own (fixed seed) and compares it with what
`evaluation` and `metrics` compute; see `feedback` for what a failure says."""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from transformers import CLIPModel

from .. import evaluation
from ..components import ASSETS_DIR
from ..data import clip_normalise
from ..metrics import MetricModels, _pixels, clip_i, projected_features
from ..toyworld.concepts import CONCEPTS, concept_views
from ..toyworld.render import ATTRIBUTES
from .feedback import attempt, expect, expect_close, passed


def _readings(identity: dict[str, str], images: int, right: float, seed: int) -> dict[str, list[str]]:
    """Judge-like readings of `images` images, {attribute: [label per image]}, all six attributes: each
    identity attribute is read as the concept's with probability `right`, else as another label."""
    rng = np.random.default_rng(seed)
    readings = {}
    for name, values in ATTRIBUTES.items():
        if name in identity:
            others = [v for v in values if v != identity[name]]
            readings[name] = [identity[name] if rng.random() < right else str(rng.choice(others)) for _ in range(images)]
        else:
            readings[name] = [str(rng.choice(values)) for _ in range(images)]
    return readings


def _identity(seed: int) -> dict[str, str]:
    rng = np.random.default_rng(seed)
    return {name: str(rng.choice(ATTRIBUTES[name])) for name in evaluation.IDENTITY}


def _kept(readings: dict[str, list[str]], identity: dict[str, str]) -> np.ndarray:
    """How many of the identity attributes each image keeps, (n,)."""
    return np.sum([[p == identity[name] for p in readings[name]] for name in evaluation.IDENTITY], axis=0)


def _matches(got, value: float, unless: float) -> bool:
    """Whether the student's `got` is the single number `value` (a typical mistake's), where that differs from `unless`."""
    try:
        number = np.asarray(got, dtype=np.float64)
    except (TypeError, ValueError, RuntimeError):
        return False
    return number.size == 1 and bool(np.isclose(float(number), value)) and not bool(np.isclose(value, unless))


def fidelity(student) -> None:
    """`fidelity(predictions, identity)` -> the mean over images of the fraction of the concept's shape,
    colour and pattern the judge reads right (`evaluation._agreement`, averaged as `score` does)."""
    name = "fidelity"
    for seed in (0, 1, 2):
        identity = _identity(seed)
        readings = _readings(identity, images=8, right=0.6, seed=10 + seed)
        expected = float(evaluation._agreement(readings, identity).mean())
        got = attempt(name, student, {k: list(v) for k, v in readings.items()}, dict(identity))
        all_three = float((_kept(readings, identity) == 3).mean())
        if _matches(got, all_three, unless=expected):
            expect(name, False, f"you return {all_three:.4g}, the share of images with all three attributes right; "
                                f"expected {expected:.4g}.",
                   "an image with the right shape and colour but the wrong pattern is two-thirds faithful, not 0: "
                   "score each image by the fraction of its 3 attributes read right, then average over the images.")
        expect_close(name, got, expected, what=f"the fidelity of case {seed}",
                     hint="for each image, compare predictions[a][i] with identity[a] for a in shape, colour, pattern "
                          "(only those three: the readings also hold size, position and background), take the mean "
                          "of the three, then the mean over the images. Return one number.")
    passed(name, "An image scores 0, 1/3, 2/3 or 1; a concept's fidelity is the mean over its images")


def edit_success(student) -> None:
    """`edit_success(predictions, identity, attribute, wanted)` -> the share of images that show the edit
    and keep at least 2 of the 3 identity attributes (`evaluation.edit_success`)."""
    name = "edit_success"
    for seed, (attribute, (_, wanted)) in enumerate(evaluation.EDITS.items()):
        identity = _identity(20 + seed)
        readings = _readings(identity, images=12, right=0.6, seed=30 + seed)
        rng = np.random.default_rng(40 + seed)  # the edit shows in about two images of three
        others = [v for v in ATTRIBUTES[attribute] if v != wanted]
        readings[attribute] = [wanted if rng.random() < 0.65 else str(rng.choice(others)) for _ in readings[attribute]]
        expected = evaluation.edit_success(readings, identity, attribute, wanted)
        got = attempt(name, student, {k: list(v) for k, v in readings.items()}, dict(identity), attribute, wanted)
        edited = np.array([p == wanted for p in readings[attribute]])
        mistakes = {
            float(edited.mean()): "an image on the left that no longer shows the concept is not an edit of it: count "
                                  "only the images that show the edit AND keep at least 2 of the 3 identity attributes.",
            float((edited & (_kept(readings, identity) == 3)).mean()): "the rule keeps an image that loses one of its "
                                  "three identity attributes (at least 2 of 3, as for a judge that errs now and then).",
        }
        for value, hint in mistakes.items():
            if _matches(got, value, unless=expected):
                expect(name, False, f"for the edit {attribute} = {wanted!r} you return {value:.4g}, expected {expected:.4g}.", hint)
        expect_close(name, got, expected, what=f"the share for the edit {attribute} = {wanted!r}",
                     hint="per image: edited = predictions[attribute][i] == wanted; kept = how many of shape, colour, "
                          "pattern equal identity's; success = edited and kept >= 2. Return the mean of success.")
    passed(name, "Editability is the mean of this share over the three edits")


def bootstrap_interval(student) -> None:
    """`bootstrap_interval(values, confidence, resamples, seed)` -> [low, high], the percentile bootstrap
    interval of the mean, drawn as `evaluation.bootstrap_interval` draws it (which rounds to 3 decimals)."""
    name = "bootstrap_interval"
    values = np.random.default_rng(5).random(12)  # a figure per concept, twelve concepts as in the main table
    for confidence, resamples, seed in ((0.95, 2000, 0), (0.8, 500, 7)):
        expected = evaluation.bootstrap_interval(values, confidence, resamples, seed)
        got = attempt(name, student, values.copy(), confidence, resamples, seed)
        try:
            low, high = (float(v) for v in got)
        except (TypeError, ValueError):
            expect(name, False, f"the result should be two numbers [low, high], got {got!r}.",
                   "return [np.percentile(means, tail), np.percentile(means, 100 - tail)].")
        expect(name, high - low > 1e-9,
               f"your interval [{low:.4g}, {high:.4g}] is a single point; expected {expected}.",
               "resample WITH replacement: each resample draws n indices from 0..n-1 independently, "
               "rng.integers(0, n, size=(resamples, n)); a permutation of all n concepts has the same mean every time.")
        expect_close(name, [low, high], expected, atol=6e-4, rtol=0,  # the package rounds to 3 decimals
                     what=f"[low, high] at confidence {confidence}, {resamples} resamples, seed {seed}",
                     hint="draw the indices exactly as the package does, picks = np.random.default_rng(seed).integers("
                          "0, n, size=(resamples, n)); means = values[picks].mean(axis=1); then the percentiles "
                          "tail = (1 - confidence) / 2 * 100 and 100 - tail of the means.")
    low, high = evaluation.bootstrap_interval(values)
    passed(name, f"Twelve figures with mean {values.mean():.3f} give the 95 % interval [{low:.3f}, {high:.3f}]: "
                 f"twelve concepts pin a mean down to about ±{(high - low) / 2:.2f}")


@lru_cache(maxsize=1)
@torch.no_grad()
def _clip_case() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The toy CLIP's raw image embeddings of six images and of the red dotted heart's four views, and
    `metrics.clip_i` of the images against the views, (6,) (computed once: a few seconds on a CPU)."""
    clip = CLIPModel.from_pretrained(ASSETS_DIR / "toy-eval" / "clip", torch_dtype=torch.float32).eval()
    models = MetricModels(clip, tokenizer=None, clip_size=clip.config.vision_config.image_size, appearance=None,
                          appearance_size=64)
    references = [image for image, _ in concept_views(CONCEPTS[0])]
    images = [image for image, _ in concept_views(CONCEPTS[1])] + references[:2]  # another concept, and two of its own
    raw = [projected_features(clip.get_image_features(pixel_values=clip_normalise(_pixels(group, models.clip_size, "cpu"))))
           for group in (images, references)]  # before normalising
    return raw[0], raw[1], clip_i(models, images, references)


def mean_cosine_similarity(student) -> None:
    """`mean_cosine_similarity(images, references)` -> (n,), each image's mean cosine similarity to the
    references, from raw embeddings (n, d) and (m, d); checked against `metrics.clip_i` on the toy CLIP."""
    name = "mean_cosine_similarity"
    images, references, expected = _clip_case()
    got = attempt(name, student, images.clone(), references.clone())
    unnormalised = (images @ references.T).mean(-1)
    if torch.is_tensor(got) and got.shape == expected.shape:
        expect(name, not torch.allclose(got.double(), unnormalised.double(), rtol=1e-4),
               f"your values reach {float(got.max()):.4g}; a cosine similarity is at most 1.",
               "divide each embedding by its L2 norm first (the toy CLIP's are about 15 long): a dot product of unit "
               "vectors is the cosine of their angle.")
    expect_close(name, got, expected, what="the result (a similarity per image)",
                 hint="normalise the rows of both to unit length, take the (n, m) matrix of dot products "
                      "images @ references.T, and average over the references (the last axis), leaving (n,).")
    passed(name, "CLIP-I reads CLIP's image embeddings so; DINO-I does the same with DINO's (on the toy preset, the judge's features)")
