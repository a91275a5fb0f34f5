"""The toy judge: attribute classifiers trained on rendered ground truth, used only for evaluation.

One small CNN with a head per attribute (shape, colour, pattern, size, position, background) reads a
64 x 64 image of a single-object scene. Because the world is rendered, its labels are exact, so the
judge turns "does this generated image show a large red star on the left?" into accuracies.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..storage import SafetensorsHubMixin
from .render import ATTRIBUTES, images_to_tensor


class ToyJudge(nn.Module, SafetensorsHubMixin):
    """images (batch, 3, 64, 64) in [0, 1] -> {attribute: logits (batch, classes)}."""

    def __init__(self, width: int = 32):
        super().__init__()
        layers, channels = [], 3
        for out in (width, 2 * width, 4 * width, 4 * width):  # 64 -> 32 -> 16 -> 8 -> 4
            layers += [nn.Conv2d(channels, out, 3, stride=2, padding=1), nn.GroupNorm(8, out), nn.SiLU(),
                       nn.Conv2d(out, out, 3, padding=1), nn.GroupNorm(8, out), nn.SiLU()]
            channels = out
        self.features = nn.Sequential(*layers, nn.Flatten())
        self.heads = nn.ModuleDict({name: nn.Linear(channels * 16, len(values)) for name, values in ATTRIBUTES.items()})

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.features(images * 2 - 1)
        return {name: head(features) for name, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, images: np.ndarray | torch.Tensor, batch_size: int = 256) -> dict[str, list[str]]:
        """Attribute names per image. images: (n, 64, 64, 3) uint8 or (n, 3, 64, 64) floats in [0, 1]."""
        if isinstance(images, np.ndarray):
            images = images_to_tensor(images)
        device = next(self.parameters()).device
        predictions: dict[str, list[str]] = {name: [] for name in ATTRIBUTES}
        for start in range(0, len(images), batch_size):
            logits = self(images[start:start + batch_size].to(device))
            for name, values in ATTRIBUTES.items():
                predictions[name] += [values[i] for i in logits[name].argmax(-1).tolist()]
        return predictions


def label_indices(labels: list[dict[str, str]]) -> dict[str, torch.Tensor]:
    """Class indices per attribute for a list of `SceneSpec.labels()` dicts."""
    return {name: torch.tensor([values.index(label[name]) for label in labels]) for name, values in ATTRIBUTES.items()}


def accuracy(judge: ToyJudge, images: np.ndarray, labels: list[dict[str, str]]) -> dict[str, float]:
    """Per-attribute accuracy on images whose true labels are known (attributes missing from a
    label dict are not scored)."""
    predicted = judge.predict(images)
    scores = {}
    for name in ATTRIBUTES:
        pairs = [(p, label[name]) for p, label in zip(predicted[name], labels) if name in label]
        if pairs:
            scores[name] = float(np.mean([p == t for p, t in pairs]))
    return scores
