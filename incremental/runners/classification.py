"""Class-incremental classification runs: users' data (``class_incremental``) and the named
benchmarks (``split_digits``, ``split_mnist``, ``split_fashion_mnist``, ``split_cifar10``,
``split_cifar100``): build, train, evaluate, report.

Strategies by name (``strategy.name``):
- ``naive``: fine-tune on each experience (the lower bound);
- ``replay``: the loop's history library, trained together with each minibatch;
- ``gradient_mixing``: replay history gradient mixed with the transfer gradient by similarity;
- ``lwf`` / ``ewc``: Avalanche's own regularisation plugins, unmodified, inside our loop;
- ``cumulative``: keep training the same model on all data seen so far;
- ``joint``: retrain from the initial weights on all data seen so far (the upper bound).
"""
from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from .. import selection  # noqa: F401 - registers the model-aware storage policies by name
from ..buffer import STORAGE_POLICIES, HistoryLibrary
from ..config import ConfigError, check
from .common import TrainConfig, make_optimizer
from ..data import Experience
from ..distributed import is_main_process, resolve_device
from ..metrics import format_matrix, summarize
from ..models import MODELS, TORCHVISION_PREFIX, build_model
from ..models import model_kwargs as architecture_kwargs
from ..plots import accuracy_heatmap
from ..scenarios.class_incremental import PRESETS, DataConfig, ScenarioConfig, build_benchmark
from ..trainer import Trainer, seed_everything

STRATEGIES = ("naive", "replay", "gradient_mixing", "lwf", "ewc", "cumulative", "joint")


@dataclass
class StrategyConfig:
    name: Literal["naive", "replay", "gradient_mixing", "lwf", "ewc", "cumulative", "joint"] = "replay"
    mem_size: int = 200
    storage_policy: str | None = None  # None: the strategy's own default (replay: reservoir)
    history_batch_size: int | None = None
    rule: str | None = None  # None: the plugin's default (strategies.mixing_rules.DEFAULT_RULE)
    gradient_pass: Literal["auto", "fused", "two_pass"] = "auto"
    logit_weight: float = 0.3  # gradient mixing *_der rules: weight of the logit replay term
    lwf_alpha: float = 1.0
    lwf_temperature: float = 2.0
    ewc_lambda: float = 100.0

    def validate(self) -> None:
        check(self.mem_size >= 0, "strategy.mem_size", f"must be >= 0, got {self.mem_size}")
        if self.name in ("replay", "gradient_mixing"):
            check(self.mem_size > 0, "strategy.mem_size", f"{self.name} needs a history library (mem_size > 0)")
        check(self.storage_policy is None or self.storage_policy in STORAGE_POLICIES, "strategy.storage_policy",
              f"unknown policy {self.storage_policy!r}; known: {', '.join(sorted(STORAGE_POLICIES))}")
        if self.history_batch_size is not None:
            check(self.history_batch_size > 0, "strategy.history_batch_size", "must be > 0")
        if self.name == "gradient_mixing" and self.rule is not None:
            from strategies.mixing_rules import RULES

            check(self.rule in RULES, "strategy.rule", f"unknown rule {self.rule!r}; known: {', '.join(RULES)}")


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
class Config:
    seed: int = 0
    scenario: ScenarioConfig = field(default_factory=ScenarioConfig)
    data: DataConfig = field(default_factory=DataConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    model: ModelConfig = field(default_factory=ModelConfig)

    def validate(self) -> None:
        check(self.scenario.name in PRESETS, "scenario.name", f"this runner handles {', '.join(PRESETS)}")


def model_kwargs(cfg: ModelConfig, n_classes: int, input_shape: tuple[int, ...] = (64,)) -> dict[str, Any]:
    """Constructor arguments of the configured model for inputs of ``input_shape``."""
    try:
        return architecture_kwargs(cfg.name, input_shape, n_classes, hidden_size=cfg.hidden_size,
                                   hidden_layers=cfg.hidden_layers, channels=cfg.channels, weights=cfg.weights)
    except ValueError as exc:
        raise ConfigError("", str(exc)) from None


def build_strategy(cfg: StrategyConfig, seed: int) -> tuple[list[Any], HistoryLibrary | None]:
    """Plugins and history library for a strategy name (the loop itself is the same for all)."""
    history = None
    plugins: list[Any] = []
    if cfg.name in ("replay", "gradient_mixing"):
        policy: Any = cfg.storage_policy or "reservoir"
        if cfg.storage_policy is None and cfg.name == "gradient_mixing":
            from strategies.gradient_mixing import DEFAULT_POLICY as policy
        history = HistoryLibrary(cfg.mem_size, policy, seed=seed)
    if cfg.name == "gradient_mixing":
        from strategies.gradient_mixing import GradientMixingPlugin

        from strategies.mixing_rules import DEFAULT_RULE

        plugins.append(GradientMixingPlugin(rule=cfg.rule or DEFAULT_RULE, gradient_pass=cfg.gradient_pass, seed=seed,
                                            logit_weight=cfg.logit_weight))
    elif cfg.name == "lwf":
        from avalanche.training.plugins import LwFPlugin

        plugins.append(LwFPlugin(alpha=cfg.lwf_alpha, temperature=cfg.lwf_temperature))
    elif cfg.name == "ewc":
        from avalanche.training.plugins import EWCPlugin

        plugins.append(EWCPlugin(ewc_lambda=cfg.ewc_lambda))
    return plugins, history


def union_experience(stream: list[Experience], upto: int) -> Experience:
    """Experiences 0..upto merged into one (for joint and cumulative training)."""
    dataset = stream[0].dataset
    classes = list(stream[0].classes_in_this_experience)
    for exp in stream[1 : upto + 1]:
        dataset = dataset.concat(exp.dataset)
        classes += exp.classes_in_this_experience
    return Experience(dataset, upto, sorted(classes), classes_seen_so_far=sorted(classes))


class ClassificationRun:
    """One run: the scenario, the trainer, and the accuracy matrix built experience by experience.

    Kept as an object (not a function) so that checkpoints can capture and restore it between
    experiences.
    """

    def __init__(self, cfg: Config, progress: bool = False) -> None:
        self.cfg = cfg
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        seed_everything(cfg.seed)
        self.benchmark = build_benchmark(cfg.scenario, cfg.data, cfg.seed)
        first = self.benchmark.train_stream[0].classes_in_this_experience
        n_out = (max(first) + 1) if cfg.model.growing_head else self.benchmark.n_classes
        self.model = self._build_model(n_out)
        self.initial_state = {k: v.clone() for k, v in self.model.state_dict().items()}
        plugins, history = build_strategy(cfg.strategy, cfg.seed)
        self.trainer = Trainer(
            self.model, make_optimizer(cfg.train, self.model), torch.nn.CrossEntropyLoss(),
            train_mb_size=cfg.train.batch_size, train_epochs=cfg.train.epochs,
            eval_mb_size=cfg.train.eval_batch_size, device=resolve_device(cfg.train.device), plugins=plugins,
            history=history, history_mb_size=cfg.strategy.history_batch_size, seed=cfg.seed,
            progress=progress, amp=cfg.train.amp, num_workers=cfg.train.num_workers,
        )
        self.progress = progress
        self.accuracy_matrix: list[list[float]] = []
        self.train_time_s = 0.0

    def _build_model(self, n_out: int) -> torch.nn.Module:
        try:
            return build_model(self.cfg.model.name, **self.model_kwargs(n_out))
        except ValueError as exc:  # an unknown torchvision name, weights that do not fit
            raise ConfigError("", str(exc)) from None

    def model_kwargs(self, n_out: int) -> dict[str, Any]:
        return model_kwargs(self.cfg.model, n_out, self.benchmark.input_shape)

    @property
    def n_experiences(self) -> int:
        return len(self.benchmark.train_stream)

    def step(self, i: int) -> list[float]:
        """Train on experience ``i`` (as the strategy dictates) and evaluate the whole test stream."""
        start = time.perf_counter()
        stream = self.benchmark.train_stream
        name = self.cfg.strategy.name
        if name == "joint":
            self._restart_model()
            self.trainer.train(union_experience(stream, i))
        elif name == "cumulative":
            self.trainer.train(union_experience(stream, i))
        else:
            self.trainer.train(stream[i])
        results = self.trainer.eval(self.benchmark.test_stream)
        row = [results[j]["accuracy"] for j in range(self.n_experiences)]
        self.accuracy_matrix.append(row)
        self.train_time_s += time.perf_counter() - start
        return row

    def _restart_model(self) -> None:
        """Joint training retrains from scratch: same initial weights, fresh optimizer."""
        self.trainer.model.load_state_dict(self.initial_state) if self._fixed_head() else self._rebuild_model()
        self.trainer.optimizer = make_optimizer(self.cfg.train, self.trainer.model)

    def _fixed_head(self) -> bool:
        return not self.cfg.model.growing_head

    def _rebuild_model(self) -> None:
        torch.manual_seed(self.cfg.seed)
        first = self.benchmark.train_stream[0].classes_in_this_experience
        self.trainer.model = self._build_model(max(first) + 1)

    def results(self) -> dict[str, Any]:
        R = self.accuracy_matrix
        return {
            "accuracy_matrix": R,
            **summarize(R),
            "class_order": self.benchmark.class_order,
            "classes_per_experience": self.benchmark.classes_per_experience,
            "class_names": self.benchmark.class_names,
            "in_memory": self.benchmark.in_memory,
            "history_bytes": 0 if self.trainer.history is None else self.trainer.history.nbytes,
            "train_eval_time_s": self.train_time_s,
        }


def save_run_package(runner: ClassificationRun, path: Path) -> Path:
    """The trained model as a deployable package (with its exemplars, for ``incremental update``)."""
    from ..package import save_model
    from ..update_classifier import classifier_package_extra

    model = runner.trainer.model
    n_out = model.classifier.n_classes
    kwargs = {k: v for k, v in runner.model_kwargs(n_out).items() if k != "weights"}  # weights are in the package
    names = runner.benchmark.class_names
    return save_model(path, model, kind="classifier", architecture=runner.cfg.model.name, arch_kwargs=kwargs,
                      class_names=[names[i] if i < len(names) else str(i) for i in range(n_out)],
                      extra=classifier_package_extra(runner.trainer.history, input_spec(runner)))


def input_spec(runner: ClassificationRun) -> dict[str, Any]:
    """What the model takes, stored in its package so updates and predictions prepare data the same way."""
    shape = runner.benchmark.input_shape
    normalize = runner.cfg.scenario.transforms.normalize
    spec: dict[str, Any] = {"max_value": 1.0}
    if len(shape) == 1:
        side = int(shape[0] ** 0.5)
        spec.update(channels=1, size=[side, side] if side * side == shape[0] else [1, shape[0]], flat=True)
    else:
        spec.update(channels=int(shape[0]), size=[int(shape[1]), int(shape[2])], flat=False)
    if normalize is not None:
        spec["normalize"] = {"mean": list(normalize.mean), "std": list(normalize.std)}
    return spec


def run(cfg: Config, out_dir: Path, *, progress: bool = False, resume: bool = False) -> dict[str, Any]:
    runner = ClassificationRun(cfg, progress=progress)
    start = 0
    from ..checkpoint import RunCheckpointer

    checkpointer = RunCheckpointer(out_dir, dataclasses.asdict(cfg))
    if resume:
        start = checkpointer.restore(runner)
    for i in tqdm(range(start, runner.n_experiences), desc="experiences", disable=not progress,
                  initial=start, total=runner.n_experiences):
        runner.step(i)
        checkpointer.save(runner, i + 1)
    results = runner.results()
    results["model_package"] = str(out_dir / "model.pt")
    if is_main_process():
        save_run_package(runner, out_dir / "model.pt")
        accuracy_heatmap(results["accuracy_matrix"], out_dir / "accuracy_matrix.png",
                         title=f"{cfg.strategy.name} on {cfg.scenario.name} (seed {cfg.seed})")
    for plugin in runner.trainer.plugins:  # per-iteration statistics of plugins that keep them
        if hasattr(plugin, "summary") and hasattr(plugin, "plot_stats"):
            results["gradient_stats"] = {str(k): v for k, v in plugin.summary().items()}
            if is_main_process():
                plugin.plot_stats(out_dir)
    results["report"] = format_matrix(results["accuracy_matrix"])
    return results
