"""Updating a model the user already has, on real data: Fashion-MNIST, 8 classes -> 10.

Per seed, everything as a user would do it, through the command line:

1. ``benchmarks/train_plain_classifier.py`` (a plain PyTorch script that knows nothing of this project)
   trains its small CNN (``FashionCNN``, 2 conv blocks + 128-unit hidden layer) on the 8 first classes
   and saves ``torch.save(model.state_dict())`` and ``classes.txt``;
2. ``incremental package --architecture benchmarks.train_plain_classifier:FashionCNN`` makes a package,
   storing the script's preprocessing (28x28, one channel, mean 0.2860, std 0.3530);
3. the user kept ``--old-per-class`` training images of each old class (``old.npz``); the 2 remaining
   classes (Bag, Ankle boot) arrive as ``new.npz`` (all their 12,000 training images);
4. ``incremental update --strategy naive | replay | gradient_mixing --old-data old.npz`` (exemplars:
   the kept images, 80% of them, up to ``--mem-size``);
5. joint retraining: the plain script on all 10 classes from scratch (the upper bound).

Every package is evaluated on the official test set (8,000 old-class and 2,000 new-class images)
with the preprocessing stored in it: old-class accuracy before (the user's model) and after, new-class
accuracy. Targets: old-class accuracy drops by at most 5 points, new classes reach at least 90% of
joint retraining's new-class accuracy.

    python benchmarks/own_model_fashion_mnist.py            # 3 seeds, ~25 min on one core
    python benchmarks/own_model_fashion_mnist.py --quick    # 1 seed, 1 epoch everywhere (smoke run)

Writes ``benchmarks/results/own_model_fashion_mnist.json`` and ``own_model_fashion_mnist.png``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.train_plain_classifier import CLASSES, DATA, MEAN, STD, read_idx  # noqa: E402
from incremental.io import save_figure, write_json  # noqa: E402
from incremental.package import load_model  # noqa: E402
from incremental.preprocessing import Preprocessing  # noqa: E402
from incremental.update_classifier import logits_on  # noqa: E402

OLD = list(range(8))
NEW = [8, 9]
ARCH = "benchmarks.train_plain_classifier:FashionCNN"


def sh(*args: str) -> float:
    """Run a command from the repository root with this tree on the path; returns its wall time."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    start = time.perf_counter()
    done = subprocess.run(list(args), cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return time.perf_counter() - start


def incremental(*args: str) -> float:
    return sh(sys.executable, "-m", "incremental", *args)


def arrays() -> dict[str, np.ndarray]:
    return {"x_train": read_idx(DATA / "train-images-idx3-ubyte.gz").copy(),
            "y_train": read_idx(DATA / "train-labels-idx1-ubyte.gz").astype(np.int64),
            "x_test": read_idx(DATA / "t10k-images-idx3-ubyte.gz").copy(),
            "y_test": read_idx(DATA / "t10k-labels-idx1-ubyte.gz").astype(np.int64)}


def write_data(d: dict[str, np.ndarray], work: Path, old_per_class: int, seed: int) -> None:
    """``new.npz``: every training image of the new classes; ``old.npz``: what the user kept of the old ones."""
    x, y = d["x_train"], d["y_train"]
    new = np.isin(y, NEW)
    np.savez(work / "new.npz", x=x[new], y=y[new] - NEW[0], class_names=np.array([CLASSES[c] for c in NEW]))
    rng = np.random.default_rng(seed)
    kept = np.concatenate([rng.choice(np.flatnonzero(y == c), old_per_class, replace=False) for c in OLD])
    np.savez(work / "old.npz", x=x[kept], y=y[kept], class_names=np.array([CLASSES[c] for c in OLD]))


def evaluate(package_path: Path, d: dict[str, np.ndarray]) -> dict[str, float]:
    """Old-class and new-class accuracy on the test set, inputs prepared as the package prescribes."""
    package = load_model(package_path)
    x = Preprocessing.of_package(package).load_array(d["x_test"], "Fashion-MNIST test set")
    predicted = logits_on(package.build(), x).argmax(1).numpy()
    names = package.class_names
    truth = np.array([names.index(CLASSES[c]) if CLASSES[c] in names else -1 for c in d["y_test"]])
    old = np.isin(d["y_test"], OLD)
    return {"old_accuracy": float((predicted[old] == truth[old]).mean()),
            "new_accuracy": float((predicted[~old] == truth[~old]).mean())}


def package(weights_dir: Path, out: Path, n_classes: int) -> None:
    incremental("package", "--architecture", ARCH, "--kwargs", json.dumps({"num_classes": n_classes}),
                "--weights", str(weights_dir / "model.pth"), "--classes", str(weights_dir / "classes.txt"),
                "--input-size", "28", "--mean", str(MEAN), "--std", str(STD), "--out", str(out), "--force", "--quiet")


def run_seed(seed: int, args: argparse.Namespace, d: dict[str, np.ndarray], work: Path) -> dict[str, Any]:
    work.mkdir(parents=True, exist_ok=True)
    train = [sys.executable, "benchmarks/train_plain_classifier.py", "--epochs", str(args.train_epochs),
             "--seed", str(seed)]
    t_base = sh(*train, "--classes", *map(str, OLD), "--out", str(work / "user8"))
    package(work / "user8", work / "base.pt", len(OLD))
    write_data(d, work, args.old_per_class, seed)
    row: dict[str, Any] = {"seed": seed, "user_training_s": t_base, "before": evaluate(work / "base.pt", d)}
    print(f"seed {seed}: user's model {row['before']}", flush=True)
    for method, mem in [("naive", 0)] + [(m, k) for k in args.mem_sizes for m in ("replay", "gradient_mixing")]:
        name = method if method == "naive" else f"{method}_mem{mem}"
        out = work / name
        t = incremental("update", "--model", str(work / "base.pt"), "--data", str(work / "new.npz"),
                        "--old-data", str(work / "old.npz"), "--strategy", method, "--epochs", str(args.update_epochs),
                        "--lr", str(args.lr), "--mem-size", str(max(mem, 1)), "--seed", str(seed), "--out", str(out),
                        "--quiet")
        report = json.loads((out / "report.json").read_text())
        row[name] = {**evaluate(out / "model.pt", d), "update_s": t, "exemplars": report["exemplars"]["rehearsed"],
                     "head_kept": report["head"]["old_outputs_unchanged_at_growth"]}
        print(f"seed {seed}: {name} {row[name]}", flush=True)
    t_joint = sh(*train, "--classes", *map(str, OLD + NEW), "--out", str(work / "joint"))
    package(work / "joint", work / "joint.pt", len(OLD + NEW))
    row["joint"] = {**evaluate(work / "joint.pt", d), "training_s": t_joint}
    print(f"seed {seed}: joint {row['joint']}", flush=True)
    return row


def mean_std(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def summarize(rows: list[dict[str, Any]], methods: list[str]) -> dict[str, Any]:
    summary: dict[str, Any] = {"before_old_accuracy": mean_std([r["before"]["old_accuracy"] for r in rows]),
                               "joint": {k: mean_std([r["joint"][k] for r in rows]) for k in ("old_accuracy", "new_accuracy")}}
    for m in methods:
        drop = [100 * (r["before"]["old_accuracy"] - r[m]["old_accuracy"]) for r in rows]
        of_joint = [r[m]["new_accuracy"] / r["joint"]["new_accuracy"] for r in rows]
        summary[m] = {
            "old_accuracy": mean_std([r[m]["old_accuracy"] for r in rows]),
            "new_accuracy": mean_std([r[m]["new_accuracy"] for r in rows]),
            "old_drop_points": mean_std(drop),
            "new_of_joint": mean_std(of_joint),
            "update_s": mean_std([r[m]["update_s"] for r in rows]),
            "target_old_drop_le_5": statistics.fmean(drop) <= 5.0,
            "target_new_ge_90pct_joint": statistics.fmean(of_joint) >= 0.9,
        }
    return summary


def plot(summary: dict[str, Any], methods: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [m.replace("_mem", "\nmem ") for m in methods] + ["joint\n(upper bound)"]
    stats = [summary[m] for m in methods] + [summary["joint"]]
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(labels), 4.6))
    pos = np.arange(len(labels))
    for k, (key, label) in enumerate((("old_accuracy", "old classes (8)"), ("new_accuracy", "new classes (2)"))):
        means = [100 * s[key]["mean"] for s in stats]
        stds = [100 * s[key]["std"] for s in stats]
        ax.bar(pos + (k - 0.5) * 0.38, means, 0.38, yerr=stds, capsize=3, label=label)
        for p, v in zip(pos + (k - 0.5) * 0.38, means):
            ax.text(p, v + 1, f"{v:.1f}", ha="center", va="bottom", fontsize=7)
    before = 100 * summary["before_old_accuracy"]["mean"]
    ax.axhline(before, color="gray", ls="--", lw=1, label=f"old classes, user's model ({before:.1f})")
    ax.axhline(before - 5, color="gray", ls=":", lw=1, label="target: at most 5 points below")
    ax.set_xticks(pos)
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 112)
    ax.set_title("Fashion-MNIST: a user's 8-class CNN updated with 2 new classes (mean ± std over seeds)", fontsize=9)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=4, frameon=False)
    fig.tight_layout()
    save_figure(path, fig, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--train-epochs", type=int, default=5, help="the user's script (and joint retraining)")
    parser.add_argument("--update-epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=0.05, help="incremental update --lr (its default)")
    parser.add_argument("--old-per-class", type=int, default=300, help="training images the user kept per old class")
    parser.add_argument("--mem-sizes", type=int, nargs="+", default=[2000, 200],
                        help="--mem-size values (200 is incremental update's default)")
    parser.add_argument("--work", default=str(ROOT / "runs" / "own_model_fashion_mnist"))
    parser.add_argument("--quick", action="store_true", help="1 seed, 1 epoch everywhere")
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.train_epochs, args.update_epochs, args.mem_sizes = [0], 1, 1, [2000]
    torch.set_num_threads(1)
    d = arrays()
    rows = [run_seed(seed, args, d, Path(args.work) / f"seed{seed}") for seed in args.seeds]
    methods = ["naive"] + [f"{m}_mem{k}" for k in args.mem_sizes for m in ("replay", "gradient_mixing")]
    summary = summarize(rows, methods)
    name = "own_model_fashion_mnist" + ("_quick" if args.quick else "")
    results = ROOT / "benchmarks" / "results"
    config = {k: v for k, v in vars(args).items() if k != "work"}
    write_json(results / f"{name}.json", {"config": config, "model": "FashionCNN (benchmarks/train_plain_classifier.py)",
                                          "summary": summary, "runs": rows})
    plot(summary, methods, results / f"{name}.png")
    for m in methods:
        s = summary[m]
        print(f"{m:>24}: old {100 * s['old_accuracy']['mean']:.1f} ± {100 * s['old_accuracy']['std']:.1f} "
              f"(drop {s['old_drop_points']['mean']:.1f} ± {s['old_drop_points']['std']:.1f} points), new "
              f"{100 * s['new_accuracy']['mean']:.1f} ± {100 * s['new_accuracy']['std']:.1f} "
              f"({100 * s['new_of_joint']['mean']:.0f}% of joint)")
    j = summary["joint"]
    print(f"{'joint':>24}: old {100 * j['old_accuracy']['mean']:.1f} ± {100 * j['old_accuracy']['std']:.1f}, new "
          f"{100 * j['new_accuracy']['mean']:.1f} ± {100 * j['new_accuracy']['std']:.1f}; user's model old "
          f"{100 * summary['before_old_accuracy']['mean']:.1f} ± {100 * summary['before_old_accuracy']['std']:.1f}")
    print(f"wrote {results / name}.json and .png")


if __name__ == "__main__":
    main()
