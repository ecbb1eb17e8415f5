"""Gradient-similarity mixing against this project's and Avalanche's rehearsal strategies.

One process, one thread, everything side by side:

1. Split Digits (5 experiences of 2 classes), memory 200 and 500, 3 seeds: this project's naive, replay
   and gradient mixing (every rule, plus the gradient-diversity and class-balanced libraries) against
   Avalanche's Naive, Replay, AGEM, GSS_greedy, ER_ACE and DER. Same MLP 64-256-10, same data and class
   order, SGD lr 0.1, 10 epochs (the project's Split Digits configs), batch 32 (history / memory batch
   32 wherever a strategy has one).
   Two step-size controls: replay at twice the learning rate (what the ``sum`` rule is: replay averages
   the concatenated batch, the sum does not) and the default rule at half the learning rate.
2. digits_transfer, shots 5/10/25/50, memory 200, 3 seeds: fine-tuning (naive), replay and every mixing
   rule, from the same meta model; accuracy on both scenes before and after adaptation. Adaptation:
   SGD lr 0.1 for a fixed number of optimizer steps (800 by default) whatever the shots, so that every
   shots setting gets the same budget (fine-tuning's transfer accuracy has plateaued by then). Also a "ceiling" run: the default rule with the whole general
   training set as history (no memory limit).
3. Cost: training time of gradient mixing vs plain replay at equal samples per step (32 training + 32
   history samples), on the experiences that have a history (1..4), interleaved repetitions, CPU time
   and wall time; plus the floor any implementation of the method pays (the extra forward/backward
   alone, no mixing), on the benchmark MLP and on a wider one. ``floor``: the phases of a hand-written
   replay step and ghost step (no loop, no plugin), what the method costs without any bookkeeping.
4. Insertion cost of the library policies (samples/s): reservoir, class-balanced, herding,
   loss-stratified.
5. Stale gradients: steps whose gradient differs from the one the step should use, for Avalanche's
   GSS_greedy and for this plugin (our loop and Avalanche's Naive).

    .venv/bin/python benchmarks/gradient_mixing.py            # default (~10 min on one core)
    .venv/bin/python benchmarks/gradient_mixing.py --quick    # smoke run (1 seed, 1 shots value, short)

Writes ``benchmarks/results/gradient_mixing.json`` (``gradient_mixing_quick.json`` with ``--quick``).
"""
from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from incremental.buffer import HistoryLibrary  # noqa: E402
from incremental.io import write_json  # noqa: E402
from incremental.metrics import summarize  # noqa: E402
from incremental.data import Experience, TensorSamples  # noqa: E402
from incremental.grids.paired import t_interval  # noqa: E402
from incremental.models import MLP, build_model  # noqa: E402
from incremental.plugins import Plugin  # noqa: E402
from incremental.scenarios.digits import split_digits  # noqa: E402
from incremental.trainer import Trainer  # noqa: E402
from incremental.flat_gradients import flatten_grads  # noqa: E402
from strategies.gradient_mixing import DEFAULT_POLICY, GradientMixingPlugin  # noqa: E402
from strategies.mixing_rules import DEFAULT_RULE, RULES, WEIGHTS, mix  # noqa: E402

EPOCHS, BATCH, LR = 10, 32, 0.1  # the project's Split Digits configs (trained to convergence)
QUIET = False  # --quiet: no progress lines and no tables on stdout (the JSON has the tables)
N_EXP = 5


def log(msg: str, quiet: bool) -> None:
    if not quiet:
        print(msg, flush=True)


# ==================================================================================================
# 1. Split Digits
# ==================================================================================================

def ours_split(name: str, seed: int, mem: int, rule: str | None = None, policy: str | None = None,
               lr: float | None = None, epochs: int | None = None) -> dict[str, Any]:
    from incremental.runners.classification import ClassificationRun, config_from

    cfg = config_from({
        "seed": seed, "scenario": {"n_experiences": N_EXP},
        "strategy": {"name": name, "mem_size": mem, "rule": rule, "storage_policy": policy},
        "train": {"epochs": epochs or EPOCHS, "batch_size": BATCH, "lr": lr or LR, "threads": 1},
        "model": {"name": "mlp", "hidden_size": 256},
    })
    runner = ClassificationRun(cfg)
    start = time.perf_counter()
    for i in range(runner.n_experiences):
        runner.step(i)
    return {"R": runner.accuracy_matrix, "time_s": time.perf_counter() - start}


def avalanche_benchmark(seed: int) -> tuple[Any, Any]:
    from avalanche.benchmarks.scenarios.supervised import class_incremental_benchmark
    from avalanche.benchmarks.utils import _make_taskaware_tensor_classification_dataset as tensor_dataset

    ours = split_digits(N_EXP, seed=seed)
    cat = lambda stream: (torch.cat([e.dataset.x for e in stream]), torch.cat([e.dataset.y for e in stream]))  # noqa: E731
    (x_tr, y_tr), (x_te, y_te) = cat(ours.train_stream), cat(ours.test_stream)
    bench = class_incremental_benchmark(
        {"train": tensor_dataset(x_tr, y_tr), "test": tensor_dataset(x_te, y_te)},
        class_order=ours.class_order, num_classes_per_exp=[len(c) for c in ours.classes_per_experience])
    return bench, ours


@torch.no_grad()
def accuracy_row(model: nn.Module, test_stream: Sequence[Any]) -> list[float]:
    was = model.training
    model.eval()
    row = [float((model(e.dataset.x).argmax(1) == e.dataset.y).float().mean()) for e in test_stream]
    model.train(was)
    return row


def avalanche_split(name: str, seed: int, mem: int) -> dict[str, Any]:
    from avalanche.training.plugins import EvaluationPlugin

    from avalanche_baselines import avalanche_strategy

    bench, ours = avalanche_benchmark(seed)
    torch.manual_seed(seed)
    model = MLP(64, 256, 10)
    strategy = avalanche_strategy(name, model, mem=mem, lr=LR, batch=BATCH, epochs=EPOCHS, eval_batch=512,
                                  n_experiences=N_EXP, input_size=[64], evaluator=EvaluationPlugin(loggers=[]))
    start = time.perf_counter()
    R = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for exp in bench.train_stream:
            strategy.train(exp)
            R.append(accuracy_row(model, ours.test_stream))
    return {"R": R, "time_s": time.perf_counter() - start}


def split_digits_part(args: argparse.Namespace) -> dict[str, Any]:
    runs: dict[str, dict[str, Any]] = {}  # label -> {mem -> [per seed]}

    def add(label: str, mem: int, out: dict[str, Any]) -> None:
        m = summarize(out["R"])
        runs.setdefault(label, {}).setdefault(str(mem), []).append(
            {"average_accuracy": m["average_accuracy"], "forgetting": m["forgetting"], "time_s": out["time_s"],
             "accuracy_matrix": out["R"]})

    gm = [(f"ours gradient mixing: {rule} + reservoir", rule, "reservoir") for rule in WEIGHTS]
    gm += [(f"ours gradient mixing: {DEFAULT_RULE} + {DEFAULT_POLICY} (default)", None, None)]
    gm += [(f"ours gradient mixing: {rule} + {policy}", rule, policy) for rule, policy in (
        ("similarity_der", "reservoir"), ("similarity_der", "class_balanced"),
        ("similarity", "herding"), ("similarity_ace", "herding"), ("sum_der", "herding"), ("pcgrad_der", "herding"))]
    for seed in args.seeds:
        naive, av_naive = ours_split("naive", seed, 200), avalanche_split("Naive", seed, 200)  # no memory
        for mem in args.mems:
            add("ours naive (fine-tune)", mem, naive)
            add("avalanche Naive", mem, av_naive)
            add("ours replay", mem, ours_split("replay", seed, mem))
            for label, rule, policy in gm:
                add(label, mem, ours_split("gradient_mixing", seed, mem, rule=rule, policy=policy))
            add("control: ours replay at lr x2", mem, ours_split("replay", seed, mem, lr=2 * LR))
            add("control: ours default gradient mixing at lr /2", mem, ours_split("gradient_mixing", seed, mem, lr=LR / 2))
            for name in ("Replay", "AGEM", "GSS_greedy", "ER_ACE", "DER"):
                add(f"avalanche {name}", mem, avalanche_split(name, seed, mem))
            log(f"  split digits seed {seed} mem {mem} done", args.quiet)
    table = {}
    for label, by_mem in runs.items():
        table[label] = {}
        for mem, seeds in by_mem.items():
            acc = [s["average_accuracy"] for s in seeds]
            fgt = [s["forgetting"] for s in seeds]
            tim = [s["time_s"] for s in seeds]
            table[label][mem] = {
                "average_accuracy_mean": statistics.mean(acc), "average_accuracy_std": _std(acc),
                "forgetting_mean": statistics.mean(fgt), "forgetting_std": _std(fgt),
                "time_s_mean": statistics.mean(tim), "per_seed": seeds,
            }
    return table


def _std(values: Sequence[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


REHEARSAL = ("ours replay", "avalanche Replay", "avalanche AGEM", "avalanche GSS_greedy", "avalanche ER_ACE",
             "avalanche DER")


def print_split_table(table: dict[str, Any], mems: Sequence[int]) -> list[str]:
    lines = ["", f"Split Digits (5 x 2 classes), MLP 64-256-10, SGD lr {LR}, {EPOCHS} epochs, batch 32; mean (std) over "
                 "seeds; accuracy and forgetting in points",
             f"{'strategy':62s}" + "".join(f" | mem {m}: avg acc   forgetting   time s" for m in mems)]
    for label, by_mem in table.items():
        cells = []
        for m in mems:
            r = by_mem.get(str(m))
            cells.append(f" | {100 * r['average_accuracy_mean']:5.1f} ({100 * r['average_accuracy_std']:3.1f})"
                         f"  {100 * r['forgetting_mean']:5.1f} ({100 * r['forgetting_std']:3.1f})  {r['time_s_mean']:6.2f}")
        lines.append(f"{label:62s}" + "".join(cells))
    log("\n".join(lines), QUIET)
    return lines


# ==================================================================================================
# 2. Transfer: digits_transfer and fashion_transfer
# ==================================================================================================

def transfer_config(scenario: str) -> dict[str, Any]:
    """The shipped config of a transfer scenario (scene, meta-model training, model, adaptation lr)."""
    from incremental.config import load_yaml

    return load_yaml(ROOT / "configs" / f"{scenario}.yaml")


#: ``--transfer-grad-clip``: every transfer run's ``train.grad_clip`` (None: the shipped config's).
TRANSFER_GRAD_CLIP: float | None = None

#: Rules run on fashion_transfer beside the default (``--fashion-rules``; digits_transfer runs its own list).
FASHION_RULES: list[str] = []


def fashion_rule(spec: str) -> str:
    """``RULE`` or ``RULE:LOGIT_WEIGHT``, checked when the command line is read."""
    rule, _, weight = spec.partition(":")
    if rule not in RULES:
        raise argparse.ArgumentTypeError(f"unknown rule {rule!r}; known: {', '.join(sorted(RULES))}")
    if weight:
        try:
            if float(weight) < 0:
                raise ValueError
        except ValueError:
            raise argparse.ArgumentTypeError(f"{spec}: the logit weight must be a number >= 0") from None
    return spec


#: The reference every transfer row is paired with (its first row: it also trains the meta model).
FINE_TUNE = "fine-tune (naive)"


def shipped_mixing_options(scenario: str) -> dict[str, Any]:
    """The numeric options the scenario's config gives its gradient-mixing plugin (``history_weight``,
    ``logit_weight``, ...); the benchmark sets the memory itself (``--transfer-mem``)."""
    plugins = transfer_config(scenario).get("strategy", {}).get("plugins", [])
    entry = next((p for p in plugins if isinstance(p, dict) and p.get("name") == "gradient_mixing"), {})
    return {k: v for k, v in entry.items() if k != "name" and isinstance(v, (int, float))}


def transfer_plan(scenario: str, shots: int) -> list[tuple[str, dict[str, Any]]]:
    """(label, strategy section) in run order; the first one (fine-tuning) trains the meta model."""
    plan: list[tuple[str, dict[str, Any]]] = [
        (FINE_TUNE, {"name": "naive"}),
        ("replay", {"name": "replay"}),
        (f"gradient mixing: {DEFAULT_RULE} + {DEFAULT_POLICY} (default)", {"name": "gradient_mixing"}),
        ("gradient mixing: similarity + reservoir (before)",
         {"name": "gradient_mixing", "rule": "similarity", "storage_policy": "reservoir"}),
    ]
    shipped = shipped_mixing_options(scenario)
    if shipped:  # the scenario's config sets options of its own: its row beside the plugin's defaults
        plan.append((f"gradient mixing: shipped config [{', '.join(f'{k}={v:g}' for k, v in shipped.items())}]",
                     {"name": "gradient_mixing", **shipped}))
    if scenario == "fashion_transfer":
        for spec in FASHION_RULES:  # rule[:logit_weight]
            rule, _, weight = spec.partition(":")
            options = {"logit_weight": float(weight)} if weight else {}
            extra = f" [logit_weight={float(weight):g}]" if weight else ""
            plan.append((f"gradient mixing: {rule} + {DEFAULT_POLICY}{extra}",
                         {"name": "gradient_mixing", "rule": rule, **options}))
    if scenario == "digits_transfer":
        plan += [(f"gradient mixing: {rule} + {DEFAULT_POLICY}", {"name": "gradient_mixing", "rule": rule})
                 for rule in ("sum_der", "pcgrad_der", "mega_der", "agem")]
        if shots in (5, 10):
            plan.append(("ceiling: default, the whole general training set as history",
                         {"name": "gradient_mixing", "mem_size": 2000}))
    return plan


def transfer_seed(scenario: str, seed: int, shots: int, mem: int, steps: int) -> dict[str, dict[str, Any]]:
    """Every strategy of the plan adapted from one meta model.

    The meta-training step is the same for every strategy (no history exists during it), so it runs once:
    the other runs start from its trainer state and fill their library from the general scene with their
    own policy, which is what their own step 0 would have ended with. Adaptation is ``TransferRun.step(1)``,
    the code ``incremental run`` executes.
    """
    import copy

    from incremental.runners.base import config_from_raw
    from incremental.runners.transfer import Config, TransferRun, legacy

    shipped = transfer_config(scenario)
    per_epoch = math.ceil(10 * shots / BATCH)  # both scenes have 10 classes
    meta: tuple[dict[str, Any], list[list[float]], list[float]] | None = None
    out = {}
    for label, strategy in transfer_plan(scenario, shots):
        cfg = config_from_raw(Config, {
            **shipped, "seed": seed, "scenario": {**shipped["scenario"], "shots": shots},
            "strategy": {"mem_size": mem, **strategy},
            "train": {**shipped["train"], "epochs": math.ceil(steps / per_epoch), "batch_size": BATCH, "threads": 1,
                      **({"grad_clip": TRANSFER_GRAD_CLIP} if TRANSFER_GRAD_CLIP else {})},
        }, legacy, quiet=True)
        runner = TransferRun(cfg)
        if meta is None:
            runner.step(0)
            meta = (copy.deepcopy(runner.trainer.state_dict()), list(runner.accuracy_matrix), list(runner.step_time_s))
        else:
            runner.trainer.load_state_dict(copy.deepcopy(meta[0]))
            if runner.trainer.history is not None:  # what the loop does at the end of step 0
                runner.trainer.history.update(runner.scenario.general_train.dataset, strategy=runner.trainer)
            runner.accuracy_matrix, runner.step_time_s = [list(r) for r in meta[1]], list(meta[2])
        start = time.perf_counter()
        runner.step(1)
        res = runner.results()
        out[label] = {"general_before": res["general_accuracy"]["before"], "general_after": res["general_accuracy"]["after"],
                      "transfer_before": res["transfer_accuracy"]["before"],
                      "transfer_after": res["transfer_accuracy"]["after"], "adapt_time_s": time.perf_counter() - start}
    return out


def transfer_part(args: argparse.Namespace, scenario: str, shots_list: Sequence[int]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for shots in shots_list:
        rows: dict[str, list[dict[str, Any]]] = {}
        for seed in args.seeds:
            for label, r in transfer_seed(scenario, seed, shots, args.transfer_mem, args.steps).items():
                rows.setdefault(label, []).append(r)
        out[str(shots)] = {label: _mean_rows(r, rows[FINE_TUNE]) for label, r in rows.items()}
        log(f"  {scenario} shots {shots} done", args.quiet)
    return out


def _mean_rows(rows: list[dict[str, Any]], fine_tune: list[dict[str, Any]]) -> dict[str, Any]:
    """Seed means, and the transfer accuracy minus fine-tuning's seed by seed (the same meta model),
    with its two-sided 95% t interval: the issue's "within 2 points of fine-tuning"."""
    keys = [k for k in rows[0] if k != "per_seed"]
    mean = {k: statistics.mean(r[k] for r in rows) for k in keys}
    mean["general_change_std"] = _std([r["general_after"] - r["general_before"] for r in rows])
    mean["transfer_after_std"] = _std([r["transfer_after"] for r in rows])
    diffs = [r["transfer_after"] - f["transfer_after"] for r, f in zip(rows, fine_tune)]
    interval = t_interval(diffs)
    mean["transfer_minus_fine_tune"] = {"mean": statistics.mean(diffs), "std": _std(diffs),
                                        "ci95": list(interval) if interval else None}
    mean["per_seed"] = rows
    return mean


def print_transfer_table(out: dict[str, Any], scenario: str, steps: int, mem: int) -> list[str]:
    lr = transfer_config(scenario)["train"]["lr"]
    lines = ["", f"{scenario}, memory {mem}, {steps} adaptation steps at lr {lr}; mean over seeds (points of accuracy)",
             f"{'shots':>5s}  {'strategy':58s} | general before -> after (change) | transfer before -> after | "
             f"transfer - fine-tuning, paired [95% t] | adapt s"]
    for shots, rows in out.items():
        for label, r in rows.items():
            change = 100 * (r["general_after"] - r["general_before"])
            d = r["transfer_minus_fine_tune"]
            ci = f"[{100 * d['ci95'][0]:+5.1f}, {100 * d['ci95'][1]:+5.1f}]" if d["ci95"] else ""
            lines.append(f"{shots:>5s}  {label:58s} | {100 * r['general_before']:5.1f} -> {100 * r['general_after']:5.1f}"
                         f" ({change:+5.1f} +- {100 * r['general_change_std']:3.1f}) | {100 * r['transfer_before']:5.1f} -> "
                         f"{100 * r['transfer_after']:5.1f} +- {100 * r['transfer_after_std']:3.1f} | "
                         f"{100 * d['mean']:+5.1f} +- {100 * d['std']:3.1f} {ci:16s} | {r['adapt_time_s']:6.2f}")
    log("\n".join(lines), QUIET)
    return lines


# ==================================================================================================
# 3. Cost against plain replay at equal samples per step
# ==================================================================================================

class ExtraPassOnly(Plugin):
    """The floor of the two-pass computation: the history forward + backward, nothing mixed."""

    consumes_history = True

    def after_backward(self, strategy: Any, **kwargs: Any) -> None:
        if strategy.mb_history is None:
            return
        params = [p for p in strategy.model.parameters() if p.requires_grad]
        saved = (strategy.mbatch, strategy.mb_output)
        strategy.mbatch = strategy.mb_history
        strategy.mb_output = strategy.forward()
        loss = strategy.criterion()
        strategy.mbatch, strategy.mb_output = saved
        torch.autograd.grad(loss, params)


#: The models of the cost table: (label, builder, input shape).
COST_MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "MLP 784-256-256-10 (Split Fashion-MNIST)": (lambda: MLP(784, 256, 10, hidden_layers=2), (1, 28, 28)),
    "resnet18_reduced, 3x32x32": (lambda: build_model("resnet18_reduced", in_channels=3, n_classes=10), (3, 32, 32)),
}
COST_KINDS = ("replay", "mixing, auto", "mixing, two passes", "mixing, fused", "extra pass only")


class StepClock(Plugin):
    """Wall time from one step's start to the next's: everything a step costs, the loop included.

    Why beside the total: the median over steps ignores the bursts of load this machine's neighbours cause,
    which move a whole run's total by tens of per cent (docs/gradient_mixing.md, "Cost").
    """

    def __init__(self) -> None:
        super().__init__()
        self.starts: list[float] = []

    def before_training_iteration(self, strategy: Any, **kwargs: Any) -> None:
        self.starts.append(time.perf_counter())

    def intervals(self) -> list[float]:
        return [b - a for a, b in zip(self.starts, self.starts[1:])]


def time_training(kind: str, model_name: str, steps: int) -> tuple[float, float, list[float]]:
    """(CPU s, wall s, per-step wall s) of ``steps`` training steps of 32 new + 32 history samples (random
    tensors: the cost does not depend on the values), after an untimed first step."""
    build, shape = COST_MODELS[model_name]
    gen = torch.Generator().manual_seed(0)
    x = torch.rand((steps + 1) * BATCH, *shape, generator=gen)
    y = torch.randint(0, 10, (len(x),), generator=gen)
    history = HistoryLibrary(200, "reservoir", seed=0)
    history.update(TensorSamples(torch.rand(200, *shape, generator=gen), torch.randint(0, 10, (200,), generator=gen)))
    torch.manual_seed(0)
    model = build()
    plugins: list[Any] = {"replay": [], "mixing, two passes": [GradientMixingPlugin(gradient_pass="two_pass")],
                          "mixing, fused": [GradientMixingPlugin(gradient_pass="fused")],
                          "mixing, auto": [GradientMixingPlugin(gradient_pass="auto")],
                          "extra pass only": [ExtraPassOnly()]}[kind]
    clock = StepClock()
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.01), nn.CrossEntropyLoss(),
                      train_mb_size=BATCH, train_epochs=1, plugins=[*plugins, clock], history=history, seed=0,
                      shuffle=False)
    trainer.train(Experience(TensorSamples(x[:BATCH], y[:BATCH]), 0, list(range(10))))  # warm-up step
    exp = Experience(TensorSamples(x[BATCH:], y[BATCH:]), 1, list(range(10)))
    clock.starts = []
    cpu, wall = time.process_time(), time.perf_counter()
    trainer.train(exp)
    return time.process_time() - cpu, time.perf_counter() - wall, clock.intervals()


def cost_part(args: argparse.Namespace) -> dict[str, Any]:
    out = {}
    for model_name, steps in args.cost_models:
        for kind in COST_KINDS:  # warm-up
            time_training(kind, model_name, 2)
        samples: dict[str, list[tuple[float, float]]] = {k: [] for k in COST_KINDS}
        step_s: dict[str, list[float]] = {k: [] for k in COST_KINDS}
        for _ in range(args.repeats):
            for kind in COST_KINDS:  # interleaved, so load changes hit all of them alike
                cpu, wall, intervals = time_training(kind, model_name, steps)
                samples[kind].append((cpu, wall))
                step_s[kind] += intervals
        med = {k: (statistics.median(c for c, _ in v), statistics.median(w for _, w in v)) for k, v in samples.items()}
        rep = med["replay"]
        out[model_name] = {
            "steps": steps, "cpu_s": {k: v[0] for k, v in med.items()}, "wall_s": {k: v[1] for k, v in med.items()},
            "over_replay_cpu": {k: v[0] / rep[0] for k, v in med.items()},
            "over_replay_wall": {k: v[1] / rep[1] for k, v in med.items()},
            "all_cpu_s": {k: [c for c, _ in v] for k, v in samples.items()},
            # each repetition's own ratio (the kinds of one repetition ran back to back): the spread
            "paired_ratio_cpu": {k: [c / r for (c, _), (r, _) in zip(v, samples["replay"])] for k, v in samples.items()},
            # the median step (wall), every step of every repetition: robust to bursts of load
            "median_step_s": {k: statistics.median(v) for k, v in step_s.items()},
            "median_step_ratio": {k: statistics.median(v) / statistics.median(step_s["replay"]) for k, v in step_s.items()},
        }
        log(f"  cost {model_name} done", args.quiet)
    return out


def print_cost_table(out: dict[str, Any]) -> list[str]:
    lines = ["", "Training time per step, 32 new + 32 history samples, median of interleaved repeats, one thread; "
                 "ratio to replay: CPU time (wall)",
             f"{'model':42s} | {'replay ms':>9s} | " + " | ".join(f"{k:>22s}" for k in COST_KINDS[1:])]
    for name, r in out.items():
        cells = [f"{1000 * r['cpu_s'][k] / r['steps']:7.1f} ms {r['over_replay_cpu'][k]:4.2f}x ({r['over_replay_wall'][k]:4.2f})"
                 for k in COST_KINDS[1:]]
        lines.append(f"{name:42s} | {1000 * r['cpu_s']['replay'] / r['steps']:9.1f} | " + " | ".join(f"{c:>22s}" for c in cells))
        steps_ms = ", ".join(f"{k} {1000 * r['median_step_s'][k]:.2f} ms ({r['median_step_ratio'][k]:.2f}x)"
                             for k in COST_KINDS)
        lines.append(f"{'':42s}   median step: {steps_ms}")
        spread = r["paired_ratio_cpu"]["mixing, auto"]
        lines.append(f"{'':42s}   auto / replay within one repetition: {min(spread):.2f}x - {max(spread):.2f}x "
                     f"over {len(spread)} repetitions")
    log("\n".join(lines), QUIET)
    return lines


# 3b. The floor: where a ghost step's time goes, hand-written, no loop and no plugin
# ==================================================================================================

FLOOR_PHASES = {"replay": ("forward", "loss", "backward", "optimizer step"),
                "ghost": ("forward", "loss", "backward to outputs", "Gram matrices", "weighted gradients",
                          "optimizer step"),
                "sum + history rows": ("forward", "loss", "backward", "history rows' Gram", "|g|^2",
                                       "conflict correction", "optimizer step")}


def floor_part(args: argparse.Namespace) -> dict[str, Any]:
    """Median time of each phase of a minimal replay step and a minimal ghost step (the default rule:
    DER's logit term in the history loss), interleaved step by step on the benchmark MLP, 32 + 32 samples.

    Why: the loop's ratio mixes the method's own work with the loop's and the plugin's bookkeeping; this
    shows what the method costs with none of it, i.e. what no implementation of it can go below.
    """
    import torch.nn.functional as F

    from incremental.linear_gradients import (
        LinearCapture, group_gram, output_gradients, views_by_param, weighted_gradients_into,
    )
    from strategies.mixing_rules import Geometry, WeightRule, weights_similarity, with_history_weight

    build, shape = COST_MODELS[next(iter(COST_MODELS))]
    torch.manual_seed(0)
    model = build()
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=0.01)
    capture = LinearCapture(model)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.rand(2 * BATCH, *shape, generator=gen), torch.randint(0, 10, (2 * BATCH,), generator=gen)
    stored = torch.randn(BATCH, 10, generator=gen)
    out_bufs = [torch.empty_like(p) for p in params]
    views = views_by_param(params, out_bufs)
    times: dict[str, dict[str, list[float]]] = {k: {p: [] for p in v} for k, v in FLOOR_PHASES.items()}

    def replay_step() -> list[float]:
        t = [time.perf_counter()]
        opt.zero_grad()
        out = model(x)
        t.append(time.perf_counter())
        loss = F.cross_entropy(out, y)
        t.append(time.perf_counter())
        loss.backward()
        t.append(time.perf_counter())
        opt.step()
        t.append(time.perf_counter())
        return t

    def joint_losses(t: list[float]) -> torch.Tensor:
        """Both mixing steps start alike: one forward over the joint minibatch with the linear layers
        recorded, then ``loss_h + loss_t`` (transfer rows first; the history loss with DER's logit term);
        the phase boundaries go into ``t``."""
        opt.zero_grad()
        capture.start()
        out = model(x)
        capture.stop()
        t.append(time.perf_counter())
        loss_t = F.cross_entropy(out[:BATCH], y[:BATCH])
        loss_h = F.cross_entropy(out[BATCH:], y[BATCH:]) + 0.3 * F.mse_loss(out[BATCH:], stored)
        t.append(time.perf_counter())
        return loss_h + loss_t

    def step_with(grads: Sequence[torch.Tensor], t: list[float]) -> list[float]:
        """Both mixing steps end alike: the mixed gradient becomes ``.grad``, the step's records go, the
        optimizer steps (its own phase)."""
        for p, g in zip(params, grads):
            p.grad = g
        capture.records = []
        t.append(time.perf_counter())
        opt.step()
        t.append(time.perf_counter())
        return t

    def ghost_step(rule: WeightRule = weights_similarity) -> list[float]:
        t = [time.perf_counter()]
        dz = output_gradients(joint_losses(t), capture.records)
        t.append(time.perf_counter())
        (sq_h, dot), (_, sq_t) = group_gram(capture.records, dz, BATCH).tolist()
        t.append(time.perf_counter())
        w_h, w_t = rule(Geometry(dot, sq_h, sq_t))  # as the plugin's ghost step does
        weights = torch.full((2 * BATCH,), w_h)
        weights[:BATCH] = w_t
        weighted_gradients_into(views, capture.records, dz, weights)
        return step_with(out_bufs, t)

    def sum_step(rule: WeightRule = weights_similarity) -> list[float]:
        """The other exact construction: autograd's own backward of ``loss_h + loss_t`` gives the summed
        gradient ``G = g_h + g_t`` and, in the same pass, every layer's output gradients; the history rows'
        block of the Gram matrices (half of ``N x N``) gives ``|g_h|^2`` and ``g_h.G``, so ``g_h.g_t =
        g_h.G - |g_h|^2``; ``|g_t|^2`` from ``|G|^2``; only a conflict step adds ``(w_h - w_t) g_h``."""
        t = [time.perf_counter()]
        total = joint_losses(t)
        records = capture.records
        grads = torch.autograd.grad(total, [r.z for r in records] + params)
        dz, summed = grads[:len(records)], grads[len(records):]
        t.append(time.perf_counter())
        block = None
        for r, d in zip(records, dz):
            inner = d[BATCH:] @ d.T
            inner *= torch.addmm(torch.ones(()), r.x[BATCH:], r.x.T)
            block = inner if block is None else block.add_(inner)
        sq_h, h_dot_sum = block[:, BATCH:].sum().item(), block.sum().item()
        t.append(time.perf_counter())
        sq_sum = float(torch.stack(torch._foreach_norm(summed)).square().sum())
        t.append(time.perf_counter())
        dot = h_dot_sum - sq_h
        w_h, w_t = rule(Geometry(dot, sq_h, sq_sum - 2 * h_dot_sum + sq_h))
        if w_h != w_t:
            if w_t != 1.0:
                torch._foreach_mul_(summed, w_t)
            for r, d in zip(records, dz):
                rows = d[BATCH:]
                summed[index[id(r.module.weight)]].addmm_(rows.T, r.x[BATCH:], alpha=w_h - w_t)
                summed[index[id(r.module.bias)]].add_(rows.sum(0), alpha=w_h - w_t)
        return step_with(summed, t)

    index = {id(p): i for i, p in enumerate(params)}
    steps = {"replay": replay_step, "ghost": ghost_step, "sum + history rows": sum_step}
    # Both constructions must give the same mixed gradient, or timing them side by side means nothing:
    # one step of each at lr 0 (the model stays put, .grad keeps the step's gradient), with the default
    # rule and with history_weight 3 (w_h != w_t on every step: the correction path runs).
    opt.param_groups[0]["lr"] = 0.0
    difference = 0.0
    for rule in (with_history_weight(weights_similarity, 3.0), weights_similarity):
        mixed = []
        for kind in ("ghost", "sum + history rows"):
            steps[kind](rule)
            mixed.append(torch.cat([p.grad.flatten() for p in params]))
        difference = max(difference, float((mixed[0] - mixed[1]).abs().max() / mixed[0].abs().max()))
    opt.param_groups[0]["lr"] = 0.01
    n = args.floor_steps
    for i in range(n + n // 5):  # the first fifth warms up
        for kind, step in steps.items():
            t = step()
            if i >= n // 5:
                for phase, a, b in zip(FLOOR_PHASES[kind], t, t[1:]):
                    times[kind][phase].append(1e6 * (b - a))
    capture.remove()
    med = {k: {p: statistics.median(v) for p, v in phases.items()} for k, phases in times.items()}
    totals = {k: sum(v.values()) for k, v in med.items()}
    ratios = {k: v / totals["replay"] for k, v in totals.items() if k != "replay"}
    return {"steps": n, "phase_us": med, "total_us": totals, "ratio": ratios["ghost"], "ratios": ratios,
            "sum_vs_ghost_relative_difference": difference}


def print_floor_table(out: dict[str, Any]) -> list[str]:
    lines = ["", f"The floor: phases of a hand-written step, MLP 784-256-256-10, 32 + 32 samples, median over "
                 f"{out['steps']} interleaved steps (us)"]
    for kind, phases in out["phase_us"].items():
        cells = ", ".join(f"{p} {v:.0f}" for p, v in phases.items())
        lines.append(f"  {kind:7s} {out['total_us'][kind]:6.0f} = {cells}")
    lines += [f"  {kind} / replay: {ratio:.2f}x" for kind, ratio in out["ratios"].items()]
    lines.append(f"  both mixed gradients agree to {out['sum_vs_ghost_relative_difference']:.1e} of the largest entry")
    log("\n".join(lines), QUIET)
    return lines


# ==================================================================================================
# 4. Insertion cost of the gradient-diversity library
# ==================================================================================================

class _ScoringStrategy:
    def __init__(self, model: nn.Module) -> None:
        self.model, self._criterion, self.device = model, nn.CrossEntropyLoss(), torch.device("cpu")


def insertion_part(args: argparse.Namespace) -> dict[str, Any]:
    digits = split_digits(N_EXP, seed=0)
    total = sum(len(e.dataset) for e in digits.train_stream)
    out = {}
    policies: list[tuple[str, Callable[[], Any]]] = [(name, lambda name=name: name) for name in
                                                     ("reservoir", "class_balanced", "herding", "loss_stratified")]
    for label, make in policies:
        times = []
        for _ in range(3):
            torch.manual_seed(0)
            strategy = _ScoringStrategy(MLP(64, 256, 10))
            library = HistoryLibrary(200, make(), seed=0)
            start = time.perf_counter()
            for exp in digits.train_stream:
                library.update(exp.dataset, strategy=strategy)
            times.append(time.perf_counter() - start)
        out[label] = {"samples_per_s": total / statistics.median(times), "seconds": statistics.median(times),
                      "samples": total}
    return out


def print_insertion_table(out: dict[str, Any]) -> list[str]:
    total = next(iter(out.values()))["samples"] if out else 0
    lines = ["", f"History library insertion (Split Digits, {total} samples offered to a library of 200, MLP 64-256-10)",
             f"{'policy':42s} | samples/s | seconds"]
    for label, r in out.items():
        lines.append(f"{label:42s} | {r['samples_per_s']:9.0f} | {r['seconds']:7.3f}")
    log("\n".join(lines), QUIET)
    return lines


# ==================================================================================================
# 5. Stale gradients
# ==================================================================================================

class StaleProbe(Plugin):
    """Counts steps whose .grad (at before_update) differs from the gradient the step should use."""

    def __init__(self, mixing: GradientMixingPlugin | None = None) -> None:
        super().__init__()
        self.mixing = mixing
        self.steps = 0
        self.stale = 0

    def before_training_iteration(self, strategy: Any, **kwargs: Any) -> None:
        self._model = copy.deepcopy(strategy.model)
        self._batch = [t.clone() for t in strategy.mbatch[:2]]

    def before_update(self, strategy: Any, **kwargs: Any) -> None:
        params = [p for p in self._model.parameters()]
        ce = nn.CrossEntropyLoss()
        loss_t = ce(self._model(self._batch[0]), self._batch[1])
        expected = flatten_grads(torch.autograd.grad(loss_t, params), params)
        history = None
        if self.mixing is not None:
            history = self.mixing.last_history_batch
        if history is not None:
            loss_h = ce(self._model(history[0]), history[1])
            g_h = flatten_grads(torch.autograd.grad(loss_h, params), params)
            expected = mix(self.mixing.rule_name, g_h, expected, loss_h, loss_t).grad
        actual = flatten_grads([p.grad for p in strategy.model.parameters()], list(strategy.model.parameters()))
        self.steps += 1
        self.stale += int(not torch.equal(actual, expected))


def stale_part(args: argparse.Namespace) -> dict[str, Any]:
    from avalanche.training import GSS_greedy, Naive
    from avalanche.training.plugins import EvaluationPlugin

    bench, ours = avalanche_benchmark(0)
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        common = lambda m, plugins: dict(model=m, optimizer=torch.optim.SGD(m.parameters(), lr=LR),  # noqa: E731
                                         criterion=nn.CrossEntropyLoss(), train_mb_size=BATCH, train_epochs=1,
                                         plugins=plugins, evaluator=EvaluationPlugin(loggers=[]))
        torch.manual_seed(0)
        probe = StaleProbe()
        model = MLP(64, 256, 10)
        gss = GSS_greedy(mem_size=200, mem_strength=5, input_size=[64], **common(model, [probe]))
        for exp in bench.train_stream[:3]:
            gss.train(exp)
        out["avalanche GSS_greedy"] = {"stale_steps": probe.stale, "steps": probe.steps}
        torch.manual_seed(0)
        model = MLP(64, 256, 10)
        plugin = GradientMixingPlugin("similarity", mem_size=200)
        probe = StaleProbe(plugin)
        naive = Naive(**common(model, [plugin, probe]))
        for exp in bench.train_stream[:3]:
            naive.train(exp)
        out["GradientMixingPlugin in avalanche Naive"] = {"stale_steps": probe.stale, "steps": probe.steps}
    torch.manual_seed(0)
    model = MLP(64, 256, 10)
    plugin = GradientMixingPlugin("similarity")
    probe = StaleProbe(plugin)

    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=LR), nn.CrossEntropyLoss(), train_mb_size=BATCH,
                      train_epochs=1, plugins=[plugin, probe], history=HistoryLibrary(200, "reservoir", seed=0), seed=0)
    trainer.train(ours.train_stream[:3])
    out["GradientMixingPlugin in our Trainer"] = {"stale_steps": probe.stale, "steps": probe.steps}
    return out


def print_stale_table(out: dict[str, Any]) -> list[str]:
    lines = ["", "Stale gradients (Split Digits experiences 0-2, 1 epoch): steps whose gradient at the optimizer step "
                 "differs from the intended one",
             f"{'strategy':42s} | stale steps / steps"]
    for label, r in out.items():
        lines.append(f"{label:42s} | {r['stale_steps']:5d} / {r['steps']}")
    log("\n".join(lines), QUIET)
    return lines


# ==================================================================================================

def _hide_avalanche_warnings() -> None:
    """Drop Avalanche's own deprecation / "no loggers" warnings (its ``deprecated`` decorator resets the
    warning filters, so only the display hook can silence it); other warnings still show."""
    show = warnings.showwarning

    def hide(message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
        if "avalanche" not in str(filename):
            show(message, category, filename, lineno, file, line)

    warnings.showwarning = hide


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 seed, memory 200, shots 10, short")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--mems", type=int, nargs="+", default=[200, 500])
    parser.add_argument("--shots", type=int, nargs="+", default=[5, 10, 25, 50])
    parser.add_argument("--steps", type=int, default=800, help="adaptation steps on the transfer scene")
    parser.add_argument("--transfer-mem", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=7, help="timing repetitions")
    parser.add_argument("--cost-models", dest="cost_which", nargs="+", choices=["mlp", "resnet"], default=["mlp", "resnet"],
                        help="models of the cost part")
    parser.add_argument("--cost-steps", type=int, default=200, help="timed steps per repetition (MLP; resnet: a tenth)")
    parser.add_argument("--floor-steps", type=int, default=1000, help="interleaved steps of the floor part")
    parts = ["split", "transfer", "fashion_transfer", "cost", "floor", "insertion", "stale"]
    parser.add_argument("--parts", nargs="+", default=parts, choices=parts)
    parser.add_argument("--fashion-shots", type=int, nargs="+", default=[10])
    parser.add_argument("--fashion-rules", nargs="*", default=[], type=fashion_rule,
                        help="gradient mixing rules run on fashion_transfer beside the default: RULE or "
                             "RULE:LOGIT_WEIGHT (e.g. similarity_der:1.0)")
    parser.add_argument("--transfer-grad-clip", type=float, default=None,
                        help="clip every transfer run's gradient norm to this (all strategies alike)")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/gradient_mixing[_quick].json)")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    args.cost_models = [(name, steps) for name, steps, key in zip(COST_MODELS, (args.cost_steps, max(4, args.cost_steps // 10)),
                                                                  ("mlp", "resnet")) if key in args.cost_which]
    global EPOCHS, QUIET, TRANSFER_GRAD_CLIP
    QUIET = args.quiet
    TRANSFER_GRAD_CLIP = args.transfer_grad_clip
    FASHION_RULES[:] = args.fashion_rules
    if args.quick:
        EPOCHS = 3
        args.seeds, args.mems, args.shots, args.steps, args.repeats = [0], [200], [10], 100, 2
        args.cost_models = [(next(iter(COST_MODELS)), 20)]
        args.floor_steps = 50
    torch.set_num_threads(1)
    _hide_avalanche_warnings()
    out_path = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / (
        "gradient_mixing_quick.json" if args.quick else "gradient_mixing.json")

    results: dict[str, Any] = {"settings": {k: v for k, v in vars(args).items() if k not in ("out", "quiet")}}
    lines: list[str] = []
    start = time.perf_counter()
    if "split" in args.parts:
        results["split_digits"] = split_digits_part(args)
        lines += print_split_table(results["split_digits"], args.mems)
    if "transfer" in args.parts:
        results["digits_transfer"] = transfer_part(args, "digits_transfer", args.shots)
        lines += print_transfer_table(results["digits_transfer"], "digits_transfer", args.steps, args.transfer_mem)
    if "fashion_transfer" in args.parts:
        results["fashion_transfer"] = transfer_part(args, "fashion_transfer", args.fashion_shots)
        lines += print_transfer_table(results["fashion_transfer"], "fashion_transfer", args.steps, args.transfer_mem)
    if "cost" in args.parts:
        results["cost"] = cost_part(args)
        lines += print_cost_table(results["cost"])
    if "floor" in args.parts:
        results["cost_floor"] = floor_part(args)
        lines += print_floor_table(results["cost_floor"])
    if "insertion" in args.parts:
        results["insertion"] = insertion_part(args)
        lines += print_insertion_table(results["insertion"])
    if "stale" in args.parts:
        results["stale_gradients"] = stale_part(args)
        lines += print_stale_table(results["stale_gradients"])
    results["total_time_s"] = time.perf_counter() - start
    results["tables"] = lines
    write_json(out_path, results)
    log(f"\ntotal {results['total_time_s']:.0f} s; wrote {out_path}", args.quiet)
    return results


if __name__ == "__main__":
    main()
