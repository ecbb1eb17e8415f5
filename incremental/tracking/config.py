"""The ``logging:`` section of a run config, and the check that a requested logger is installed.

TensorBoard and Weights & Biases are optional dependencies (extras); asking for one that is not
installed is a one-line :class:`~incremental.config.ConfigError` naming the extra, raised when the
config is loaded, before anything is trained or written.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Literal

from ..config import ConfigError, check

#: logger -> (module it imports, extra that installs it)
EXTRAS: dict[str, tuple[str, str]] = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
}


def is_installed(module: str) -> bool:
    """Whether ``module`` can be imported (found on the path; nothing is imported)."""
    return importlib.util.find_spec(module) is not None


def require_extra(logger: str, key: str) -> None:
    """Raise a one-line ConfigError for ``key`` when ``logger``'s package is not installed."""
    module, extra = EXTRAS[logger]
    if not is_installed(module):
        raise ConfigError(key, f"needs the {module!r} package, which is not installed: "
                               f"pip install 'incremental-adapt[{extra}]'")


@dataclass
class WandbConfig:
    """``logging.wandb``: a Weights & Biases run per training run (``mode: offline`` needs no network).

    ``log_every_n_steps``: per-iteration values are sent as the mean over windows of this many
    iterations. Why not every iteration: one ``wandb.log`` call costs about a millisecond of host time
    (measured in ``benchmarks/loop_overhead.py``), more than a quickstart iteration itself. The CSV and
    TensorBoard logs keep every iteration.
    """

    project: str = "incremental-adapt"
    mode: Literal["online", "offline", "disabled"] = "online"
    entity: str | None = None
    log_every_n_steps: int = 25

    def validate(self) -> None:
        check(bool(self.project), "logging.wandb.project", "must be a non-empty name")
        check(self.log_every_n_steps >= 1, "logging.wandb.log_every_n_steps",
              f"must be >= 1, got {self.log_every_n_steps}")


@dataclass
class LoggingConfig:
    """``logging.*``: what a run records while it trains, under its output directory.

    - ``csv`` (default on): ``logs/iterations.csv`` (loss, loss terms and weights, plugin statistics per
      iteration), ``logs/epochs.csv`` and ``logs/eval.csv`` (Avalanche's metric names per experience);
    - ``tensorboard``: event files in ``tb/`` (extra ``tensorboard``);
    - ``wandb``: ``{project, mode, entity, log_every_n_steps}`` (extra ``wandb``), or null for none.
    """

    csv: bool = True
    tensorboard: bool = False
    wandb: WandbConfig | None = None

    def validate(self) -> None:
        if self.tensorboard:
            require_extra("tensorboard", "logging.tensorboard")
        if self.wandb is not None and self.wandb.mode != "disabled":
            require_extra("wandb", "logging.wandb")
