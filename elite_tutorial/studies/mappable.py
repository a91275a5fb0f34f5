"""Gate 3, mappable: can a fitted map write the word of an object it has never seen?

ELITE's global mapper turns what the image encoder reads of an object into a word at S. Before any
mapper is trained by the diffusion loss, this gate asks the same of the simplest map that is told the
answer: a ridge regression from the mapper's input features (`encoder.view_features` of the padded
box view) to each object's compound word (`words.compound_embeddings`: the sum of its words'
token embeddings, which a text encoder taught by `compounds.teach_compound_words` reads as the whole
object). It is fitted on scenes of training identities only, then each personal concept's word is
mapped from its first view (the view ELITE's evaluation encodes) and scored by the judge like any
method. If such a map cannot write the held-out concepts' words, no mapper trained by the diffusion
loss will.

    python -m elite_tutorial.studies.compounds teach --components assets/toy-sd --out toy-sd-compound
    python -m elite_tutorial.studies.gates mappable --components toy-sd-compound --encoder toy-image-encoder
"""
from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass

import numpy as np
import torch
from transformers import CLIPVisionModel

from ..components import Components
from ..toyworld.concepts import CONCEPTS, concept_views
from ..toyworld.render import COLOURS, PATTERNS, SHAPES, described
from ..words import compound_embeddings
from .encoder import PROBE_SEED, box_view, mapper_features, probe_specs, view_features

MAP_SEED = PROBE_SEED + 10_000  # the map's training scenes: not the probe's, and no pretraining pool's
ALPHAS = (0.01, 0.1, 1.0, 10.0, 100.0, 1000.0)


@dataclass(frozen=True)
class WordMap:
    """A linear map from features (n, d) to words (n, width): ridge regression on standardised features."""

    mean: torch.Tensor    # (d,) the fitted features' mean
    scale: torch.Tensor   # (d,) and standard deviation
    weight: torch.Tensor  # (d, width)
    bias: torch.Tensor    # (width,) the targets' mean
    alpha: float          # the ridge penalty it was fitted with

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        return ((features.double() - self.mean) / self.scale) @ self.weight + self.bias


def fit_ridge(features: torch.Tensor, targets: torch.Tensor, alpha: float) -> WordMap:
    """The ridge regression of targets (n, width) on standardised features (n, d), in float64."""
    x, y = features.double(), targets.double()
    mean, scale = x.mean(0), x.std(0) + 1e-6
    x = (x - mean) / scale
    weight = torch.linalg.solve(x.T @ x + alpha * torch.eye(x.shape[1], dtype=x.dtype), x.T @ (y - y.mean(0)))
    return WordMap(mean, scale, weight, y.mean(0), alpha)


def _figure(value) -> float:
    """A mean squared error as stored in the results files: four significant digits."""
    return float(f"{float(value):.4g}")


def fit_word_map(features: torch.Tensor, targets: torch.Tensor, alphas=ALPHAS, validation: float = 0.2
                 ) -> tuple[WordMap, dict]:
    """The ridge map with the penalty whose fit on the first rows best predicts the last `validation`
    of them, refitted on all rows; with each penalty's validation mean squared error beside the
    targets' variance per dimension (what a constant word would score)."""
    fit = int(len(features) * (1 - validation))

    def validation_mse(alpha: float) -> float:
        predicted = fit_ridge(features[:fit], targets[:fit], alpha)(features[fit:])
        return float(((predicted - targets[fit:].double()) ** 2).mean())

    errors = {alpha: validation_mse(alpha) for alpha in alphas}
    best = min(errors, key=errors.get)
    report = {"alpha": best, "validation_mse": {str(a): _figure(e) for a, e in errors.items()},
              "target_variance": _figure(targets[fit:].double().var(0).mean())}
    return fit_ridge(features, targets, best), report


def every_identity() -> list[str]:
    """Every identity of the toy world said in words, colour x pattern x shape ('red dotted heart')."""
    return [described({"colour": colour, "pattern": pattern, "shape": shape})
            for colour, pattern, shape in itertools.product(COLOURS, PATTERNS, SHAPES)]


def nearest_identities(components: Components, words: torch.Tensor) -> tuple[list[str], torch.Tensor]:
    """For each word (n, width), the identity whose compound word is nearest and the distance to it
    (n,), leaving out a word's exact match (distance 0): for a compound word, the nearest other identity."""
    phrases = every_identity()
    distances = torch.cdist(words.double(), compound_embeddings(components, phrases).cpu().double())
    nearest = distances.masked_fill(distances < 1e-9, float("inf")).min(dim=1)
    return [phrases[i] for i in nearest.indices.tolist()], nearest.values


def mapped_concept_words(components: Components, image_encoder: CLIPVisionModel, training: int = 6000,
                         concepts=CONCEPTS) -> tuple[torch.Tensor, dict]:
    """Each concept's word (concepts, width), mapped from its first view by a `WordMap` fitted on the
    box views of `training` random single-object scenes of training identities (their compound words
    in `components`' vocabulary); with the fit's report, how far the mapped words are from the
    concepts' own compound words (mean squared error per dimension; each distance, beside the distance
    from the own compound word to the nearest other identity's) and the share of them whose nearest
    compound word is their own identity's."""
    scenes, _ = probe_specs(training=training, per_concept=0, seed=MAP_SEED)
    targets = compound_embeddings(components, [described(asdict(spec.objects[0])) for spec in scenes]).cpu()
    word_map, report = fit_word_map(mapper_features(image_encoder, scenes), targets)
    views = np.stack([box_view(*concept_views(concept)[0]) for concept in concepts])
    words = word_map(view_features(image_encoder, views))
    own = compound_embeddings(components, [concept.description for concept in concepts]).cpu().double()
    report["concept_mse"] = _figure(((words - own) ** 2).mean())
    named, _ = nearest_identities(components, words)
    report["nearest_is_own_identity"] = sum(name == concept.description for name, concept in zip(named, concepts)) / len(concepts)
    report["distance_to_own"] = [_figure(distance) for distance in (words - own).norm(dim=1)]
    report["own_to_nearest_other"] = [_figure(distance) for distance in nearest_identities(components, own)[1]]
    report["scenes_fitted"] = training
    return words.float(), report
