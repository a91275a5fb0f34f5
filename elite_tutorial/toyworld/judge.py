"""The toy judge: attribute classifiers trained on rendered ground truth, used only for evaluation.

One small CNN with a head per attribute (shape, colour, pattern, size, position, background) reads a
64 x 64 image of a single-object scene. Because the world is rendered, its labels are exact, so the
judge turns "does this generated image show a large red star on the left?" into accuracies.

`ResidualReader` is a second reader of the same attributes with another architecture (residual blocks,
BatchNorm, max-pooling), trained on its own scenes with its own seed, to check the judge's readings of
generated images (`elite_tutorial.studies.judge_check`). Both share `AttributeReader.predict`.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..storage import SafetensorsHubMixin
from .render import ATTRIBUTES, images_to_tensor


class AttributeReader(nn.Module, SafetensorsHubMixin):
    """A model that maps images (batch, 3, 64, 64) in [0, 1] to {attribute: logits (batch, classes)}, one
    head per attribute of `ATTRIBUTES`; `predict` turns its logits into attribute names."""

    @torch.no_grad()
    def predict(self, images: np.ndarray | torch.Tensor, batch_size: int = 256) -> dict[str, list[str]]:
        """Attribute names per image. images: (n, 64, 64, 3) uint8 or (n, 3, 64, 64) floats in [0, 1]."""
        if isinstance(images, np.ndarray):
            images = images_to_tensor(images)
        device = next(self.parameters()).device
        was_training = self.training
        self.eval()  # BatchNorm reads its running statistics, whatever mode the caller left the model in
        predictions: dict[str, list[str]] = {name: [] for name in ATTRIBUTES}
        for start in range(0, len(images), batch_size):
            logits = self(images[start:start + batch_size].to(device))
            for name, values in ATTRIBUTES.items():
                predictions[name] += [values[i] for i in logits[name].argmax(-1).tolist()]
        self.train(was_training)
        return predictions


class ToyJudge(AttributeReader):
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


class _ResidualBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus a 1 x 1 projected shortcut, then ReLU and a 2 x 2 max-pool."""

    def __init__(self, channels: int, out: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(channels, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU(),
                                  nn.Conv2d(out, out, 3, padding=1, bias=False), nn.BatchNorm2d(out))
        self.shortcut = nn.Sequential(nn.Conv2d(channels, out, 1, bias=False), nn.BatchNorm2d(out))
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(torch.relu(self.body(x) + self.shortcut(x)))


class ResidualReader(AttributeReader):
    """The second reader: images (batch, 3, 64, 64) in [0, 1] -> {attribute: logits (batch, classes)}.

    Unlike `ToyJudge` (strided convolutions, GroupNorm, SiLU), it downsamples by max-pooling and
    normalises with BatchNorm: a strided stem conv (64 -> 32), three residual blocks each ending in a
    max-pool (32 -> 16 -> 8 -> 4), then one linear head per attribute on the flattened 4 x 4 map (the
    map keeps where the object is, which position and size need)."""

    def __init__(self, width: int = 24):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        widths = (width, 2 * width, 2 * width, 3 * width)
        self.blocks = nn.Sequential(*(_ResidualBlock(a, b) for a, b in zip(widths, widths[1:])))
        self.heads = nn.ModuleDict({name: nn.Linear(widths[-1] * 16, len(values)) for name, values in ATTRIBUTES.items()})

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.blocks(self.stem(images * 2 - 1)).flatten(1)
        return {name: head(features) for name, head in self.heads.items()}


def label_indices(labels: list[dict[str, str]]) -> dict[str, torch.Tensor]:
    """Class indices per attribute for a list of `SceneSpec.labels()` dicts."""
    return {name: torch.tensor([values.index(label[name]) for label in labels]) for name, values in ATTRIBUTES.items()}


def accuracy(judge: AttributeReader, images: np.ndarray, labels: list[dict[str, str]]) -> dict[str, float]:
    """Per-attribute accuracy on images whose true labels are known (attributes missing from a
    label dict are not scored)."""
    predicted = judge.predict(images)
    scores = {}
    for name in ATTRIBUTES:
        pairs = [(p, label[name]) for p, label in zip(predicted[name], labels) if name in label]
        if pairs:
            scores[name] = float(np.mean([p == t for p, t in pairs]))
    return scores
