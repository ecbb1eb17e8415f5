"""Incremental model adaptation: update deployed models with new classes or scenes without forgetting.

Core: the :class:`Trainer` loop with Avalanche-compatible plugins and a shared history library,
scenarios, models, metrics and the ``incremental`` CLI. The strategies live in the ``strategies``
package.
"""
from .buffer import HistoryLibrary, class_quotas, make_policy, register_policy
from .data import Experience, ListSamples, TensorSamples
from .plugins import Plugin
from .trainer import Clock, Trainer, seed_everything

__version__ = "0.1.0"

__all__ = [
    "Trainer", "Clock", "Plugin", "HistoryLibrary", "Experience", "TensorSamples", "ListSamples",
    "make_policy", "register_policy", "class_quotas", "seed_everything", "__version__",
]
