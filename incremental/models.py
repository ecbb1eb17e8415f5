"""Classifier models with heads that grow when an experience brings new classes.

Growing keeps the old rows of the output layer untouched, so a deployed model's knowledge of its
classes is exactly what it was before the update; only the new rows start from fresh initialisation.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


class GrowingClassifier(nn.Module):
    """Linear output layer whose number of classes can only grow (old rows are copied over)."""

    def __init__(self, in_features: int, n_classes: int) -> None:
        super().__init__()
        if n_classes < 1:
            raise ValueError(f"n_classes must be >= 1, got {n_classes}")
        self.in_features = in_features
        self.linear = nn.Linear(in_features, n_classes)

    @property
    def n_classes(self) -> int:
        return self.linear.out_features

    def grow_to(self, n_classes: int) -> bool:
        """Make room for ``n_classes`` outputs; returns True when the layer changed."""
        old = self.linear
        if n_classes <= old.out_features:
            return False
        new = nn.Linear(self.in_features, n_classes).to(old.weight.device, old.weight.dtype)
        with torch.no_grad():
            new.weight[: old.out_features] = old.weight
            new.bias[: old.out_features] = old.bias
        self.linear = new
        return True

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(features)


class MLP(nn.Module):
    """Multilayer perceptron on flattened inputs: in -> hidden (x layers) -> classes."""

    def __init__(self, input_size: int = 64, hidden_size: int = 256, n_classes: int = 10,
                 hidden_layers: int = 1, dropout: float = 0.0) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = input_size
        for _ in range(hidden_layers):
            layers += [nn.Linear(width, hidden_size), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = hidden_size
        self.features = nn.Sequential(*layers)
        self.classifier = GrowingClassifier(width, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class SmallConvNet(nn.Module):
    """Two conv blocks and a growing classifier, for small images (8x8 digits up to 32x32)."""

    def __init__(self, in_channels: int = 1, image_size: int = 8, channels: int = 32,
                 n_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, channels, 3, padding=1), nn.ReLU(),
            nn.Conv2d(channels, channels * 2, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
        )
        side = image_size // 2
        self.classifier = GrowingClassifier(channels * 2 * side * side, n_classes)
        self.in_channels = in_channels
        self.image_size = image_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:  # flat pixels (digits are stored as 64 features)
            x = x.view(-1, self.in_channels, self.image_size, self.image_size)
        return self.classifier(self.features(x))


MODELS: dict[str, type[nn.Module]] = {"mlp": MLP, "convnet": SmallConvNet}


def build_model(name: str, **kwargs: Any) -> nn.Module:
    """A classifier by architecture name, as stored in model packages and configs."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {sorted(MODELS)}")
    return MODELS[name](**kwargs)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


