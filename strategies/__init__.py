"""The strategies, as Avalanche-compatible plugins (one file each); imported lazily by name."""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "GradientMixingPlugin": "strategies.gradient_mixing",
    "DynamicLossWeightingPlugin": "strategies.dynamic_loss_weighting",
    "PseudoLabelDistillationPlugin": "strategies.pseudo_label_distillation",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'strategies' has no attribute {name!r}")
