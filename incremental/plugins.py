"""The plugin protocol shared by this project's loop and Avalanche's templates.

A plugin is any object with some of the callbacks below; both loops call them by name as
``callback(strategy, **kwargs)``. The names, their order and the strategy attributes they see are
Avalanche's ``SupervisedPlugin`` ones, so a plugin written for either loop runs in the other. The base
class is defined here instead of importing Avalanche's so that ``import incremental`` stays fast and
does not pull in Avalanche's dependency tree; Avalanche's template only needs the names.
"""
from __future__ import annotations

from typing import Any

#: Training callbacks in the order the loop fires them (per experience / epoch / iteration).
TRAINING_CALLBACKS: tuple[str, ...] = (
    "before_training",
    "before_train_dataset_adaptation",
    "after_train_dataset_adaptation",
    "before_training_exp",
    "before_training_epoch",
    "before_training_iteration",
    "before_forward",
    "after_forward",
    "before_backward",
    "after_backward",
    "before_update",
    "after_update",
    "after_training_iteration",
    "after_training_epoch",
    "after_training_exp",
    "after_training",
)

#: Evaluation callbacks, same convention.
EVAL_CALLBACKS: tuple[str, ...] = (
    "before_eval",
    "before_eval_dataset_adaptation",
    "after_eval_dataset_adaptation",
    "before_eval_exp",
    "before_eval_iteration",
    "before_eval_forward",
    "after_eval_forward",
    "after_eval_iteration",
    "after_eval_exp",
    "after_eval",
)

ALL_CALLBACKS: tuple[str, ...] = TRAINING_CALLBACKS + EVAL_CALLBACKS


class Plugin:
    """No-op implementation of every callback; subclasses override the ones they need.

    ``supports_distributed`` mirrors Avalanche's attribute of the same name.
    """

    supports_distributed: bool = False

    def __init__(self) -> None:
        pass

    def __getattr__(self, name: str) -> Any:  # pragma: no cover - only for clear errors
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")


def _noop(self: Plugin, strategy: Any, *args: Any, **kwargs: Any) -> None:
    return None


for _name in ALL_CALLBACKS:
    setattr(Plugin, _name, _noop)
del _name


def overrides(plugin: Any, callback: str) -> bool:
    """True when ``plugin`` does real work in ``callback`` (so the loop can skip no-op dispatch).

    Avalanche plugins inherit no-op methods from ``BasePlugin``; both those and ours are detected by
    comparing the function object with the one on the respective base class.
    """
    method = getattr(type(plugin), callback, None)
    if method is None:
        return False
    if method is _noop:
        return False
    qual = getattr(method, "__qualname__", "")
    # Avalanche's BasePlugin/SupervisedPlugin define their no-ops on those classes.
    return not qual.startswith(("BasePlugin.", "BaseSGDPlugin.", "SupervisedPlugin.", "Plugin."))
