"""Class-incremental classification: users' data (``class_incremental``) and the named benchmarks
(``split_digits``, ``split_mnist``, ``split_fashion_mnist``, ``split_cifar10``, ``split_cifar100``).

The family's part of the one run path (:mod:`incremental.runners.base`): the scenario
(:mod:`incremental.scenarios.class_incremental`), a classifier with a growing head, cross-entropy as
its one loss term, accuracy on every test experience after each training experience. Strategies are
``strategy.plugins`` (``replay``, ``gradient_mixing``, ``lwf``, ``ewc``, ... or none for fine-tuning);
``strategy.regime: cumulative | joint`` retrains on all data seen so far (joint: from the initial
weights), the upper bounds.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import ConfigError, check
from ..data import Experience
from ..distributed import resolve_device
from ..metrics import format_matrix, summarize
from ..models import MODELS, TORCHVISION_PREFIX, build_model
from ..models import model_kwargs as architecture_kwargs
from ..plots import accuracy_heatmap
from ..scenarios.class_incremental import PRESETS, DataConfig, ScenarioConfig, build_benchmark
from ..trainer import Trainer
from .base import LegacyUpdate, Run, RunConfig, config_from_raw, execute, legacy_history, take, unknown_legacy
from .common import TrainConfig, make_optimizer


@dataclass
class ModelConfig:
    """``model.name``: ``mlp`` (``hidden_layers`` x ``hidden_size``), ``convnet``, ``resnet18_reduced``
    or ``torchvision:<name>`` (``weights``: a local state dict for its backbone)."""

    name: str = "mlp"
    hidden_size: int = 256
    hidden_layers: int = 1
    channels: int = 32
    growing_head: bool = False
    weights: str | None = None

    def validate(self) -> None:
        check(self.name in MODELS or self.name.startswith(TORCHVISION_PREFIX), "model.name",
              f"unknown model {self.name!r}; known: {', '.join(MODELS)}, torchvision:<name>")
        check(self.hidden_size >= 1, "model.hidden_size", "must be >= 1")
        check(self.hidden_layers >= 1, "model.hidden_layers", "must be >= 1")
        check(self.weights is None or self.name.startswith(TORCHVISION_PREFIX), "model.weights",
              "only torchvision:<name> models load a backbone state dict")


@dataclass
class Config(RunConfig):
    scenario: ScenarioConfig = field(default_factory=ScenarioConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    model: ModelConfig = field(default_factory=ModelConfig)

    def validate(self) -> None:
        check(self.scenario.name in PRESETS, "scenario.name", f"this runner handles {', '.join(PRESETS)}")


def legacy(old: dict[str, Any]) -> LegacyUpdate:
    """The classifiers' old ``strategy.name`` (naive, replay, gradient_mixing, lwf, ewc, cumulative,
    joint) and its flat options, in the new form."""
    update = LegacyUpdate(history=legacy_history(old))
    if old.get("name") == "gradient_mixing" and "policy" not in update.history:
        update.history["policy"] = "herding"  # what the old form defaulted to (the measured choice)
    options = {"gradient_mixing": take(old, "rule", "gradient_pass", "logit_weight", "history_weight",
                                                 "history_shift", "logit_adjustment"),
               "lwf": {k.removeprefix("lwf_"): v for k, v in take(old, "lwf_alpha", "lwf_temperature").items()},
               "ewc": take(old, "ewc_lambda")}
    update.options = {k: v for k, v in options.items() if v}
    name = old.pop("name", None)
    unknown_legacy(old)
    if name is None:
        return update
    if name in ("naive", "cumulative", "joint"):
        update.plugins = []
        update.regime = name if name != "naive" else "incremental"
    elif name in ("replay", "gradient_mixing", "lwf", "ewc"):
        update.plugins = [{"name": name}]
    else:
        raise ConfigError("strategy.name", f"unknown strategy {name!r}; known: naive, replay, gradient_mixing, lwf, "
                                           "ewc, cumulative, joint (or use strategy.plugins)")
    return update


def config_from(raw: dict[str, Any]) -> Config:
    """A typed config from a raw dict, old strategy names translated (the benchmarks build theirs so)."""
    return config_from_raw(Config, raw, legacy, quiet=True)


def model_kwargs(cfg: ModelConfig, n_classes: int, input_shape: tuple[int, ...] = (64,)) -> dict[str, Any]:
    """Constructor arguments of the configured model for inputs of ``input_shape``."""
    try:
        return architecture_kwargs(cfg.name, input_shape, n_classes, hidden_size=cfg.hidden_size,
                                   hidden_layers=cfg.hidden_layers, channels=cfg.channels, weights=cfg.weights)
    except ValueError as exc:
        raise ConfigError("", str(exc)) from None


def build_classifier(cfg: ModelConfig, n_classes: int, input_shape: tuple[int, ...]) -> torch.nn.Module:
    try:
        return build_model(cfg.name, **model_kwargs(cfg, n_classes, input_shape))
    except ValueError as exc:  # an unknown torchvision name, weights that do not fit
        raise ConfigError("", str(exc)) from None


def union_experience(stream: list[Experience], upto: int) -> Experience:
    """Experiences 0..upto merged into one (for joint and cumulative training)."""
    from torch.utils.data import ConcatDataset

    datasets = [exp.dataset for exp in stream[: upto + 1]]
    if all(hasattr(d, "concat") for d in datasets):
        dataset = datasets[0]
        for other in datasets[1:]:
            dataset = dataset.concat(other)
    else:  # lazily read experiences stay lazy
        dataset = ConcatDataset(datasets)
    classes = sorted(c for exp in stream[: upto + 1] for c in exp.classes_in_this_experience)
    return Experience(dataset, upto, classes, classes_seen_so_far=classes)


class ClassificationRun(Run):
    """Train on each experience with the configured plugins, then evaluate the whole test stream."""

    def __init__(self, cfg: Config, out_dir: Path | str = ".", progress: bool = False) -> None:
        super().__init__(cfg, out_dir, progress)
        self.benchmark = build_benchmark(cfg.scenario, cfg.data, cfg.seed)
        first = self.benchmark.train_stream[0].classes_in_this_experience
        n_out = (max(first) + 1) if cfg.model.growing_head else self.benchmark.n_classes
        self.model = self.new_model(n_out)
        self.initial_state = {k: v.clone() for k, v in self.model.state_dict().items()}
        self.trainer = Trainer(
            self.model, make_optimizer(cfg.train, self.model), torch.nn.CrossEntropyLoss(),
            train_mb_size=cfg.train.batch_size, train_epochs=cfg.train.epochs,
            eval_mb_size=cfg.train.eval_batch_size, device=resolve_device(cfg.train.device),
            plugins=self.make_plugins(), history=self.make_history(),
            history_mb_size=cfg.strategy.history.batch_size, seed=cfg.seed, progress=progress, amp=cfg.train.amp,
            num_workers=cfg.train.num_workers, grad_clip=cfg.train.grad_clip,
        )

    def new_model(self, n_out: int) -> torch.nn.Module:
        return build_classifier(self.cfg.model, n_out, self.benchmark.input_shape)

    def model_kwargs(self, n_out: int) -> dict[str, Any]:
        return model_kwargs(self.cfg.model, n_out, self.benchmark.input_shape)

    @property
    def n_steps(self) -> int:
        return len(self.benchmark.train_stream)

    n_experiences = n_steps

    def step(self, i: int) -> list[float]:
        """Train on experience ``i`` (as the regime dictates) and evaluate the whole test stream."""
        start = time.perf_counter()
        stream = self.benchmark.train_stream
        regime = self.cfg.strategy.regime
        if regime == "joint":
            self._restart_model()
            self.trainer.train(union_experience(stream, i))
        elif regime == "cumulative":
            self.trainer.train(union_experience(stream, i))
        else:
            self.trainer.train(stream[i])
        results = self.last_eval = self.trainer.eval(self.benchmark.test_stream)
        self.refuse_collapse(i, results[i])  # on the classes it has just learned
        row = [results[j]["accuracy"] for j in range(self.n_steps)]
        self.accuracy_matrix.append(row)
        self.train_time_s += time.perf_counter() - start
        return row

    def _restart_model(self) -> None:
        """Joint training retrains from scratch: same initial weights, fresh optimizer."""
        if self.cfg.model.growing_head:
            torch.manual_seed(self.cfg.seed)
            first = self.benchmark.train_stream[0].classes_in_this_experience
            self.trainer.model = self.new_model(max(first) + 1)
        else:
            self.trainer.model.load_state_dict(self.initial_state)
        self.trainer.optimizer = make_optimizer(self.cfg.train, self.trainer.model)

    def results(self) -> dict[str, Any]:
        R = self.accuracy_matrix
        out = {
            "accuracy_matrix": R,
            **summarize(R),
            "class_order": self.benchmark.class_order,
            "classes_per_experience": self.benchmark.classes_per_experience,
            "class_names": self.benchmark.class_names,
            "in_memory": self.benchmark.in_memory,
            "history_bytes": 0 if self.trainer.history is None else self.trainer.history.nbytes,
            "train_eval_time_s": self.train_time_s,
        }
        stats = self.plugin("summary")
        if stats is not None and hasattr(stats, "plot_stats"):
            out["gradient_stats"] = {str(k): v for k, v in stats.summary().items()}
        return out

    def report(self, results: dict[str, Any]) -> str:
        return format_matrix(results["accuracy_matrix"])

    def eval_results(self) -> dict[int, dict[str, float]]:
        return self.last_eval  # accuracy, loss and sample count per test experience

    def save_package(self, path: Path) -> Path:
        """The trained model as a deployable package (with its exemplars, for ``incremental update``)."""
        from ..package import save_model
        from ..update_classifier import classifier_package_extra

        model = self.trainer.model
        n_out = model.classifier.n_classes
        kwargs = {k: v for k, v in self.model_kwargs(n_out).items() if k != "weights"}  # weights are in the package
        names = self.benchmark.class_names
        return save_model(path, model, kind="classifier", architecture=self.cfg.model.name, arch_kwargs=kwargs,
                          class_names=[names[i] if i < len(names) else str(i) for i in range(n_out)],
                          extra=classifier_package_extra(self.trainer.history, self.input_spec()))

    def input_spec(self) -> dict[str, Any]:
        """What the model takes, stored in its package so updates and predictions prepare data alike."""
        shape = self.benchmark.input_shape
        normalize = self.cfg.scenario.transforms.normalize
        spec: dict[str, Any] = {"max_value": 1.0}
        if len(shape) == 1:
            side = int(shape[0] ** 0.5)
            spec.update(channels=1, size=[side, side] if side * side == shape[0] else [1, shape[0]], flat=True)
        else:
            spec.update(channels=int(shape[0]), size=[int(shape[1]), int(shape[2])], flat=False)
        if normalize is not None:
            spec["normalize"] = {"mean": list(normalize.mean), "std": list(normalize.std)}
        return spec

    def plots(self, out_dir: Path) -> None:
        names = "+".join(self.cfg.strategy.names()) or "fine-tuning"
        accuracy_heatmap(self.accuracy_matrix, out_dir / "accuracy_matrix.png",
                         title=f"{names} on {self.cfg.scenario.name} (seed {self.cfg.seed})")
        stats = self.plugin("plot_stats")
        if stats is not None:
            stats.plot_stats(out_dir)



def run(cfg: Config, out_dir: Path, *, progress: bool = False, resume: bool = False) -> dict[str, Any]:
    return execute(ClassificationRun(cfg, out_dir, progress), out_dir, resume=resume)
