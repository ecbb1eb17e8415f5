"""The one path every run takes, whatever the model family.

build data -> model -> plugins (``strategy.plugins``, one registry) + the loop's history library
(``strategy.history``) -> the loop, step by step -> evaluate after each step -> checkpoint -> results,
plots, model package. A family (classification, transfer, detection, panoptic, multi-task) is a
:class:`Run` subclass that contributes only its data, model, loss terms and evaluator, in the hooks
below; :func:`execute` is the rest, the same for all.

Configs share their sections: :class:`RunConfig` (``seed``, ``strategy``) is the base of every
family's ``Config``; ``train`` derives from :class:`~incremental.runners.common.TrainConfig`.
"""
from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Mapping

import torch
from tqdm.auto import tqdm

from ..buffer import STORAGE_POLICIES, HistoryLibrary
from ..config import ConfigError, check
from ..distributed import is_main_process
from ..guards import CollapsedModelError
from ..tracking import LoggingConfig, Tracker, build_tracker
from ..trainer import seed_everything


def known_policies() -> list[str]:
    """Storage policies by name (modules that register their own are imported first)."""
    import strategies.gradient_mixing  # noqa: F401 - registers herding and loss_stratified (incremental.selection)

    return sorted(STORAGE_POLICIES)


@dataclass
class HistoryConfig:
    """``strategy.history``: the loop's history library (replay buffer), shared by every plugin."""

    mem_size: int = 0
    policy: str = "reservoir"
    batch_size: int | None = None  # history minibatch size (default: the training batch size)
    policy_options: dict[str, Any] = field(default_factory=dict)  # passed to the policy constructor

    def validate(self) -> None:
        check(self.mem_size >= 0, "strategy.history.mem_size", f"must be >= 0, got {self.mem_size}")
        check(self.policy in known_policies(), "strategy.history.policy",
              f"unknown policy {self.policy!r}; known: {', '.join(known_policies())}")
        check(self.batch_size is None or self.batch_size >= 1, "strategy.history.batch_size",
              f"must be >= 1, got {self.batch_size}")


@dataclass
class StrategyConfig:
    """``strategy``: ``plugins`` (``[{name: ..., <options>}]``, empty = fine-tuning), the loop's
    ``history`` library, and the training ``regime`` (``incremental``; ``cumulative`` and ``joint``
    retrain on all data seen so far, the upper bounds)."""

    plugins: list[dict[str, Any]] = field(default_factory=list)
    history: HistoryConfig = field(default_factory=HistoryConfig)
    regime: Literal["incremental", "cumulative", "joint"] = "incremental"

    def validate(self) -> None:
        from strategies.registry import resolve

        users = []
        for i, entry in enumerate(self.plugins):
            check(isinstance(entry, dict) and isinstance(entry.get("name"), str), f"strategy.plugins[{i}]",
                  f"must be a mapping with a name, e.g. {{name: replay}}, got {entry!r}")
            cls = resolve(entry["name"], f"strategy.plugins[{i}]")
            if getattr(cls, "consumes_history", False) or getattr(cls, "replays_history", False):
                users.append(entry["name"])
        if users:
            check(self.history.mem_size > 0, "strategy.history.mem_size",
                  f"plugin {users[0]!r} uses the loop's history library: set mem_size > 0")
        elif self.history.mem_size > 0:
            check(False, "strategy.history", "a history library is configured but no plugin uses it; add "
                  "{name: replay} or {name: gradient_mixing} to strategy.plugins, or set mem_size: 0")
        check(self.regime == "incremental" or not users, "strategy.regime",
              f"{self.regime} training sees all data already; it takes no replay plugin")

    def names(self) -> list[str]:
        return [entry["name"] for entry in self.plugins]


@dataclass
class RunConfig:
    """Sections every family's config has; a family's ``Config`` adds ``scenario``, ``model``, ``train``."""

    seed: int = 0
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


# ----------------------------------------------------------------------------- old strategy names
@dataclass
class LegacyUpdate:
    """What a family's old ``strategy`` keys mean in the new form: ``plugins`` (None: keep the config's
    list; ``strategy.name`` replaces it), options for plugins already listed, ``history`` keys, and the
    ``regime``."""

    plugins: list[dict[str, Any]] | None = None
    options: dict[str, dict[str, Any]] = field(default_factory=dict)
    history: dict[str, Any] = field(default_factory=dict)
    regime: str | None = None


HISTORY_USERS = ("replay", "gradient_mixing")


def legacy_strategy(raw: Any, translate: Callable[[dict[str, Any]], LegacyUpdate], default_mem_size: int = 200,
                    quiet: bool = False) -> Any:
    """Rewrite a family's old ``strategy`` keys (``name: replay``, ``mem_size: 200``, ``rule``, ...) into
    ``plugins`` + ``history`` + ``regime`` with ``translate``, on top of whatever new-form keys the
    config already has (so ``--set strategy.mem_size=500`` on a new-form config changes its history),
    and say so in one line on stderr. Kept for one release."""
    if not isinstance(raw, dict) or not (set(raw) - {"plugins", "history", "regime"}):
        return raw
    # an old key set to null meant "the default" (benchmarks pass rule=None): leave it out
    old = {k: v for k, v in raw.items() if k not in ("plugins", "history", "regime") and v is not None}
    update = translate(dict(old))
    plugins = [dict(e) for e in (update.plugins if update.plugins is not None else raw.get("plugins", []))]
    for entry in plugins:
        entry.update(update.options.get(entry.get("name"), {}))
    history = {**(raw.get("history") or {}), **update.history}
    uses = any(isinstance(e, dict) and e.get("name") in HISTORY_USERS for e in plugins)
    if uses and not history.get("mem_size"):
        history["mem_size"] = default_mem_size
    if not uses and (update.plugins is not None or "mem_size" not in update.history):
        history = {**history, "mem_size": 0}
    merged: dict[str, Any] = {"plugins": plugins, "history": history}
    regime = update.regime or (raw.get("regime") if update.plugins is None else None)
    if regime:
        merged["regime"] = regime
    if not quiet:
        print(f"deprecated: strategy.{', strategy.'.join(sorted(old))} -> {_describe(merged)}; "
              "the old keys go in the next release", file=sys.stderr)
    return merged


def config_from_raw(config_cls: type, raw: dict[str, Any], translate: Callable[[dict[str, Any]], LegacyUpdate],
                    *, quiet: bool = False) -> Any:
    """A family's typed config from a raw dict, old strategy keys translated as ``incremental run``
    does (benchmarks that build configs in code use it, ``quiet`` about the deprecation)."""
    from ..config import from_dict

    if isinstance(raw.get("strategy"), dict):
        raw = {**raw, "strategy": legacy_strategy(raw["strategy"], translate, quiet=quiet)}
    return from_dict(config_cls, raw)


def _describe(strategy: dict[str, Any]) -> str:
    names = ", ".join(str(e.get("name")) for e in strategy["plugins"]) or "(fine-tuning)"
    parts = [f"strategy.plugins [{names}]", f"strategy.history {strategy['history']}"]
    if strategy.get("regime", "incremental") != "incremental":
        parts.append(f"strategy.regime {strategy['regime']}")
    return ", ".join(parts)


def take(old: dict[str, Any], *keys: str) -> dict[str, Any]:
    """Pop ``keys`` present in ``old`` (legacy translation helper)."""
    return {k: old.pop(k) for k in keys if k in old}


def legacy_history(old: dict[str, Any]) -> dict[str, Any]:
    """The old flat history keys (``mem_size``, ``storage_policy``, ``history_batch_size``,
    ``max_comparisons``) as ``strategy.history`` keys."""
    given = take(old, "mem_size", "storage_policy", "history_batch_size", "max_comparisons")
    history: dict[str, Any] = {}
    if "mem_size" in given:
        history["mem_size"] = given["mem_size"]
    if "storage_policy" in given:
        history["policy"] = given["storage_policy"]
    if "history_batch_size" in given:
        history["batch_size"] = given["history_batch_size"]
    if "max_comparisons" in given:
        history["policy_options"] = {"max_comparisons": given["max_comparisons"]}
    return history


def unknown_legacy(old: dict[str, Any]) -> None:
    if old:
        key = sorted(old)[0]
        raise ConfigError(f"strategy.{key}", "unknown key (strategy takes plugins, history, regime)")


# ----------------------------------------------------------------------------- the skeleton
class Run:
    """One run of a family. Subclasses implement the hooks; :func:`execute` drives them.

    Hooks: ``n_steps``, ``step(i)`` (train step ``i`` and evaluate; append a row to
    ``accuracy_matrix``), ``results()``, ``report(results)``; optional ``save_package(path)``,
    ``plots(out_dir)``, ``extra_state()`` / ``load_extra_state(state)`` for checkpoints.
    ``self.trainer`` is the loop whose state checkpoints hold.
    """

    title = "run"
    #: Avalanche's name of what ``accuracy_matrix`` holds, for the logs (``Top1_Acc_Exp/eval_phase/...``)
    eval_metric = "Top1_Acc"

    def __init__(self, cfg: Any, out_dir: Path | str = ".", progress: bool = False) -> None:
        self.cfg = cfg
        self.out_dir = Path(out_dir)
        self.progress = progress
        threads = getattr(getattr(cfg, "train", None), "threads", None)
        if threads:
            torch.set_num_threads(threads)
        seed_everything(cfg.seed)
        self.accuracy_matrix: list[list[float]] = []
        self.train_time_s = 0.0
        self.trainer: Any = None
        self.plugins: list[Any] = []
        self.tracker: Tracker | None = None  # set by execute() before the first step
        self.answered_several = False  # whether the model has told two classes apart (the collapse guard)

    # -- shared pieces -------------------------------------------------------------------------
    def make_history(self, collate_fn: Callable | None = None) -> HistoryLibrary | None:
        """The loop's history library from ``strategy.history`` (None without one)."""
        from ..buffer import make_policy

        h = self.cfg.strategy.history
        if not h.mem_size:
            return None
        known_policies()
        try:
            policy = make_policy(h.policy, **h.policy_options)
        except TypeError as exc:
            raise ConfigError("strategy.history.policy_options", f"{h.policy}: {exc}") from None
        return HistoryLibrary(h.mem_size, policy, seed=self.cfg.seed, collate_fn=collate_fn)

    def make_plugins(self, hooks: Mapping[str, Any] | None = None) -> list[Any]:
        """``strategy.plugins`` from the registry; ``hooks`` add what this family knows (see
        :class:`strategies.registry.FamilyHook`). The run's seed goes to plugins that take one."""
        from strategies.registry import build_plugins

        self.plugins = build_plugins(self.cfg.strategy.plugins, hooks, defaults={"seed": self.cfg.seed})
        if self.tracker is not None and self.tracker.loggers:  # a loop built during a step logs too
            return [*self.plugins, self.tracker]
        return self.plugins

    def check_plugins(self, hooks: Mapping[str, Any] | None = None) -> None:
        """Build ``strategy.plugins`` once and drop them: a family that builds its plugins late (after
        training a deployed model) refuses a bad option before any work is done."""
        from strategies.registry import build_plugins

        build_plugins(self.cfg.strategy.plugins, hooks, defaults={"seed": self.cfg.seed})

    def refuse_collapse(self, i: int, evaluated: Mapping[str, Any]) -> None:
        """The collapse guard, on one test set's evaluation (the keys of
        :class:`incremental.trainer.ClassificationAccumulator`) after step ``i``.

        A model that told classes apart and now answers one class for a whole test set of several has
        collapsed (dead units after a burst of large gradients): its loss is finite, so the loss guard
        cannot see it, and yet it is refused like a diverged one (exit 3, no checkpoint of this step, no
        package). One that never told classes apart, as a barely trained first step may not, is left to
        the accuracy matrix.
        """
        if evaluated.get("collapsed_to", -1) >= 0 and self.answered_several:
            raise CollapsedModelError(i, evaluated["collapsed_to"], evaluated["true_classes"])
        self.answered_several |= evaluated.get("predicted_classes", 0) >= 2

    def plugin(self, attribute: str) -> Any:
        """The first plugin that has ``attribute`` (e.g. ``plot_stats``), or None."""
        return next((p for p in self.plugins if hasattr(p, attribute)), None)

    # -- hooks ---------------------------------------------------------------------------------
    @property
    def n_steps(self) -> int:
        raise NotImplementedError

    def step(self, i: int) -> Any:
        raise NotImplementedError

    def results(self) -> dict[str, Any]:
        raise NotImplementedError

    def report(self, results: dict[str, Any]) -> str:
        return ""

    def eval_results(self) -> Mapping[int, Mapping[str, float]]:
        """The step's evaluation per test experience for the logs: ``accuracy`` (and, where the family
        has them, ``loss`` and ``count``); by default the last row of ``accuracy_matrix``."""
        return {j: {"accuracy": v} for j, v in enumerate(self.accuracy_matrix[-1])}

    def log_evaluation(self, tracker: Tracker, i: int) -> None:
        """Log step ``i``'s evaluation: Avalanche's metrics from :meth:`eval_results` (a family whose
        evaluation is not an accuracy per test experience logs named values with ``tracker.log_values``)."""
        tracker.log_eval(i, self.eval_results(), self.accuracy_matrix)

    def save_package(self, path: Path) -> Path | None:
        return None

    def plots(self, out_dir: Path) -> None:
        pass

    def extra_state(self) -> dict[str, Any]:
        """Checkpointed beside the loop's state: every plugin's own state (those that have one) and the
        collapse guard's flag."""
        return {"plugins": [p.state_dict() if hasattr(p, "load_state_dict") else None for p in self.plugins],
                "answered_several": self.answered_several}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.answered_several = bool(state.get("answered_several", False))
        for plugin, saved in zip(self.plugins, state.get("plugins", [])):
            if saved is not None:
                plugin.load_state_dict(saved)


def execute(run: Run, out_dir: Path, *, resume: bool = False) -> dict[str, Any]:
    """Steps with a checkpoint after each (``--resume`` continues from the newest good one), then the
    results, the model package and the plots (rank 0 writes files in data-parallel runs)."""
    from ..checkpoint import RunCheckpointer

    out_dir = Path(out_dir)
    config = dataclasses.asdict(run.cfg)
    checkpointer = RunCheckpointer(out_dir, config)  # (its logging section is not compared on resume)
    start = checkpointer.restore(run) if resume else 0
    run.tracker = build_tracker(run.cfg.logging, out_dir, run.trainer, config=config, experiences_done=start,
                                n_experiences=run.n_steps, metric=run.eval_metric)
    with run.tracker:
        for i in tqdm(range(start, run.n_steps), desc="steps", disable=not run.progress, initial=start,
                      total=run.n_steps):
            run.step(i)
            run.log_evaluation(run.tracker, i)
            checkpointer.save(run, i + 1, run.extra_state())
    results = run.results()
    if is_main_process():
        package = run.save_package(out_dir / "model.pt")
        if package is not None:
            results["model_package"] = str(package)
        run.plots(out_dir)
    results["report"] = run.report(results)
    return results
