"""Transfer runs (``scenario.name``: ``digits_transfer``, ``fashion_transfer``): train the meta model, then adapt it.

Step 0 trains the meta model on the general scene (the history library, if the strategy has one, is
filled from it at the end of that step, by the configured storage policy). Step 1 adapts the model on the
few labelled transfer-scene images with the configured strategy. After each step both test sets are
evaluated, so the results carry accuracy on both scenes before and after adaptation.

The meta-training step is identical for every strategy with the same seed (no history exists yet, so
replay and gradient mixing have nothing to add), which is what makes the strategies comparable.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import ConfigError, check
from ..distributed import resolve_device
from ..metrics import format_matrix, summarize
from ..plots import bar_chart
from ..scenarios.digits_transfer import GENERAL, TRANSFER, digits_transfer
from ..scenarios.fashion_transfer import fashion_transfer
from ..trainer import Trainer
from .base import Run, RunConfig, execute
from .classification import ModelConfig, TrainConfig, build_classifier, make_optimizer
from .classification import legacy as classification_legacy


#: Transfer scenarios by ``scenario.name``.
SCENARIOS = ("digits_transfer", "fashion_transfer")


@dataclass
class TransferScenarioConfig:
    name: str = "digits_transfer"
    shots: int = 10
    test_fraction: float = 0.3  # digits_transfer: held-out share of load_digits
    invert: bool | None = None  # None: True on digits_transfer, False on fashion_transfer
    rotation: float = 90.0
    noise_std: float | None = None  # None: 0.2 on digits_transfer, 0 on fashion_transfer
    blur_sigma: float | None = None  # fashion_transfer only: Gaussian blur in pixels (None: 1.0)
    root: str | None = None  # fashion_transfer: folder of the IDX files (default: Debian's)

    def validate(self) -> None:
        # 1797 digits, ~180 per class; the smallest class has >= 120 training images at test_fraction 0.3.
        check(1 <= self.shots <= 100, "scenario.shots", f"must be between 1 and 100 images per class, got {self.shots}")
        check(0.0 < self.test_fraction < 1.0, "scenario.test_fraction", f"must be in (0, 1), got {self.test_fraction}")
        digits = self.name == "digits_transfer"
        for key, on_digits, on_fashion in (("invert", True, False), ("noise_std", 0.2, 0.0), ("blur_sigma", 0.0, 1.0)):
            if getattr(self, key) is None:  # each scene's own default
                setattr(self, key, on_digits if digits else on_fashion)
        check(self.noise_std >= 0.0, "scenario.noise_std", f"must be >= 0, got {self.noise_std}")
        check(self.blur_sigma >= 0.0, "scenario.blur_sigma", f"must be >= 0, got {self.blur_sigma}")
        check(not digits or self.blur_sigma == 0.0, "scenario.blur_sigma", "digits_transfer has no blur")


@dataclass
class GeneralConfig:
    """How the meta model is trained on the general scene (step 0)."""

    epochs: int = 10
    batch_size: int = 32
    lr: float = 0.1

    def validate(self) -> None:
        check(self.epochs >= 1, "general.epochs", f"must be >= 1, got {self.epochs}")
        check(self.batch_size >= 1, "general.batch_size", f"must be >= 1, got {self.batch_size}")
        check(self.lr > 0, "general.lr", f"must be > 0, got {self.lr}")


@dataclass
class Config(RunConfig):
    scenario: TransferScenarioConfig = field(default_factory=TransferScenarioConfig)
    general: GeneralConfig = field(default_factory=GeneralConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=200, lr=0.1))
    model: ModelConfig = field(default_factory=ModelConfig)

    def validate(self) -> None:
        check(self.scenario.name in SCENARIOS, "scenario.name", f"this runner handles {', '.join(SCENARIOS)}")
        check(self.strategy.regime == "incremental", "strategy.regime",
              "a transfer run adapts one model to one new scene; cumulative and joint do not apply")
        check(not self.model.growing_head, "model.growing_head", "both scenes have all 10 classes; use a fixed head")


legacy = classification_legacy  # the old strategy names of transfer configs are the classifiers' ones


class TransferRun(Run):
    """The two steps of a transfer run, checkpointable between them."""

    n_steps = 2
    n_experiences = 2

    def __init__(self, cfg: Config, out_dir: Path | str = ".", progress: bool = False) -> None:
        super().__init__(cfg, out_dir, progress)
        s = cfg.scenario
        try:
            if s.name == "fashion_transfer":
                self.scenario = fashion_transfer(s.shots, root=s.root, invert=s.invert, rotation=s.rotation,
                                                 blur_sigma=s.blur_sigma, noise_std=s.noise_std, seed=cfg.seed)
            else:
                self.scenario = digits_transfer(s.shots, test_fraction=s.test_fraction, invert=s.invert,
                                                rotation=s.rotation, noise_std=s.noise_std, seed=cfg.seed)
        except ValueError as exc:  # e.g. more shots than a class has training images
            raise ConfigError("scenario.shots", str(exc)) from None
        self.model = build_classifier(cfg.model, self.scenario.n_classes, self.scenario.input_shape)
        plugins, history = self.make_plugins(), self.make_history()
        g = cfg.general
        general_opt = make_optimizer(dataclasses.replace(cfg.train, lr=g.lr), self.model)
        self.trainer = Trainer(
            self.model, general_opt, torch.nn.CrossEntropyLoss(),
            train_mb_size=g.batch_size, train_epochs=g.epochs, eval_mb_size=cfg.train.eval_batch_size,
            device=resolve_device(cfg.train.device), plugins=plugins, history=history,
            history_mb_size=cfg.strategy.history.batch_size, seed=cfg.seed, progress=progress, amp=cfg.train.amp,
            grad_clip=cfg.train.grad_clip,
        )
        self.step_time_s: list[float] = []

    def step(self, i: int) -> list[float]:
        """Step 0: meta-train on the general scene. Step 1: adapt on the transfer scene."""
        start = time.perf_counter()
        trainer, cfg = self.trainer, self.cfg
        if i == GENERAL:
            trainer.train(self.scenario.general_train)
        elif i == TRANSFER:
            trainer.train_mb_size = cfg.train.batch_size
            trainer.train_epochs = cfg.train.epochs
            trainer.optimizer = make_optimizer(cfg.train, trainer.model)  # a fresh optimizer for the new scene
            trainer.train(self.scenario.transfer_train)
        else:
            raise IndexError(f"a transfer run has steps 0 and 1, got {i}")
        elapsed = time.perf_counter() - start
        self.step_time_s.append(elapsed)
        results = trainer.eval(self.scenario.test_stream)
        # on the scene just learned (step i trains scene i): before adaptation the meta model may well answer
        # one class for the whole shifted scene without anything having gone wrong
        self.refuse_collapse(i, results[i])
        row = [results[GENERAL]["accuracy"], results[TRANSFER]["accuracy"]]
        self.accuracy_matrix.append(row)
        self.train_time_s += time.perf_counter() - start
        return row

    def gradient_plugin(self) -> Any:
        return next((p for p in self.plugins if hasattr(p, "summary") and hasattr(p, "plot_stats")), None)

    def report(self, results: dict[str, Any]) -> str:
        return (format_matrix(results["accuracy_matrix"], row_label="after step", col_label="scene")
                + "\n(step 0 = general scene (meta model), step 1 = transfer scene (adaptation); "
                  "scene 0 = general, 1 = transfer)")

    def plots(self, out_dir: Path) -> None:
        results = self.results()
        names = "+".join(self.cfg.strategy.names()) or "fine-tuning"
        bar_chart({"general scene": results["general_accuracy"], "transfer scene": results["transfer_accuracy"]},
                  out_dir / "accuracy_before_after.png", ylabel="accuracy",
                  title=f"{names}, {self.cfg.scenario.shots} shots")
        plugin = self.gradient_plugin()
        if plugin is not None:
            plugin.plot_stats(out_dir)

    def results(self) -> dict[str, Any]:
        R = self.accuracy_matrix
        before, after = R[0], R[-1]
        out: dict[str, Any] = {
            "general_accuracy": {"before": before[GENERAL], "after": after[GENERAL]},
            "transfer_accuracy": {"before": before[TRANSFER], "after": after[TRANSFER]},
            "general_drop": before[GENERAL] - after[GENERAL],
            "transfer_gain": after[TRANSFER] - before[TRANSFER],
            "accuracy_matrix": R,
            **summarize(R),
            "scene_names": ["general", "transfer"],
            "shift": self.scenario.shift,
            "train_eval_time_s": self.train_time_s,
            "adaptation_time_s": self.step_time_s[-1] if len(self.step_time_s) == 2 else None,
        }
        plugin = self.gradient_plugin()
        if plugin is not None:
            out["gradient_stats"] = {str(k): v for k, v in plugin.summary().items()}
        return out


def run(cfg: Config, out_dir: Path, *, progress: bool = False, resume: bool = False) -> dict[str, Any]:
    return execute(TransferRun(cfg, out_dir, progress), out_dir, resume=resume)
