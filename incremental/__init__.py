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
    "make_policy", "register_policy", "class_quotas", "seed_everything", "package_model", "__version__",
]


def package_model(*args, **kwargs):  # noqa: ANN002, ANN003 - the signature is importing.package_model's
    """Write a model trained elsewhere as a model package (see :func:`incremental.importing.package_model`);
    imported on first use, so ``import incremental`` does not load torchvision."""
    from .importing import package_model as _package_model

    return _package_model(*args, **kwargs)
