"""What the non-finite loss guard costs the training loop: the same runs with and without it, interleaved.

The task is loop_overhead.py's: Split Digits (5 experiences of 2 classes), MLP 64-256-10, SGD lr 0.05,
3 epochs, batch 32, 1 torch thread, without replay and with a 200-sample reservoir. "off" replaces the
trainer's guard by one that does nothing; the runs alternate (on, off, on, ...) so machine noise hits
both alike. The guard keeps a detached view of each loss and reads them together every 50 steps.
Whole runs of this size differ by less than the machine's noise, so the guard's own cost per training
step is also timed directly (100,000 ``observe`` calls with their checks) and set against the loop's
measured time per step.

    python benchmarks/loss_guard_overhead.py [--repeats 9] [--out benchmarks/results/loss_guard_overhead.json]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from incremental.buffer import HistoryLibrary  # noqa: E402
from incremental.guards import LossGuard  # noqa: E402
from incremental.io import write_json  # noqa: E402
from incremental.models import MLP  # noqa: E402
from incremental.scenarios.digits import split_digits  # noqa: E402
from incremental.trainer import Trainer  # noqa: E402


class NoGuard:
    def start(self, experience: int) -> None: ...
    def observe(self, loss: torch.Tensor | None, iteration: int) -> None: ...
    def check(self) -> None: ...


def guard_cost_per_step(n: int = 100_000) -> float:
    """Seconds per ``observe`` call, the checks every 50 calls included."""
    guard = LossGuard()
    guard.start(0)
    loss = torch.tensor(0.5, requires_grad=True) * 1.0  # a loss with a graph, as in training
    start = time.perf_counter()
    for i in range(n):
        guard.observe(loss, i)
    guard.check()
    return (time.perf_counter() - start) / n


def train_once(guarded: bool, mem: int, seed: int) -> tuple[float, int]:
    bench = split_digits(5, seed=0)
    torch.manual_seed(seed)
    model = MLP(64, 256, 10)
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.05), nn.CrossEntropyLoss(), train_mb_size=32,
                      train_epochs=3, history=HistoryLibrary(mem, seed=seed) if mem else None, seed=seed)
    if not guarded:
        trainer.loss_guard = NoGuard()
    start = time.perf_counter()
    for experience in bench.train_stream:
        trainer.train(experience)
    return time.perf_counter() - start, trainer.clock.train_iterations


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/loss_guard_overhead.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    per_step = statistics.median(guard_cost_per_step() for _ in range(5))
    print(f"guard: {per_step * 1e6:.2f} us per training step (observe + a check every 50 steps)")
    results = {}
    for mem in (0, 200):
        times = {"on": [], "off": []}
        _, steps = train_once(True, mem, 0)  # warm-up
        for r in range(args.repeats):
            for name in ("on", "off") if r % 2 == 0 else ("off", "on"):
                times[name].append(train_once(name == "on", mem, r)[0])
        on, off = statistics.median(times["on"]), statistics.median(times["off"])
        share = per_step * steps / off
        results[f"mem_{mem}"] = {"median_s_guard_on": on, "median_s_guard_off": off, "ratio_on_off": on / off,
                                 "steps": steps, "loop_s_per_step": off / steps, "guard_share_of_loop": share,
                                 "times_s": times}
        print(f"replay memory {mem:3d}: guard on {on:.3f} s, off {off:.3f} s, ratio {on / off:.3f} (median of "
              f"{args.repeats}); {steps} steps of {off / steps * 1e3:.2f} ms: the guard is {100 * share:.2f}% of it")
    write_json(args.out, {"repeats": args.repeats, "torch_threads": 1, "guard_s_per_step": per_step, **results})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
