"""Loop overhead: this project's Trainer against a hand-written PyTorch loop and Avalanche, side by side.

The task (issue 2): Split Digits (load_digits, 5 experiences of 2 classes), MLP 64-256-10, SGD lr 0.05,
3 epochs, batch 32, the full test stream evaluated after each experience, 1 torch thread; without
replay and with a 200-sample reservoir replay (32 history samples per step, as Avalanche's replay).
The three implementations run interleaved (plain, ours, Avalanche, plain, ...) so that machine noise
hits all of them alike; the table reports medians and ratios.

    python benchmarks/loop_overhead.py [--repeats 7] [--out benchmarks/results/loop_overhead.json]
"""
from __future__ import annotations

import argparse
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "loop_overhead.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
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
    write_json(args.out, {"task": "split digits 5x2, MLP 64-256-10, SGD 0.05, 3 epochs, batch 32, 1 thread",
                          "repeats": args.repeats, "rows": rows})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
