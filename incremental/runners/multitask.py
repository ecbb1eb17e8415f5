"""Multi-task runs (SynthFaces, UTKFace, a CSV): HydraNet + dynamic loss weighting, per-task metrics.

``scenario.name`` picks the data: ``synthfaces`` (generated, nine tasks), ``utkface`` (a folder of
UTKFace images, ``scenario.path``), ``csv_multitask`` (a CSV file, ``scenario.path``, with the tasks
declared in ``scenario.tasks``). The ``dynamic_loss_weighting`` plugin of ``strategy.plugins`` picks
the loss weighting (its ``method``; without it the task losses are summed, masked); this family gives
it the task list and turns ``fixed_weights`` / ``task_scales: inverse_baseline_loss`` into numbers
from the labels. The training set can be split into ``scenario.n_experiences`` consecutive
experiences, with ``{name: replay}`` from the loop's history library (``strategy.history``).

results.json carries the per-task metrics of the final model under ``tasks``, the final loss weights
under ``loss_weights``, the weights and mean losses of every period under ``weight_history``, and
``time_per_epoch_s``; ``loss_weights.png`` draws the weight curves.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from .base import LegacyUpdate, Run, RunConfig, StrategyConfig, execute, legacy_history, take, unknown_legacy
from .common import TrainConfig as CommonTrainConfig, make_optimizer
from ..config import ConfigError, check
from ..data import Experience, TensorSamples
from ..multitask.metrics import MultiTaskAccumulator, headline
from ..multitask.model import HydraNet
from ..multitask.tasks import TaskSpec, constant_predictor_loss, fit_output_scaling, fully_labelled, task_loss_terms
from ..multitask.weighting import inverse_loss_weights
from ..trainer import Trainer, seed_everything

SCENARIOS = ("synthfaces", "utkface", "csv_multitask")


@dataclass
class TaskConfig:
    """One task of a CSV data set (``scenario.tasks``)."""

    name: str = ""
    kind: Literal["regression", "binary", "multiclass", "points"] = "regression"
    dim: int = 1
    loss: Literal["mse", "l1", "smooth_l1"] = "mse"
    marker: float = -1.0

    def spec(self) -> TaskSpec:
        return TaskSpec(self.name, self.kind, dim=self.dim, loss=self.loss, marker=self.marker)


@dataclass
class ScenarioConfig:
    name: str = "synthfaces"
    n_train: int = 1200
    n_test: int = 1000
    image_size: int = 64
    missing_fraction: float | dict[str, float] = 0.0
    markers: dict[str, float] = field(default_factory=dict)
    label_policy: Literal["masked", "drop_partial"] = "masked"
    train_tasks: list[str] | None = None
    path: str | None = None
    tasks: list[TaskConfig] = field(default_factory=list)
    image_column: str = "path"
    test_fraction: float = 0.2
    limit: int | None = None
    n_experiences: int = 1

    def validate(self) -> None:
        check(self.name in SCENARIOS, "scenario.name", f"this runner handles {list(SCENARIOS)}, got {self.name!r}")
        check(self.n_train >= 1, "scenario.n_train", f"must be >= 1, got {self.n_train}")
        check(self.n_test >= 1, "scenario.n_test", f"must be >= 1, got {self.n_test}")
        check(self.image_size >= 32 and self.image_size % 16 == 0, "scenario.image_size",
              f"must be a multiple of 16 and >= 32, got {self.image_size}")
        fractions = self.missing_fraction.values() if isinstance(self.missing_fraction, dict) else [self.missing_fraction]
        for value in fractions:
            check(0.0 <= value < 1.0, "scenario.missing_fraction", f"must be in [0, 1), got {value}")
        check(0.0 < self.test_fraction < 1.0, "scenario.test_fraction", f"must be in (0, 1), got {self.test_fraction}")
        check(self.n_experiences >= 1, "scenario.n_experiences", f"must be >= 1, got {self.n_experiences}")
        check(self.limit is None or self.limit >= 1, "scenario.limit", "must be >= 1 or null")
        if self.name in ("utkface", "csv_multitask"):
            check(bool(self.path), "scenario.path", f"{self.name} needs the path of its "
                  f"{'image folder' if self.name == 'utkface' else 'CSV file'}")
        if self.name == "csv_multitask":
            check(len(self.tasks) >= 1, "scenario.tasks", "csv_multitask needs the task list (name, kind, dim, loss, marker)")
            for i, task in enumerate(self.tasks):
                check(bool(task.name), f"scenario.tasks[{i}].name", "must not be empty")
                try:
                    task.spec()
                except ValueError as exc:
                    check(False, f"scenario.tasks[{i}]", str(exc))


DEFAULT_METHOD = "dwa_ema_exp_init"  # chosen by benchmarks/multitask_weighting.py (docs/multitask.md)
INVERSE_BASELINE = "inverse_baseline_loss"


def default_strategy() -> StrategyConfig:
    return StrategyConfig(plugins=[{"name": "dynamic_loss_weighting", "method": DEFAULT_METHOD}])


@dataclass
class ModelConfig:
    channels: list[int] = field(default_factory=lambda: [12, 24, 32, 48])
    convs_per_stage: int = 1
    fusion: bool = True
    fusion_channels: int = 32
    head_hidden: int = 64

    def validate(self) -> None:
        check(len(self.channels) >= 3, "model.channels", f"needs at least 3 stages, got {self.channels}")
        check(all(c >= 1 for c in self.channels), "model.channels", f"must be positive, got {self.channels}")
        check(self.convs_per_stage >= 1, "model.convs_per_stage", "must be >= 1")
        check(self.fusion_channels >= 1, "model.fusion_channels", "must be >= 1")
        check(self.head_hidden >= 1, "model.head_hidden", "must be >= 1")


@dataclass
class TrainConfig(CommonTrainConfig):
    """Multi-task defaults: Adam at 3e-3 for 8 epochs (validation is the shared one)."""

    epochs: int = 8
    lr: float = 0.003
    optimizer: Literal["sgd", "adam"] = "adam"
    momentum: float = 0.9
    eval_batch_size: int = 256


@dataclass
class Config(RunConfig):
    strategy: StrategyConfig = field(default_factory=default_strategy)
    scenario: ScenarioConfig = field(default_factory=ScenarioConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> None:
        check(self.strategy.regime == "incremental", "strategy.regime", "multi-task runs train incrementally")
        check(self.model.fusion_channels >= 1, "model.fusion_channels", "must be >= 1")
        check(self.scenario.image_size % (2 ** len(self.model.channels)) == 0, "scenario.image_size",
              f"{self.scenario.image_size} must be divisible by 2**{len(self.model.channels)} (one halving per stage)")


# ----------------------------------------------------------------------------------- data
@dataclass
class MultiTaskData:
    train: TensorSamples
    test: TensorSamples
    tasks: list[TaskSpec]
    report: dict[str, Any]


def load_data(cfg: Config) -> MultiTaskData:
    """Train / test samples and task specs for the configured scenario (labels dropped, policy applied)."""
    train, test, tasks, report = raw_data(cfg)
    return prepare_data(cfg, train, test, tasks, report)


def raw_data(cfg: Config) -> tuple[TensorSamples, TensorSamples, list[TaskSpec], dict[str, Any]]:
    """The scenario's samples with every label it has (SynthFaces: all; files: what they carry)."""
    s = cfg.scenario
    if s.name == "synthfaces":
        from ..multitask.synthfaces import TASK_NAMES, make_synthfaces, synthfaces_tasks

        for key in s.markers:
            check(key in TASK_NAMES, f"scenario.markers.{key}", f"unknown SynthFaces task; tasks: {list(TASK_NAMES)}")
        train = make_synthfaces(s.n_train, cfg.seed * 2 + 1, image_size=s.image_size, markers=s.markers)
        test = make_synthfaces(s.n_test, cfg.seed * 2 + 2, image_size=s.image_size, markers=s.markers)
        return train, test, synthfaces_tasks(s.markers), {"source": "synthfaces", "n_train": s.n_train, "n_test": s.n_test}
    from ..multitask.loaders import UTKFACE_TASKS, load_csv_multitask, load_utkface, split_samples

    if s.name == "utkface":
        samples, load_report = load_utkface(s.path, s.image_size, s.limit)
        tasks = list(UTKFACE_TASKS)
    else:
        tasks = [t.spec() for t in s.tasks]
        samples, load_report = load_csv_multitask(s.path, tasks, s.image_column, s.image_size, s.limit)
    train, test = split_samples(samples, s.test_fraction, cfg.seed)
    return train, test, tasks, load_report.as_dict()


def prepare_data(cfg: Config, train: TensorSamples, test: TensorSamples, tasks: list[TaskSpec],
                 report: dict[str, Any], *, allow_empty_train: bool = False) -> MultiTaskData:
    """Apply the label settings to raw data: task subset, dropped training labels, label policy,
    and the heads' output scaling (from the labelled training values).

    ``allow_empty_train``: when ``drop_partial`` leaves no image, keep going with an empty training
    set (the model stays at its initialisation) instead of raising; benchmarks use it to score the
    policy honestly rather than skip it.
    """
    import numpy as np

    from ..multitask.synthfaces import drop_labels

    s = cfg.scenario
    report = dict(report)
    names = [t.name for t in tasks]
    if isinstance(s.missing_fraction, dict):
        for key in s.missing_fraction:
            check(key in names, f"scenario.missing_fraction.{key}", f"unknown task; tasks: {names}")
    if s.train_tasks:
        for name in s.train_tasks:
            check(name in names, "scenario.train_tasks", f"unknown task {name!r}; tasks: {names}")
        tasks = [t for t in tasks if t.name in s.train_tasks]
        train = TensorSamples(train.x, {t.name: train.y[t.name] for t in tasks}, train.t)
        test = TensorSamples(test.x, {t.name: test.y[t.name] for t in tasks}, test.t)
    if s.missing_fraction:
        rng = np.random.default_rng([cfg.seed, 7])
        fraction = s.missing_fraction
        if isinstance(fraction, dict):
            fraction = {k: v for k, v in fraction.items() if k in {t.name for t in tasks}}
        labels = drop_labels({t.name: train.y[t.name] for t in tasks}, fraction, {t.name: t.marker for t in tasks}, rng)
        train = TensorSamples(train.x, labels, train.t)
    report["n_train_offered"] = len(train)
    if s.label_policy == "drop_partial":
        keep = torch.nonzero(fully_labelled(train.y, tasks)).flatten()
        if len(keep) == 0 and not allow_empty_train:
            raise ValueError("scenario.label_policy=drop_partial: no training sample has a label for every task")
        train = train.subset(keep)
    report["n_train_used"] = len(train)
    report["label_coverage"] = {t.name: float(_coverage(train, t)) if len(train) else 0.0 for t in tasks}
    return MultiTaskData(train, test, fit_output_scaling(tasks, train.y), report)


def _coverage(samples: TensorSamples, spec: TaskSpec) -> float:
    from ..multitask.tasks import label_present

    return float(label_present(samples.y[spec.name], spec.marker).float().mean())


def split_experiences(train: TensorSamples, n: int) -> list[Experience]:
    """``n`` consecutive, near-equal chunks of the training set as experiences."""
    bounds = [round(i * len(train) / n) for i in range(n + 1)]
    return [Experience(train.subset(torch.arange(bounds[i], bounds[i + 1])), i, [0]) for i in range(n)]


# ----------------------------------------------------------------------------------- run
def build_model(cfg: Config, tasks: list[TaskSpec]) -> HydraNet:
    m = cfg.model
    return HydraNet(tasks, image_size=cfg.scenario.image_size, channels=m.channels, convs_per_stage=m.convs_per_stage,
                    fusion=m.fusion, fusion_channels=m.fusion_channels, head_hidden=m.head_hidden)


def inverse_baseline_weights(tasks: list[TaskSpec], train: TensorSamples) -> dict[str, float]:
    """``K (1/s_k) / sum_j (1/s_j)`` with s_k the loss of the best constant prediction of task k."""
    scales = torch.tensor([constant_predictor_loss(t, train.y[t.name]) for t in tasks])
    return dict(zip([t.name for t in tasks], inverse_loss_weights(scales).tolist()))


def legacy(old: dict[str, Any]) -> LegacyUpdate:
    """The old flat multi-task strategy (``weighting`` and its options, ``mem_size`` for replay)."""
    history = legacy_history(old)
    options = take(old, "period_steps", "period_epochs", "fixed_weights", "task_scales", "beta", "temperature",
                   "alpha", "log_eps", "gradnorm_lr", "uncertainty_lr")
    method = take(old, "weighting")
    unknown_legacy(old)
    if "weighting" in method:
        options["method"] = method["weighting"]
    plugins = [{"name": "dynamic_loss_weighting", "method": DEFAULT_METHOD, **options}]
    if history.get("mem_size"):
        plugins.append({"name": "replay"})
    return LegacyUpdate(plugins=plugins, history=history)


def weighting_entry(cfg: Config) -> dict[str, Any]:
    """The ``dynamic_loss_weighting`` entry of ``strategy.plugins`` (added with the default method
    when missing), for benchmarks that vary the weighting."""
    for entry in cfg.strategy.plugins:
        if entry["name"] == "dynamic_loss_weighting":
            return entry
    entry = {"name": "dynamic_loss_weighting", "method": DEFAULT_METHOD}
    cfg.strategy.plugins.insert(0, entry)
    return entry


def plugin_hooks(cfg: Config, tasks: list[TaskSpec], train: TensorSamples) -> dict[str, Any]:
    """What the multi-task family gives the weighting plugin: its task specs, ``inverse_baseline_loss``
    weights / scales computed from the training labels, and the model's learning rate for the
    learnable weights (GradNorm, uncertainty) unless given."""
    from strategies.registry import FamilyHook

    names = [t.name for t in tasks]

    def weights(option: str, value: Any) -> Any:
        if value == INVERSE_BASELINE:
            return inverse_baseline_weights(tasks, train)
        if value in (None, "none"):
            return None
        if not isinstance(value, dict):
            raise ConfigError(option, f"must be {{task: weight}} or {INVERSE_BASELINE}, got {value!r}")
        unknown = sorted(set(value) - set(names))
        check(not unknown, option, f"unknown tasks {unknown}; tasks: {names}")
        for name, w in value.items():
            check(w >= 0, f"{option}.{name}", f"must be >= 0, got {w}")
        return dict(value) or None

    def build(options: dict[str, Any]) -> dict[str, Any]:
        return {"tasks": tasks, "fixed_weights": weights("fixed_weights", options["fixed_weights"]),
                "task_scales": weights("task_scales", options["task_scales"]),
                "gradnorm_lr": options["gradnorm_lr"] or cfg.train.lr,
                "uncertainty_lr": options["uncertainty_lr"] or cfg.train.lr}

    return {"dynamic_loss_weighting": FamilyHook(
        build, options={"fixed_weights": Any, "task_scales": Any, "gradnorm_lr": float | None,
                        "uncertainty_lr": float | None},
        defaults={"fixed_weights": None, "task_scales": None, "gradnorm_lr": None, "uncertainty_lr": None})}


class MultiTaskRun(Run):
    """One run: data, HydraNet, the weighting plugin, the loop; per-task metrics after each experience."""

    def __init__(self, cfg: Config, out_dir: Path | str = ".", progress: bool = False,
                 data: MultiTaskData | None = None) -> None:
        super().__init__(cfg, out_dir, progress)
        self.data = data if data is not None else load_data(cfg)
        self.tasks = self.data.tasks
        seed_everything(cfg.seed)  # model init does not depend on how much randomness the data took
        self.model = build_model(cfg, self.tasks)
        plugins = self.make_plugins(plugin_hooks(cfg, self.tasks, self.data.train))
        self.plugin = self.plugin("weights")
        tasks = self.tasks
        # With a weighting plugin its criterion is the loss (masked task means, weighted); without one
        # the masked task losses are named terms the loop sums.
        criterion = self.plugin.criterion if self.plugin is not None else (
            lambda output, y: task_loss_terms(tasks, output, y))
        self.trainer = Trainer(
            self.model, make_optimizer(cfg.train, self.model), criterion,
            train_mb_size=cfg.train.batch_size, train_epochs=cfg.train.epochs, eval_mb_size=cfg.train.eval_batch_size,
            device=cfg.train.device, plugins=plugins, history=self.make_history(), seed=cfg.seed, progress=progress,
            eval_accumulator=lambda trainer: MultiTaskAccumulator(tasks), grad_clip=cfg.train.grad_clip,
        )
        self.experiences = split_experiences(self.data.train, cfg.scenario.n_experiences)
        self.test = Experience(self.data.test, 0, [0])
        self.evaluations: list[dict[str, Any]] = []  # accuracy_matrix row i: headline metric per task
        self.train_cpu_time_s = 0.0
        self.epochs_done = 0

    @property
    def n_steps(self) -> int:
        return len(self.experiences)

    n_experiences = n_steps

    def step(self, i: int) -> dict[str, Any]:
        start, cpu_start = time.perf_counter(), time.process_time()
        self.trainer.train(self.experiences[i])
        self.train_time_s += time.perf_counter() - start
        self.train_cpu_time_s += time.process_time() - cpu_start
        self.epochs_done += self.cfg.train.epochs
        result = self.trainer.eval(self.test)[0]
        self.evaluations.append(result)
        self.accuracy_matrix.append([result[t.name][t.metric] for t in self.tasks])
        return result

    def log_evaluation(self, tracker: Any, i: int) -> None:
        """Each task's headline metric on the test set, e.g. ``accuracy/eval_phase/test_stream/gender``."""
        tracker.log_values(i, {f"{t.metric}/eval_phase/test_stream/{t.name}": float(v)
                               for t, v in zip(self.tasks, self.accuracy_matrix[-1])})

    def extra_state(self) -> dict[str, Any]:
        return {**super().extra_state(), "evaluations": self.evaluations, "epochs_done": self.epochs_done,
                "train_cpu_time_s": self.train_cpu_time_s}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        super().load_extra_state(state)
        self.evaluations = list(state["evaluations"])
        self.epochs_done = int(state["epochs_done"])
        self.train_cpu_time_s = float(state["train_cpu_time_s"])

    def results(self) -> dict[str, Any]:
        final = self.evaluations[-1]
        plugin = self.plugin
        return _json_safe({
            "tasks": final,
            "headline": headline(final, self.tasks),
            "metrics": {t.name: t.metric for t in self.tasks},
            "loss_weights": plugin.weights if plugin is not None else {t.name: 1.0 for t in self.tasks},
            "weighting": plugin.method if plugin is not None else "sum",
            "weight_history": plugin.log if plugin is not None else [],
            "evaluations": self.evaluations,
            "train_time_s": self.train_time_s,
            "time_per_epoch_s": self.train_time_s / max(self.epochs_done, 1),
            "cpu_time_per_epoch_s": self.train_cpu_time_s / max(self.epochs_done, 1),
            "data": self.data.report,
        })

    def report(self, results: dict[str, Any]) -> str:
        return format_tasks(results, self.tasks)

    def plots(self, out_dir: Path) -> None:
        if self.plugin is not None and self.plugin.log:
            self.plugin.plot_weights(Path(out_dir) / "loss_weights.png",
                                     title=f"{self.plugin.method} loss weights on {self.cfg.scenario.name} "
                                           f"(seed {self.cfg.seed})")


def format_tasks(results: dict[str, Any], tasks: list[TaskSpec]) -> str:
    lines = [f"{'task':<16} {'metric':<9} {'value':>10} {'weight':>8} {'labelled':>9}"]
    for t in tasks:
        r = results["tasks"][t.name]
        w = results["loss_weights"].get(t.name, float("nan"))
        lines.append(f"{t.name:<16} {t.metric:<9} {r[t.metric]:>10.4f} {w:>8.3f} {int(r['count']):>9d}")
    return "\n".join(lines)


def run(cfg: Config, out_dir: Path, *, progress: bool = False, resume: bool = False) -> dict[str, Any]:
    return execute(MultiTaskRun(cfg, out_dir, progress), out_dir, resume=resume)


def _json_safe(value: Any) -> Any:
    """nan / inf become None so results.json stays strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value
