"""A Weights & Biases run per training run (extra ``wandb``); ``mode: offline`` writes
``DIR/wandb/offline-run-*`` with no network (``wandb sync`` uploads it later).

Per-iteration values go as means over windows of ``log_every_n_steps`` iterations (one ``wandb.log``
costs about 1 ms of host time, measured), with each epoch's summary in the call of its last window (at
the epoch's last iteration); per-experience histograms of the gradient-mixing similarity, Avalanche's
eval metrics and the accuracy matrix image go as they come. W&B drops a step lower than one already
logged, so rows are held back and sent in step order. The run id is kept in ``DIR/wandb_run_id`` so that
``incremental run --resume`` continues the same W&B run (steps a resumed run logs again are below W&B's
last step and dropped by W&B: the killed run's values stay).
"""
from __future__ import annotations

import math
import uuid
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..io import write_text
from .config import WandbConfig
from .images import matrix_image
from .tracker import IterationLog, Logger


class WandbLogger(Logger):
    def __init__(self, cfg: WandbConfig, run_dir: str | Path, config: Mapping[str, Any] | None = None,
                 resume: bool = False, n_experiences: int | None = None) -> None:
        import wandb

        self._wandb = wandb
        run_dir = Path(run_dir)
        id_file = run_dir / "wandb_run_id"
        run_id = id_file.read_text().strip() if resume and id_file.is_file() else uuid.uuid4().hex[:8]
        write_text(id_file, run_id + "\n")
        self.run = wandb.init(
            project=cfg.project, entity=cfg.entity, mode=cfg.mode, dir=str(run_dir), name=run_dir.name,
            id=run_id, resume="allow", config=dict(config or {}),
            settings=wandb.Settings(silent=True, console="off"),
        )
        self.every = cfg.log_every_n_steps
        self.n_experiences = n_experiences
        self._window: dict[str, list[float]] = {}
        self._window_id: int | None = None
        self._last_step = 0
        self._held: list[tuple[IterationLog, int]] = []  # rows not sent yet, and where each block resumes

    def _send_window(self, step: int, extra: Mapping[str, Any] | None = None) -> None:
        means: dict[str, Any] = dict(extra or {})
        for key, values in self._window.items():
            finite = [v for v in values if v == v]
            if finite and key not in means:
                means[key] = sum(finite) / len(finite)
        if means:
            self.run.log(means, step=step)
        self._window = {}

    def _send_until(self, limit: float) -> None:
        """Put the held-back rows with a step below ``limit`` into windows, sending each full window."""
        while self._held:
            log, row = self._held[0]
            while row < len(log) and log.iteration[row] < limit:
                step = log.iteration[row]
                window = step // self.every
                if self._window_id is not None and window != self._window_id:
                    self._send_window(self._last_step)
                self._window_id, self._last_step = window, step
                for key, column in log.values.items():
                    self._window.setdefault(key, []).append(column[row])
                row += 1
            if row < len(log):
                self._held[0] = (log, row)
                return
            self._held.pop(0)

    def log_iterations(self, log: IterationLog) -> None:
        self._held.append((log, 0))  # sent in step order, around the epoch summaries that follow

    def log_epoch(self, iteration: int, experience: int, epoch: int, values: Mapping[str, float]) -> None:
        self._send_until(iteration)
        self._send_window(iteration - 1, values)  # one call: the epoch's last window and its summary

    def log_histograms(self, iteration: int, experience: int, distributions: Mapping[str, Sequence[float]]) -> None:
        self._send_until(iteration)
        payload = {f"{key}_histogram": self._wandb.Histogram(np.asarray(data, dtype=np.float64))
                   for key, data in distributions.items() if data}
        if payload:
            self.run.log(payload, step=iteration)

    def flush(self) -> None:
        self._send_until(math.inf)

    def log_eval(self, iteration: int, experience: int, values: Mapping[str, float],
                 accuracy_matrix: Sequence[Sequence[float]] | None) -> None:
        self._send_until(math.inf)
        self._send_window(iteration - 1)
        payload: dict[str, Any] = dict(values)
        if accuracy_matrix:
            payload["accuracy_matrix"] = self._wandb.Image(matrix_image(accuracy_matrix, self.n_experiences),
                                                           caption=f"after experience {experience}")
        self.run.log(payload, step=iteration)

    def close(self) -> None:
        self._send_until(math.inf)
        self._send_window(self._last_step)
        self.run.finish()
