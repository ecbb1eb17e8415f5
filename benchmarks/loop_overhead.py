"""Loop overhead: this project's Trainer against a hand-written PyTorch loop and Avalanche, side by side.

The task (issue 2): Split Digits (load_digits, 5 experiences of 2 classes), MLP 64-256-10, SGD lr 0.05,
3 epochs, batch 32, the full test stream evaluated after each experience, 1 torch thread; without
replay and with a 200-sample reservoir replay (32 history samples per step, as Avalanche's replay).
The three implementations run interleaved (plain, ours, Avalanche, plain, ...) so that machine noise
hits all of them alike; the table reports medians and ratios.

The second table (issue 18) is the cost of experiment tracking on the quickstart (configs/quickstart.yaml:
gradient mixing, 5 experiences, 10 epochs): the same run with no logger, with the default CSV logs, with
CSV + TensorBoard and with CSV + W&B offline (when installed), interleaved. ``train s`` is the time of
training and evaluating all experiences with the tracker attached (what the loggers add to a run while it
trains), wall and this process's CPU time; ``setup s`` (building the loggers: imports, files, the W&B
service) and ``close s`` are shown apart, once per run. On a machine shared with other jobs the side-by-side
ratios move by several percent between invocations, so the table also gives ``tracking``: the CPU time of
the tracker and loggers alone, replayed on the quickstart's call sequence with a stand-in strategy (min over
repeats), as a fraction of the fastest untracked run.

    python benchmarks/loop_overhead.py [--repeats 7] [--only loop|logging] [--out benchmarks/results/loop_overhead.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from incremental.buffer import HistoryLibrary  # noqa: E402
from incremental.io import write_json  # noqa: E402
from incremental.models import MLP  # noqa: E402
from incremental.scenarios.digits import load_digits_arrays, split_digits, stratified_split  # noqa: E402
from incremental.trainer import Trainer  # noqa: E402

EPOCHS, BATCH, LR, EVAL_BATCH, N_EXP = 3, 32, 0.05, 512, 5


def plain_loop(seed: int, mem: int) -> float:
    """The same work written directly in PyTorch: shuffled slices, optional reservoir replay."""
    bench = split_digits(N_EXP, seed=0)
    torch.manual_seed(seed)
    model = MLP(64, 256, 10)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(seed)
    buf_x = torch.empty(0, 64)
    buf_y = torch.empty(0, dtype=torch.long)
    seen = 0
    start = time.perf_counter()
    for exp in bench.train_stream:
        x, y = exp.dataset.x, exp.dataset.y
        n = len(x)
        hist_order, hist_pos = None, 0
        for _ in range(EPOCHS):
            order = torch.randperm(n, generator=gen)
            for s in range(0, n, BATCH):
                idx = order[s : s + BATCH]
                xb, yb = x[idx], y[idx]
                if len(buf_x):
                    if hist_order is None or hist_pos >= len(buf_x):
                        hist_order, hist_pos = torch.randperm(len(buf_x), generator=gen), 0
                    hidx = hist_order[hist_pos : hist_pos + BATCH]
                    hist_pos += BATCH
                    xb, yb = torch.cat([xb, buf_x[hidx]]), torch.cat([yb, buf_y[hidx]])
                opt.zero_grad()
                loss = loss_fn(model(xb), yb)
                loss.backward()
                opt.step()
        if mem:
            for i in range(n):  # reservoir sampling
                seen += 1
                if len(buf_x) < mem:
                    buf_x, buf_y = torch.cat([buf_x, x[i : i + 1]]), torch.cat([buf_y, y[i : i + 1]])
                else:
                    j = int(torch.randint(0, seen, (1,), generator=gen))
                    if j < mem:
                        buf_x[j], buf_y[j] = x[i], y[i]
        model.eval()
        with torch.no_grad():
            for test in bench.test_stream:
                tx, ty = test.dataset.x, test.dataset.y
                correct = 0
                for s in range(0, len(tx), EVAL_BATCH):
                    correct += int((model(tx[s : s + EVAL_BATCH]).argmax(1) == ty[s : s + EVAL_BATCH]).sum())
        model.train()
    return time.perf_counter() - start


def ours(seed: int, mem: int) -> float:
    bench = split_digits(N_EXP, seed=0)
    torch.manual_seed(seed)
    model = MLP(64, 256, 10)
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=LR), nn.CrossEntropyLoss(),
                      train_mb_size=BATCH, train_epochs=EPOCHS, eval_mb_size=EVAL_BATCH,
                      history=HistoryLibrary(mem, "reservoir", seed=seed) if mem else None, seed=seed)
    start = time.perf_counter()
    for exp in bench.train_stream:
        trainer.train(exp)
        trainer.eval(bench.test_stream)
    return time.perf_counter() - start


def avalanche_benchmark():
    """The same split built with Avalanche's own class_incremental_benchmark."""
    from avalanche.benchmarks.scenarios.supervised import class_incremental_benchmark
    from avalanche.benchmarks.utils.classification_dataset import (
        _make_taskaware_tensor_classification_dataset as tensor_dataset,
    )

    x, y = load_digits_arrays()
    train_idx, test_idx = stratified_split(y, 0.3, 0)
    X, Y = torch.from_numpy(x), torch.from_numpy(y)

    def make(idx):
        return tensor_dataset(X[idx], Y[idx], task_labels=0, targets=Y[idx])

    return class_incremental_benchmark({"train": make(train_idx), "test": make(test_idx)},
                                       class_order=list(range(10)), num_experiences=N_EXP)


def avalanche(seed: int, mem: int) -> float:
    from avalanche.evaluation.metrics import accuracy_metrics
    from avalanche.training import Naive, Replay
    from avalanche.training.plugins import EvaluationPlugin

    bench = avalanche_benchmark()
    torch.manual_seed(seed)
    model = MLP(64, 256, 10)
    # Accuracy per experience (what we compute too), no loggers: the cheapest honest evaluator.
    evaluator = EvaluationPlugin(accuracy_metrics(experience=True), loggers=[])
    common = dict(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=LR), criterion=nn.CrossEntropyLoss(),
                  train_mb_size=BATCH, train_epochs=EPOCHS, eval_mb_size=EVAL_BATCH, evaluator=evaluator)
    strategy = Replay(mem_size=mem, **common) if mem else Naive(**common)
    start = time.perf_counter()
    for exp in bench.train_stream:
        strategy.train(exp)
        strategy.eval(bench.test_stream)
    return time.perf_counter() - start


LOGGING_VARIANTS: dict[str, dict] = {
    "none": {"csv": False},
    "csv": {"csv": True},
    "csv+tensorboard": {"csv": True, "tensorboard": True},
    "csv+wandb offline": {"csv": True, "wandb": {"project": "loop-overhead", "mode": "offline"}},
}


def quickstart_with_logging(logging: dict, out: Path, seed: int) -> dict[str, float]:
    """One quickstart run with the given ``logging:`` section: seconds for setup, train+eval (wall and
    this process's CPU time), close."""
    import dataclasses

    from incremental.cli import prepare_run
    from incremental.tracking import build_tracker

    runner_mod, cfg, _ = prepare_run(str(ROOT / "configs" / "quickstart.yaml"), [f"seed={seed}", f"logging={logging}"])
    run = runner_mod.ClassificationRun(cfg)
    t0 = time.perf_counter()
    tracker = build_tracker(cfg.logging, out, run.trainer, config=dataclasses.asdict(cfg), n_experiences=run.n_experiences)
    t1, c1 = time.perf_counter(), time.process_time()
    for i in range(run.n_experiences):
        run.step(i)
        tracker.log_eval(i, run.last_eval, run.accuracy_matrix)
    t2, c2 = time.perf_counter(), time.process_time()
    tracker.close()
    t3 = time.perf_counter()
    return {"setup": t1 - t0, "train": t2 - t1, "train_cpu": c2 - c1, "close": t3 - t2}


class _Clock:
    def __init__(self) -> None:
        self.train_iterations = self.train_exp_counter = self.train_exp_epochs = 0


class _Experience:
    def __init__(self, i: int) -> None:
        self.current_experience = i


class _MixingStats:
    """Stands in for gradient mixing's per-iteration statistics (a row per iteration from experience 1)."""

    def __init__(self) -> None:
        self.stats: dict[int, list[dict[str, float]]] = {}


def replay_tracking(logging: dict, out: Path, n_exp: int = 5, epochs: int = 10, iters: int = 8) -> float:
    """CPU seconds the tracker and loggers spend on a quickstart-shaped run (5 x 10 x 8 iterations, the
    gradient-mixing statistics, 5 evaluations), with everything else (the training) left out: the
    tracking work alone, replayed through the real Tracker and loggers with a stand-in strategy."""
    from incremental.tracking import LoggingConfig, Tracker, build_loggers
    from incremental.config import from_dict

    cfg = from_dict(LoggingConfig, logging)
    if not (cfg.csv or cfg.tensorboard or (cfg.wandb is not None and cfg.wandb.mode != "disabled")):
        return 0.0  # no logger: no tracker is attached to the loop at all
    losses = [torch.tensor(1.0 / (k + 1)) for k in range(n_exp * epochs * iters)]
    batch = (torch.zeros(32, 64), torch.zeros(32, dtype=torch.long), torch.zeros(32, dtype=torch.long))
    mixing = _MixingStats()
    strategy = type("Strategy", (), {})()
    strategy.clock, strategy.mbatch, strategy.plugins, strategy.loss_terms = _Clock(), batch, [mixing], None
    results = {j: {"accuracy": 0.9, "loss": 0.3, "count": 100} for j in range(n_exp)}
    row = {"similarity": -0.5, "w_h": 2.0, "w_t": 1.0, "norm_h": 0.5, "norm_t": 1.0, "loss_h": 0.1, "loss_t": 0.4, "conflict": 1.0}
    tracker = Tracker(build_loggers(cfg, out, n_experiences=n_exp))  # setup: measured apart
    start = time.process_time()
    tracker.before_training(strategy)
    clock, matrix = strategy.clock, []
    for e in range(n_exp):
        strategy.experience = _Experience(e)
        tracker.before_training_exp(strategy)
        clock.train_exp_epochs = 0
        for _ in range(epochs):
            tracker.before_training_epoch(strategy)
            for _ in range(iters):
                strategy.loss = losses[clock.train_iterations]
                strategy.loss_terms = {"loss": strategy.loss}
                if e:
                    mixing.stats.setdefault(e, []).append(dict(row))
                tracker.before_backward(strategy)
                tracker.after_training_iteration(strategy)
                clock.train_iterations += 1
            tracker.after_training_epoch(strategy)
            clock.train_exp_epochs += 1
        tracker.after_training_exp(strategy)
        clock.train_exp_counter += 1
        matrix.append([0.9] * n_exp)
        tracker.log_eval(e, results, matrix)
    seconds = time.process_time() - start
    tracker.close()
    return seconds


def logging_table(repeats: int) -> dict:
    """Wall time and CPU time of this process (W&B's service process not included in the latter): on a
    machine shared with other jobs, CPU time is the steadier measure of what the loggers add."""
    import importlib.util
    import tempfile

    variants = {k: v for k, v in LOGGING_VARIANTS.items()
                if "wandb" not in v or importlib.util.find_spec("wandb") is not None}
    parts = ("setup", "train", "train_cpu", "close")
    times: dict[str, dict[str, list[float]]] = {k: {p: [] for p in parts} for k in variants}
    with tempfile.TemporaryDirectory() as tmp:
        for name, logging in variants.items():  # warm-up: imports, first-call costs
            quickstart_with_logging(logging, Path(tmp) / "warmup" / name.replace(" ", "_"), 0)
        for r in range(repeats):
            for name, logging in variants.items():
                t = quickstart_with_logging(logging, Path(tmp) / f"{name.replace(' ', '_')}_{r}", r)
                for part, value in t.items():
                    times[name][part].append(value)
    med = {k: {part: statistics.median(v) for part, v in ps.items()} for k, ps in times.items()}

    def paired(name: str, part: str) -> float:  # median over repeats of (variant / none) in the same repeat
        return statistics.median(a / b for a, b in zip(times[name][part], times["none"][part]))

    # The tracking work alone (stand-in strategy), min over repeats, against the fastest untracked run.
    with tempfile.TemporaryDirectory() as tmp:
        replay = {k: min(replay_tracking(v, Path(tmp) / f"{k.replace(' ', '_')}_{r}") for r in range(repeats))
                  for k, v in variants.items()}
    fastest = min(times["none"]["train_cpu"])
    rows = [{"logging": k, "median_s": med[k], "train_over_none": paired(k, "train"),
             "train_cpu_over_none": paired(k, "train_cpu"), "tracking_cpu_s": replay[k],
             "tracking_over_train_cpu": replay[k] / fastest, "all_s": times[k]} for k in variants]
    print(f"{'logging':>18} | {'train s':>8} {'/ none':>7} | {'CPU s':>7} {'/ none':>7} | {'tracking':>8} {'/ train':>7} "
          f"| {'setup s':>8} {'close s':>8}")
    for row in rows:
        m = row["median_s"]
        print(f"{row['logging']:>18} | {m['train']:8.3f} {row['train_over_none']:7.3f} | {m['train_cpu']:7.3f} "
              f"{row['train_cpu_over_none']:7.3f} | {1000 * row['tracking_cpu_s']:6.1f}ms {100 * row['tracking_over_train_cpu']:6.1f}% "
              f"| {m['setup']:8.3f} {m['close']:8.3f}")
    return {"task": "configs/quickstart.yaml (gradient mixing, 5 experiences x 10 epochs, 400 iterations), 1 thread",
            "repeats": repeats, "ratios": "median over repeats of variant / none in the same repeat",
            "tracking": "CPU time of the tracker and loggers alone on the same call sequence (min over repeats), "
                        "over the fastest untracked run's train CPU time", "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--only", choices=("loop", "logging"), help="run one table (the other is kept from --out)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "loop_overhead.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    previous = json.loads(Path(args.out).read_text()) if Path(args.out).is_file() else {}
    if args.only == "logging":
        result = {**previous, "logging": logging_table(args.repeats)}
        write_json(args.out, result)
        print(f"wrote {args.out}")
        return
    runners = {"plain": plain_loop, "ours": ours, "avalanche": avalanche}
    rows = []
    for mem in (0, 200):
        for fn in runners.values():  # warm-up (imports, allocator, first-call costs)
            fn(0, mem)
        times: dict[str, list[float]] = {k: [] for k in runners}
        for r in range(args.repeats):
            for name, fn in runners.items():
                times[name].append(fn(r, mem))
        med = {k: statistics.median(v) for k, v in times.items()}
        rows.append({
            "replay_mem": mem,
            "median_s": med,
            "all_s": times,
            "ours_over_plain": med["ours"] / med["plain"],
            "ours_over_avalanche": med["ours"] / med["avalanche"],
            "avalanche_over_plain": med["avalanche"] / med["plain"],
        })
    print(f"{'replay':>7} | {'plain s':>8} {'ours s':>8} {'aval. s':>8} | {'ours/plain':>10} {'ours/aval.':>10} {'aval./plain':>11}")
    for row in rows:
        m = row["median_s"]
        print(f"{row['replay_mem']:>7} | {m['plain']:8.3f} {m['ours']:8.3f} {m['avalanche']:8.3f} | "
              f"{row['ours_over_plain']:10.2f} {row['ours_over_avalanche']:10.2f} {row['avalanche_over_plain']:11.2f}")
    result = {"task": "split digits 5x2, MLP 64-256-10, SGD 0.05, 3 epochs, batch 32, 1 thread",
              "repeats": args.repeats, "rows": rows}
    if args.only != "loop":
        result["logging"] = logging_table(args.repeats)
    elif "logging" in previous:
        result["logging"] = previous["logging"]
    write_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
