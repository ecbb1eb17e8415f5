"""Real Split Fashion-MNIST: every strategy of this project, Avalanche's, and hand-written PyTorch loops.

Protocol (issue 11): the Fashion-MNIST IDX files (60,000 training / 10,000 test images), 5 experiences
of 2 classes, MLP 784-256-256-10, SGD lr 0.05, batch 32 (history / memory batch 32 wherever a strategy
has one), 1 and 3 epochs, memory 200 and 500, seeds 0, 1, 2, each seed with its own class order
(``scenario.shuffle_classes`` drawn by the seed). Every implementation trains on the same tensors (this
project's data path reads the files once per seed; Avalanche's benchmark and the hand-written loops get
the same train/test tensors and class order), the same model built from the same seed, one torch thread.

Strategies:
- this project: naive, replay, gradient mixing (rules / library policies given by ``--gm``), lwf, ewc,
  cumulative, joint, all through ``ClassificationRun`` (the code ``incremental run`` executes);
- Avalanche 0.6, unmodified: Naive, Replay, DER (DER++: alpha 0.1, beta 0.5), ER_ACE, AGEM
  (``patterns_per_exp = mem / 4``, so it holds ``mem`` samples while training the last experience),
  GSS_greedy (mem_strength 5), evaluated with Avalanche's own ``eval`` and accuracy metric;
- the practical limit: a hand-written PyTorch loop (naive) and a hand-written replay loop (reservoir,
  32 + 32 samples per step), evaluated by plain slicing.

Time: train + evaluation of the full test stream after every experience (data reading inside the loop
included; building the benchmark from the files is done once per seed and not counted, for anyone).
Runs of one (seed, epochs[, memory]) block run back to back, so ratios are taken inside a block and the
median over seeds is reported. Every finished run is appended to ``--log`` (JSON lines), so an
interrupted grid resumes where it stopped; ``--report`` rebuilds the tables from the log.

    python benchmarks/split_fashion_mnist.py                       # the full grid (~2 h on one core)
    python benchmarks/split_fashion_mnist.py --quick               # smoke run (seed 0, 1 epoch, memory 200)
    python benchmarks/split_fashion_mnist.py --report              # tables from the log only
    python benchmarks/split_fashion_mnist.py --draws 0 1 2 3 4 --gm similarity:reservoir   # library-draw spread
    python benchmarks/split_fashion_mnist.py --grad-clip 5 --seeds 0 1 2 3 4 5 6 7 --gm similarity_der:herding \
        --skip naive Naive lwf ewc cumulative joint hand-written AGEM GSS \
        --log benchmarks/results/split_fashion_mnist_8seeds_clip_runs.jsonl \
        --out benchmarks/results/split_fashion_mnist_8seeds_clip.json       # the README's table

A run that stops (the loss guard's divergence, the collapse guard) is scored as its model when it stopped,
repeated for the experiences it did not train, and counted as ``[n stopped]``; ``--grad-clip`` clips
every implementation alike. The report pairs the first ``--gm`` variant with every other run by seed.

Writes ``benchmarks/results/split_fashion_mnist.json`` (tables and per-run numbers) and
``split_fashion_mnist_accuracy.png``.
"""
from __future__ import annotations

import argparse
import functools
import json
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

from incremental.config import from_dict  # noqa: E402
from incremental.guards import DivergedError  # noqa: E402
from incremental.io import save_figure, write_json  # noqa: E402
from incremental.metrics import summarize  # noqa: E402
from incremental.models import MLP  # noqa: E402
from incremental.runners import classification  # noqa: E402
from incremental.scenarios.class_incremental import ClassIncremental, DataConfig, ScenarioConfig, build_benchmark  # noqa: E402

BATCH, LR, EVAL_BATCH, N_EXP, HIDDEN, LAYERS = 32, 0.05, 512, 5, 256, 2
RESULTS = ROOT / "benchmarks" / "results"
#: Memory-free strategies (run once per seed and epochs, listed under every memory).
NO_MEMORY = ("ours naive", "ours lwf", "ours ewc", "ours cumulative", "ours joint", "avalanche Naive", "hand-written naive")
AVALANCHE_REHEARSAL = ("Replay", "DER", "ER_ACE", "AGEM", "GSS_greedy")
#: Gradient-mixing variants run by default: ``rule:policy`` (``policy`` empty: the plugin's default).
DEFAULT_GM = ("similarity_der:herding", "similarity:reservoir")
#: ``--grad-clip``: the gradient-norm bound every implementation clips to before its optimizer step (None:
#: no clipping); a run with it is labelled ``<label> (clip N)``.
GRAD_CLIP: float | None = None


# --------------------------------------------------------------------------------------------------
# Data: read once per seed, shared by every implementation
# --------------------------------------------------------------------------------------------------

def scenario_options(seed: int) -> dict[str, Any]:
    return {"name": "split_fashion_mnist", "n_experiences": N_EXP, "shuffle_classes": True}


@functools.lru_cache(maxsize=1)
def benchmark(seed: int) -> ClassIncremental:
    return build_benchmark(from_dict(ScenarioConfig, scenario_options(seed)), DataConfig(), seed)


def _cached_build(cfg: ScenarioConfig, data: DataConfig, seed: int) -> ClassIncremental:
    """``ClassificationRun`` builds its benchmark from the files; every run of a seed gets the same one."""
    if cfg.name != "split_fashion_mnist" or not cfg.shuffle_classes:
        return build_benchmark(cfg, data, seed)
    return benchmark(seed)


classification.build_benchmark = _cached_build  # type: ignore[assignment]


def stacked(stream: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.cat([e.dataset.x for e in stream]), torch.cat([e.dataset.y for e in stream])


def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return MLP(28 * 28, HIDDEN, 10, hidden_layers=LAYERS)


# --------------------------------------------------------------------------------------------------
# This project
# --------------------------------------------------------------------------------------------------

def ours(strategy: str, seed: int, epochs: int, mem: int, rule: str | None = None, policy: str | None = None,
         draw: int | None = None, gradient_pass: str = "auto", lr: float = LR, **options: Any) -> dict[str, Any]:
    """One run through ClassificationRun; ``draw`` re-seeds only the history library's generator."""
    cfg = classification.config_from({
        "seed": seed, "scenario": scenario_options(seed),
        "strategy": {"name": strategy, "mem_size": mem, "rule": rule, "storage_policy": policy,
                     "gradient_pass": gradient_pass, **options},
        "train": {"epochs": epochs, "batch_size": BATCH, "lr": lr, "threads": 1, "eval_batch_size": EVAL_BATCH,
                  "grad_clip": GRAD_CLIP},
        "model": {"name": "mlp", "hidden_size": HIDDEN, "hidden_layers": LAYERS},
    })
    runner = classification.ClassificationRun(cfg)
    if draw is not None and runner.trainer.history is not None:
        runner.trainer.history.generator.manual_seed(1_000 + draw)
    cpu = time.process_time()
    try:
        for i in range(runner.n_experiences):
            runner.step(i)
    except DivergedError as exc:
        # The run stops (exit 3 on the command line); Avalanche's strategies train on with the broken
        # weights. Scored as what that model would be: its evaluation now, repeated for every experience
        # it did not train, so a failure counts in the means instead of leaving the table.
        row = evaluate_broken(runner)
        R = runner.accuracy_matrix + [row] * (runner.n_experiences - len(runner.accuracy_matrix))
        return {"R": R, "time_s": runner.train_time_s, "cpu_s": time.process_time() - cpu, "failed": str(exc)}
    return {"R": runner.accuracy_matrix, "time_s": runner.train_time_s, "cpu_s": time.process_time() - cpu}


def evaluate_broken(runner: classification.ClassificationRun) -> list[float]:
    """The accuracy row of a model whose run stopped (NaN weights predict class 0 everywhere, as in
    Avalanche); ``ClassificationRun.step``'s own guard is not in the way of a plain evaluation."""
    results = runner.trainer.eval(runner.benchmark.test_stream)
    return [results[j]["accuracy"] for j in range(runner.n_experiences)]


# --------------------------------------------------------------------------------------------------
# Avalanche
# --------------------------------------------------------------------------------------------------

def avalanche_benchmark(seed: int) -> Any:
    from avalanche.benchmarks.scenarios.supervised import class_incremental_benchmark
    from avalanche.benchmarks.utils import _make_taskaware_tensor_classification_dataset as tensor_dataset

    bench = benchmark(seed)
    (x_tr, y_tr), (x_te, y_te) = stacked(bench.train_stream), stacked(bench.test_stream)
    return class_incremental_benchmark(
        {"train": tensor_dataset(x_tr, y_tr), "test": tensor_dataset(x_te, y_te)},
        class_order=bench.class_order, num_classes_per_exp=[len(c) for c in bench.classes_per_experience])


def avalanche(name: str, seed: int, epochs: int, mem: int) -> dict[str, Any]:
    from avalanche.evaluation.metrics import accuracy_metrics
    from avalanche.training.plugins import EvaluationPlugin

    from avalanche_baselines import avalanche_strategy

    bench = avalanche_benchmark(seed)
    strategy = avalanche_strategy(name, make_model(seed), mem=mem, lr=LR, batch=BATCH, epochs=epochs,
                                  eval_batch=EVAL_BATCH, n_experiences=N_EXP, input_size=[1, 28, 28],
                                  evaluator=EvaluationPlugin(accuracy_metrics(experience=True), loggers=[]),
                                  grad_clip=GRAD_CLIP)
    R = []
    start, cpu = time.perf_counter(), time.process_time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for exp in bench.train_stream:
            strategy.train(exp)
            metrics = strategy.eval(bench.test_stream)
            R.append([float(metrics[f"Top1_Acc_Exp/eval_phase/test_stream/Exp{j:03d}"]) for j in range(N_EXP)])
    return {"R": R, "time_s": time.perf_counter() - start, "cpu_s": time.process_time() - cpu}


# --------------------------------------------------------------------------------------------------
# Hand-written PyTorch loops: the practical limit
# --------------------------------------------------------------------------------------------------

def hand_written(seed: int, epochs: int, mem: int) -> dict[str, Any]:
    """Shuffled tensor slices, SGD, optional reservoir replay (32 history samples per step), plain eval."""
    bench = benchmark(seed)
    model = make_model(seed)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(seed)
    buf_x = torch.empty(0, *bench.input_shape)
    buf_y = torch.empty(0, dtype=torch.long)
    seen, R = 0, []
    start, cpu = time.perf_counter(), time.process_time()
    for exp in bench.train_stream:
        x, y = exp.dataset.x, exp.dataset.y
        n = len(x)
        hist_order, hist_pos = None, 0
        for _ in range(epochs):
            order = torch.randperm(n, generator=gen)
            for s in range(0, n, BATCH):
                idx = order[s: s + BATCH]
                xb, yb = x[idx], y[idx]
                if len(buf_x):
                    if hist_order is None or hist_pos >= len(buf_x):
                        hist_order, hist_pos = torch.randperm(len(buf_x), generator=gen), 0
                    hidx = hist_order[hist_pos: hist_pos + BATCH]
                    hist_pos += BATCH
                    xb, yb = torch.cat([xb, buf_x[hidx]]), torch.cat([yb, buf_y[hidx]])
                opt.zero_grad()
                loss_fn(model(xb), yb).backward()
                if GRAD_CLIP:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
                opt.step()
        if mem:  # reservoir sampling, one draw per sample
            draws = torch.rand(n, generator=gen, dtype=torch.float64).tolist()
            keep_x, keep_y = list(buf_x), list(buf_y)
            for i in range(n):
                seen += 1
                if len(keep_x) < mem:
                    keep_x.append(x[i])
                    keep_y.append(y[i])
                else:
                    j = int(draws[i] * seen)
                    if j < mem:
                        keep_x[j], keep_y[j] = x[i], y[i]
            buf_x, buf_y = torch.stack(keep_x), torch.stack(keep_y)
        model.eval()
        with torch.no_grad():
            row = []
            for test in bench.test_stream:
                tx, ty = test.dataset.x, test.dataset.y
                correct = sum(int((model(tx[s: s + EVAL_BATCH]).argmax(1) == ty[s: s + EVAL_BATCH]).sum())
                              for s in range(0, len(tx), EVAL_BATCH))
                row.append(correct / len(tx))
        model.train()
        R.append(row)
    return {"R": R, "time_s": time.perf_counter() - start, "cpu_s": time.process_time() - cpu}


# --------------------------------------------------------------------------------------------------
# The grid
# --------------------------------------------------------------------------------------------------

def parse_gm(spec: str) -> tuple[str, str | None, dict[str, float]]:
    """``rule[:policy[:key=value,...]]`` -> (rule, policy or None, plugin options), e.g.
    ``similarity_der:herding:logit_weight=1.0``."""
    rule, _, rest = spec.partition(":")
    policy, _, opts = rest.partition(":")
    options = {}
    for item in filter(None, opts.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--gm {spec}: options are key=value, got {item!r}")
        options[key] = float(value)
    return rule, policy or None, options


def gm_label(spec: str) -> str:
    rule, policy, options = parse_gm(spec)
    extra = ", ".join(f"{k}={v:g}" for k, v in options.items())
    return f"ours gradient mixing: {rule}" + (f" + {policy}" if policy else "") + (f" [{extra}]" if extra else "")


def gm_run(spec: str) -> Callable[..., dict[str, Any]]:
    rule, policy, options = parse_gm(spec)
    return lambda seed, epochs, mem, draw=None: ours("gradient_mixing", seed, epochs, mem, rule=rule, policy=policy,
                                                     draw=draw, **options)


def plan(gm_specs: Sequence[str], skip: Sequence[str]) -> tuple[list[tuple[str, Callable]], list[tuple[str, Callable]]]:
    """(memory-free runs, rehearsal runs) as (label, fn(seed, epochs, mem)), in the order they run; this
    project's rehearsal runs also take ``draw`` (the library-draw experiment)."""
    free = [
        ("ours naive", lambda s, e, m: ours("naive", s, e, 0)),
        ("hand-written naive", lambda s, e, m: hand_written(s, e, 0)),
        ("avalanche Naive", lambda s, e, m: avalanche("Naive", s, e, 0)),
        ("ours lwf", lambda s, e, m: ours("lwf", s, e, 0)),
        ("ours ewc", lambda s, e, m: ours("ewc", s, e, 0)),
        ("ours cumulative", lambda s, e, m: ours("cumulative", s, e, 0)),
        ("ours joint", lambda s, e, m: ours("joint", s, e, 0)),
    ]
    rehearsal = [
        ("ours replay", lambda s, e, m, draw=None: ours("replay", s, e, m, draw=draw)),
        ("hand-written replay", lambda s, e, m: hand_written(s, e, m)),
        *[(gm_label(spec), gm_run(spec)) for spec in gm_specs],
        *[(f"avalanche {name}", lambda s, e, m, name=name: avalanche(name, s, e, m)) for name in AVALANCHE_REHEARSAL],
    ]
    keep = lambda runs: [(labelled(label), fn) for label, fn in runs if not any(k in label for k in skip)]  # noqa: E731
    return keep(free), keep(rehearsal)


def labelled(label: str) -> str:
    """A strategy's label in this run's log: ``(clip N)`` appended under ``--grad-clip``."""
    return label + (f" (clip {GRAD_CLIP:g})" if GRAD_CLIP else "")


def base_label(label: str) -> str:
    """The strategy's label without the ``(clip N)`` suffix of ``--grad-clip`` runs."""
    return label.split(" (clip ")[0]


def load_log(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def append_log(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def run_grid(args: argparse.Namespace) -> None:
    from tqdm.auto import tqdm

    free, rehearsal = plan(args.gm, args.skip)
    done = {(r["label"], r["seed"], r["epochs"], r["mem"], r.get("draw")) for r in load_log(args.log)}
    jobs = []
    for epochs in args.epochs:  # the cheaper settings first
        for seed in args.seeds:
            if args.draws is None:
                jobs += [(label, fn, seed, epochs, 0, None) for label, fn in free]
            for mem in args.mems:
                for draw in (args.draws or [None]):
                    jobs += [(label, fn, seed, epochs, mem, draw) for label, fn in rehearsal
                             if draw is None or label.startswith("ours ")]
    jobs = [j for j in jobs if (j[0], j[2], j[3], j[4], j[5]) not in done]
    for label, fn, seed, epochs, mem, draw in tqdm(jobs, desc="split fashion-mnist runs", disable=args.quiet):
        out = fn(seed, epochs, mem) if draw is None else fn(seed, epochs, mem, draw=draw)
        record = {"label": label, "seed": seed, "epochs": epochs, "mem": mem, "draw": draw, "time_s": out["time_s"],
                  "cpu_s": out.get("cpu_s"), "accuracy_matrix": out["R"], **summarize(out["R"])}
        if "failed" in out:
            record["failed"] = out["failed"]
        append_log(args.log, record)
        if not args.quiet:
            tqdm.write(f"{label:55s} seed {seed} epochs {epochs} mem {mem:3d} draw {draw}: "
                       f"acc {100 * record['average_accuracy']:5.1f} fgt {100 * record['forgetting']:5.1f} "
                       f"{record['time_s']:6.1f} s")


# --------------------------------------------------------------------------------------------------
# Loop overhead: this loop against the hand-written loops, interleaved
# --------------------------------------------------------------------------------------------------

TIMED = {
    "ours naive": lambda e, m: ours("naive", 0, e, 0),
    "hand-written naive": lambda e, m: hand_written(0, e, 0),
    "ours replay": lambda e, m: ours("replay", 0, e, m),
    "hand-written replay": lambda e, m: hand_written(0, e, m),
    "avalanche Naive": lambda e, m: avalanche("Naive", 0, e, 0),
}


def timing(args: argparse.Namespace) -> dict[str, Any]:
    """Train + eval time of the same runs repeated in turn (ours, hand-written, ..., ours, ...), so load
    changes on a shared machine hit all alike; medians of CPU and wall time, and their ratios."""
    benchmark(0)  # read the files before timing
    for fn in TIMED.values():  # warm-up
        fn(1, 200)
    runs: dict[str, list[tuple[float, float]]] = {k: [] for k in TIMED}
    for _ in range(args.repeats):
        for label, fn in TIMED.items():
            out = fn(args.timing_epochs, 200)
            runs[label].append((out["cpu_s"], out["time_s"]))
    med = {k: (statistics.median(c for c, _ in v), statistics.median(w for _, w in v)) for k, v in runs.items()}
    result = {"epochs": args.timing_epochs, "repeats": args.repeats, "median_cpu_s": {k: v[0] for k, v in med.items()},
              "median_wall_s": {k: v[1] for k, v in med.items()}, "all": runs}
    for kind in ("naive", "replay"):
        ours_t, hand_t = med[f"ours {kind}"], med[f"hand-written {kind}"]
        result[f"{kind}: ours / hand-written"] = {"cpu": ours_t[0] / hand_t[0], "wall": ours_t[1] / hand_t[1]}
    result["ours naive / avalanche Naive"] = {"cpu": med["ours naive"][0] / med["avalanche Naive"][0],
                                             "wall": med["ours naive"][1] / med["avalanche Naive"][1]}
    return result


# --------------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------------

def _std(values: Sequence[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def table(records: list[dict[str, Any]], epochs: int, mem: int) -> dict[str, dict[str, Any]]:
    """Per label at (epochs, mem): mean/std of accuracy, forgetting, time, and time ratios inside seed blocks."""
    rows = [r for r in records if r["epochs"] == epochs and r["mem"] in (mem, 0) and r.get("draw") is None
            and (r["mem"] == mem or base_label(r["label"]) in NO_MEMORY)]
    by_label: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_label.setdefault(r["label"], []).append(r)
    # CPU time (what one run costs, robust to other processes on a shared machine); runs logged before it
    # was recorded count only for accuracy
    ref = {r["seed"]: r["cpu_s"] for r in rows if r["label"] == "avalanche Naive" and r.get("cpu_s")}
    hand = {(r["seed"], name): r["cpu_s"] for r in rows for name in ("naive", "replay")
            if r["label"] == f"hand-written {name}" and r.get("cpu_s")}
    out = {}
    for label, runs in by_label.items():
        acc = [r["average_accuracy"] for r in runs]
        fgt = [r["forgetting"] for r in runs]
        cpu = [r["cpu_s"] for r in runs if r.get("cpu_s")]
        entry = {"seeds": sorted(r["seed"] for r in runs), "average_accuracy_mean": statistics.mean(acc),
                 "average_accuracy_std": _std(acc), "forgetting_mean": statistics.mean(fgt),
                 "forgetting_std": _std(fgt), "wall_s_mean": statistics.mean(r["time_s"] for r in runs),
                 "failed": sum("failed" in r for r in runs)}
        if cpu:
            entry["time_s_mean"] = statistics.mean(cpu)
        ratios = [r["cpu_s"] / ref[r["seed"]] for r in runs if r["seed"] in ref and r.get("cpu_s")]
        if ratios:
            entry["time_over_avalanche_naive"] = statistics.median(ratios)
        kind = "replay" if "replay" in label else "naive"
        hand_ratio = [r["cpu_s"] / hand[(r["seed"], kind)] for r in runs if (r["seed"], kind) in hand and r.get("cpu_s")]
        if hand_ratio and label in ("ours naive", "ours replay"):
            entry["time_over_hand_written"] = statistics.median(hand_ratio)
        out[label] = entry
    return out


def paired_table(records: list[dict[str, Any]], epochs: int, mem: int, reference: str) -> dict[str, dict[str, Any]]:
    """``reference`` minus every other rehearsal run on the same seeds, at (epochs, mem): mean and std of
    the per-seed differences (accuracy and forgetting, points), the two-sided 95% t interval of the mean,
    and on how many seeds ``reference`` is ahead. Seeds share data, class order and initialisation, so
    the pairs remove most of what the seed changes (the spread of a mean over seeds does not)."""
    from scipy.stats import t as student_t

    runs = {(r["label"], r["seed"]): r for r in records
            if r["epochs"] == epochs and r["mem"] == mem and r.get("draw") is None}
    ours = {seed: r for (label, seed), r in runs.items() if label == reference}
    out = {}
    for label in sorted({label for label, _ in runs} - {reference}):
        seeds = sorted(seed for (other, seed) in runs if other == label and seed in ours)
        if len(seeds) < 2:
            continue
        entry: dict[str, Any] = {"seeds": seeds}
        half = student_t.ppf(0.975, len(seeds) - 1) / len(seeds) ** 0.5
        for key in ("average_accuracy", "forgetting"):
            diffs = [100 * (ours[seed][key] - runs[(label, seed)][key]) for seed in seeds]
            mean, std = statistics.mean(diffs), statistics.stdev(diffs)
            entry[key] = {"mean": mean, "std": std, "ci95": [mean - half * std, mean + half * std]}
        entry["ahead"] = sum(ours[seed]["average_accuracy"] > runs[(label, seed)]["average_accuracy"] for seed in seeds)
        out[label] = entry
    return out


def format_paired(paired: dict[str, dict[str, Any]], reference: str, epochs: int, mem: int) -> list[str]:
    lines = [f"epochs {epochs}, memory {mem}: {reference} minus each, per seed (points), mean ± std [95% t interval]",
             f"{'against':52s} | accuracy                    | ahead | forgetting"]
    for label, e in paired.items():
        a, f = e["average_accuracy"], e["forgetting"]
        lines.append(f"{label:52s} | {a['mean']:+5.1f} ± {a['std']:3.1f} [{a['ci95'][0]:+5.1f}, {a['ci95'][1]:+5.1f}] | "
                     f"{e['ahead']}/{len(e['seeds'])}  | {f['mean']:+5.1f} ± {f['std']:3.1f} [{f['ci95'][0]:+5.1f}, {f['ci95'][1]:+5.1f}]")
    return lines


def draws_table(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Spread over library draws: per (label, seed, epochs, mem), mean and std over draws."""
    groups: dict[tuple, list[float]] = {}
    for r in records:
        if r.get("draw") is not None:
            groups.setdefault((r["label"], r["seed"], r["epochs"], r["mem"]), []).append(r["average_accuracy"])
    return {f"{label} | seed {seed} | epochs {epochs} | mem {mem}": {
        "draws": len(v), "mean": statistics.mean(v), "std": _std(v), "min": min(v), "max": max(v)}
        for (label, seed, epochs, mem), v in sorted(groups.items())}


def shown(label: str, entry: dict[str, Any]) -> str:
    """The label, with how many of its runs stopped (diverged or collapsed) when any did."""
    return label + (f" [{entry['failed']} stopped]" if entry.get("failed") else "")


def format_table(t: dict[str, dict[str, Any]], epochs: int, mem: int) -> list[str]:
    lines = [f"epochs {epochs}, memory {mem}: mean ± std over seeds (points); time = CPU s of train + eval of every experience",
             f"{'strategy':52s} | avg acc     | forgetting  | time s | / Av. Naive | / hand-written"]
    for label, e in sorted(t.items(), key=lambda kv: -kv[1]["average_accuracy_mean"]):
        lines.append(f"{shown(label, e):52s} | {100 * e['average_accuracy_mean']:5.1f} ± {100 * e['average_accuracy_std']:3.1f} | "
                     f"{100 * e['forgetting_mean']:5.1f} ± {100 * e['forgetting_std']:3.1f} | {e.get('time_s_mean', float('nan')):6.1f} | "
                     f"{e.get('time_over_avalanche_naive', float('nan')):10.2f} | {e.get('time_over_hand_written', float('nan')):6.2f}")
    return lines


def markdown(tables: dict[str, dict[str, Any]], time_key: str) -> list[str]:
    """One markdown table: a row per strategy, accuracy and forgetting per setting, time of ``time_key``."""
    keys = list(tables)
    labels = sorted({label for t in tables.values() for label in t},
                    key=lambda l: -tables[keys[0]].get(l, {}).get("average_accuracy_mean", 0.0))
    head = "| strategy | " + " | ".join(f"{k}: acc | fgt" for k in keys) + f" | CPU s ({time_key}) | / Av. Naive | / hand-written |"
    lines = [head, "|---|" + "---:|---:|" * len(keys) + "---:|---:|---:|"]
    for label in labels:
        cells = []
        for k in keys:
            e = tables[k].get(label)
            cells += ["" if e is None else f"{100 * e['average_accuracy_mean']:.1f} ± {100 * e['average_accuracy_std']:.1f}",
                      "" if e is None else f"{100 * e['forgetting_mean']:.1f} ± {100 * e['forgetting_std']:.1f}"]
        t = tables.get(time_key, {}).get(label, {})
        timing = [f"{t['time_s_mean']:.1f}" if "time_s_mean" in t else "", f"{t['time_over_avalanche_naive']:.2f}" if "time_over_avalanche_naive" in t else "",
                  f"{t['time_over_hand_written']:.2f}" if "time_over_hand_written" in t else ""]
        failed = sum(tables[k].get(label, {}).get("failed", 0) for k in keys)
        lines.append(f"| {shown(label, {'failed': failed})} | " + " | ".join(cells + timing) + " |")
    return lines


def plot(tables: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(tables)
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 6), sharey=True, squeeze=False)
    for ax, key in zip(axes[0], keys):
        t = sorted(tables[key].items(), key=lambda kv: kv[1]["average_accuracy_mean"])
        ax.barh([k for k, _ in t], [100 * v["average_accuracy_mean"] for _, v in t],
                xerr=[100 * v["average_accuracy_std"] for _, v in t], color="tab:blue", alpha=0.8)
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("average accuracy (%)")
        ax.grid(axis="x", alpha=0.3)
    n_seeds = max(len(v["seeds"]) for t in tables.values() for v in t.values())
    clip = f", gradient norm clipped at {GRAD_CLIP:g}" if GRAD_CLIP else ""
    fig.suptitle(f"Split Fashion-MNIST (5 x 2), MLP 784-256-256-10{clip}, mean ± std over {n_seeds} seeds")
    fig.tight_layout()
    save_figure(path, fig, dpi=90)


def report(args: argparse.Namespace) -> dict[str, Any]:
    records = load_log(args.log)
    tables, lines = {}, []
    for epochs in args.epochs:
        for mem in args.mems:
            t = table(records, epochs, mem)
            if t:
                tables[f"epochs {epochs}, memory {mem}"] = t
                lines += ["", *format_table(t, epochs, mem)]
    reference = labelled(gm_label(args.gm[0]))  # the first --gm variant
    paired = {}
    for epochs in args.epochs:
        for mem in args.mems:
            p = paired_table(records, epochs, mem, reference)
            if p:
                paired[f"epochs {epochs}, memory {mem}"] = p
                lines += ["", *format_paired(p, reference, epochs, mem)]
    spread = draws_table(records)
    if spread:
        lines += ["", "library draws (same run seed, only the library's generator changes): accuracy points"]
        lines += [f"{k:90s} n={v['draws']} {100 * v['mean']:5.1f} ± {100 * v['std']:3.1f} "
                  f"[{100 * v['min']:5.1f}, {100 * v['max']:5.1f}]" for k, v in spread.items()]
    md: list[str] = []
    for epochs in args.epochs:  # one markdown table per number of epochs, memory 200 and 500 side by side
        part = {k: v for k, v in tables.items() if k.startswith(f"epochs {epochs},")}
        if part:
            md += ["", *markdown(part, next(iter(part)))]
    out = {"protocol": __doc__.split("\n\n")[1], "tables": tables, "paired": {"reference": reference, **paired},
           "library_draws": spread, "lines": lines,
           "markdown": md, "runs": records}
    write_json(args.out, out)
    if tables:
        plot(tables, args.out.with_name(args.out.stem + "_accuracy.png"))
    if not args.quiet:
        print("\n".join(lines + [""] + md))
    return out


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, nargs="+", default=[1, 3])
    parser.add_argument("--mems", type=int, nargs="+", default=[200, 500])
    parser.add_argument("--gm", nargs="+", default=list(DEFAULT_GM), help="gradient mixing variants, rule:policy")
    parser.add_argument("--skip", nargs="*", default=[], help="leave out runs whose label contains one of these")
    parser.add_argument("--draws", type=int, nargs="+", default=None,
                        help="library-draw experiment: these draws of our rehearsal runs only")
    parser.add_argument("--log", type=Path, default=RESULTS / "split_fashion_mnist_runs.jsonl")
    parser.add_argument("--out", type=Path, default=RESULTS / "split_fashion_mnist.json")
    parser.add_argument("--report", action="store_true", help="only rebuild the tables from the log")
    parser.add_argument("--quick", action="store_true", help="seed 0, 1 epoch, memory 200, a separate log")
    parser.add_argument("--timing", action="store_true",
                        help="only the loop-overhead measurement (interleaved repeats), into --timing-out")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--timing-epochs", type=int, default=1)
    parser.add_argument("--timing-out", type=Path, default=RESULTS / "split_fashion_mnist_timing.json")
    parser.add_argument("--grad-clip", type=float, default=None,
                        help="clip every implementation's gradient norm to this before each optimizer step")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    global GRAD_CLIP
    GRAD_CLIP = args.grad_clip
    if args.quick:
        args.seeds, args.epochs, args.mems = [0], [1], [200]
        args.log, args.out = RESULTS / "split_fashion_mnist_quick_runs.jsonl", RESULTS / "split_fashion_mnist_quick.json"
        args.skip = [*args.skip, "GSS_greedy", "cumulative", "joint"]
    torch.set_num_threads(1)
    if args.timing:
        result = timing(args)
        write_json(args.timing_out, result)
        if not args.quiet:
            print(json.dumps({k: v for k, v in result.items() if k != "all"}, indent=1))
        return result
    if not args.report:
        run_grid(args)
    return report(args)


if __name__ == "__main__":
    main()
