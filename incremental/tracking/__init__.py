"""Experiment tracking: what a run records while it trains (CSV, TensorBoard, Weights & Biases).

A runner makes these calls (see ``docs/tracking.md``)::

    tracker = build_tracker(cfg.logging, out_dir, trainer, config=asdict(cfg), experiences_done=start)
    with tracker:
        for i in range(start, n_experiences):
            ...train experience i, evaluate the test stream into ``results``...
            tracker.log_eval(i, results, accuracy_matrix)

``build_tracker`` adds the :class:`Tracker` plugin to the trainer (only on the main process of a
data-parallel run, and only when some logger is on). The shared run skeleton
(:func:`incremental.runners.base.execute`) makes these calls for every family on it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from .config import EXTRAS, LoggingConfig, WandbConfig, require_extra
from .names import eval_metrics, exp_metric
from .tracker import IterationLog, Logger, Tracker


def build_loggers(cfg: LoggingConfig, out_dir: str | Path, *, config: Mapping[str, Any] | None = None,
                  experiences_done: int = 0, resume_iteration: int = 0,
                  n_experiences: int | None = None) -> list[Logger]:
    """The loggers ``cfg`` asks for, writing under ``out_dir``.

    ``experiences_done`` / ``resume_iteration``: where a resumed run restarts (0 / 0: a fresh run, whose
    old logs in ``out_dir`` are replaced). A logger whose package is missing raises a one-line
    :class:`~incremental.config.ConfigError` naming the extra, before any file is touched.
    """
    if cfg.tensorboard:
        require_extra("tensorboard", "logging.tensorboard")
    wandb_on = cfg.wandb is not None and cfg.wandb.mode != "disabled"
    if wandb_on:
        require_extra("wandb", "logging.wandb")
    out = Path(out_dir)
    resume = experiences_done > 0
    loggers: list[Logger] = []
    if cfg.csv:
        from .csv_logger import CSVLogger

        loggers.append(CSVLogger(out / "logs", experiences_done if resume else None))
    if cfg.tensorboard:
        from .tensorboard_logger import TensorBoardLogger

        loggers.append(TensorBoardLogger(out / "tb", purge_step=resume_iteration if resume else None,
                                         n_experiences=n_experiences))
    if wandb_on:
        from .wandb_logger import WandbLogger

        loggers.append(WandbLogger(cfg.wandb, out, config=config, resume=resume, n_experiences=n_experiences))
    return loggers


def build_tracker(cfg: LoggingConfig, out_dir: str | Path, trainer: Any = None, *,
                  config: Mapping[str, Any] | None = None, experiences_done: int = 0,
                  n_experiences: int | None = None, metric: str = "Top1_Acc") -> Tracker:
    """A :class:`Tracker` over the loggers ``cfg`` asks for, added to ``trainer``'s plugins.

    Call it after restoring a checkpoint (``experiences_done`` experiences done; the trainer's clock
    then says which iteration the resumed run starts from) and before training. ``trainer``: a loop
    with ``add_plugin`` (anything else is left alone: add the tracker to the plugins of the loop you
    build later). ``metric``: Avalanche's name of the evaluated metric (``Top1_Acc``). On the non-main
    processes of a data-parallel run it returns a tracker with no loggers and adds nothing.
    """
    from ..distributed import is_main_process

    if not is_main_process():
        return Tracker([], metric=metric)
    clock = getattr(trainer, "clock", None)
    loggers = build_loggers(cfg, out_dir, config=config, experiences_done=experiences_done,
                            resume_iteration=int(getattr(clock, "train_iterations", 0)),
                            n_experiences=n_experiences)
    tracker = Tracker(loggers, strategy=trainer, metric=metric)
    if loggers and callable(getattr(trainer, "add_plugin", None)):
        trainer.add_plugin(tracker)
    return tracker


__all__ = [
    "EXTRAS", "IterationLog", "Logger", "LoggingConfig", "Tracker", "WandbConfig", "build_loggers", "build_tracker",
    "eval_metrics", "exp_metric", "require_extra",
]
