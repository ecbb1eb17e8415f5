"""Configuration and helpers every runner shares."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from ..config import check


@dataclass
class TrainConfig:
    """``train.*``: optimisation and execution settings; runners subclass it for their defaults."""

    epochs: int = 10
    batch_size: int = 32
    lr: float = 0.1
    optimizer: Literal["sgd", "adam"] = "sgd"
    momentum: float = 0.0
    weight_decay: float = 0.0
    eval_batch_size: int = 512
    device: str = "cpu"
    threads: int | None = 1
    amp: bool = False
    num_workers: int = 0  # DataLoader worker processes for data read lazily (0: in the main process)
    grad_clip: float | None = None  # clip the gradient's total norm to this before each step (null: off)

    def validate(self) -> None:
        check(self.epochs >= 1, "train.epochs", f"must be >= 1, got {self.epochs}")
        check(self.batch_size >= 1, "train.batch_size", f"must be >= 1, got {self.batch_size}")
        check(self.lr > 0, "train.lr", f"must be > 0, got {self.lr}")
        check(self.eval_batch_size >= 1, "train.eval_batch_size", "must be >= 1")
        check(self.threads is None or self.threads >= 1, "train.threads", "must be >= 1 or null")
        check(self.num_workers >= 0, "train.num_workers", f"must be >= 0, got {self.num_workers}")
        check(self.grad_clip is None or (math.isfinite(self.grad_clip) and self.grad_clip > 0), "train.grad_clip",
              f"must be a number > 0 or null, got {self.grad_clip}")
        check(self.device == "auto" or self.device.split(":")[0] in ("cpu", "cuda"), "train.device",
              f"must be auto, cpu, cuda or cuda:N, got {self.device!r}")


def make_optimizer(cfg: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
