"""GradientMixingPlugin inside a plain Avalanche experiment (``avalanche.training.Naive``, nothing else).

The plugin keeps its own history library (Avalanche's ``Naive`` has none, so the plugin's library draws
its randomness from the torch generator the experiment seeded), fills it after every experience and, at
every step, mixes the history gradient into the training gradient (default rule: similarity weights
with DER's logit replay on the history).
Run it with::

    .venv/bin/python examples/avalanche_gradient_mixing.py            # Split Digits, 5 experiences
    .venv/bin/python examples/avalanche_gradient_mixing.py --quick    # 2 experiences, 1 epoch
    .venv/bin/python examples/avalanche_gradient_mixing.py --out /tmp/gm  # also writes the statistics plots

The data are scikit-learn's digits (shipped with scikit-learn, nothing is downloaded), turned into an
Avalanche class-incremental benchmark with Avalanche's own ``class_incremental_benchmark``.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(REPO))


def avalanche_split_digits(n_experiences: int, seed: int) -> tuple[Any, Any]:
    """(Avalanche benchmark, our SplitDigits) with the same samples and class order."""
    from avalanche.benchmarks.scenarios.supervised import class_incremental_benchmark
    from avalanche.benchmarks.utils import _make_taskaware_tensor_classification_dataset as tensor_dataset

    from incremental.scenarios.digits import split_digits

    ours = split_digits(n_experiences, seed=seed)

    def stacked(stream: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.cat([e.dataset.x for e in stream]), torch.cat([e.dataset.y for e in stream])

    (x_tr, y_tr), (x_te, y_te) = stacked(ours.train_stream), stacked(ours.test_stream)
    per_exp = [len(c) for c in ours.classes_per_experience]
    bench = class_incremental_benchmark(
        {"train": tensor_dataset(x_tr, y_tr), "test": tensor_dataset(x_te, y_te)},
        class_order=ours.class_order, num_classes_per_exp=per_exp,
    )
    return bench, ours


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    was_training = model.training
    model.eval()
    acc = float((model(x).argmax(dim=1) == y).float().mean())
    model.train(was_training)
    return acc


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rule", default=None, help="a rule of strategies.mixing_rules.RULES (default: DEFAULT_RULE)")
    parser.add_argument("--policy", default=None, help="the library's storage policy (default: the plugin's)")
    parser.add_argument("--mem-size", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--experiences", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="2 experiences, 1 epoch (a smoke run)")
    parser.add_argument("--out", type=Path, default=None, help="directory for the per-experience statistics PNGs")
    args = parser.parse_args(argv)
    if args.quick:
        args.experiences, args.epochs = 2, 1
    torch.set_num_threads(1)

    from avalanche.training import Naive
    from avalanche.training.plugins import EvaluationPlugin

    from incremental.metrics import summarize
    from incremental.models import MLP
    from strategies.gradient_mixing import GradientMixingPlugin

    torch.manual_seed(args.seed)
    bench, ours = avalanche_split_digits(args.experiences, args.seed)
    model = MLP(64, 256, 10)
    options = {k: v for k, v in (("rule", args.rule), ("storage_policy", args.policy)) if v is not None}
    plugin = GradientMixingPlugin(mem_size=args.mem_size, **options)  # library seeded by the run (torch.manual_seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Avalanche warns that no logger is attached: on purpose
        strategy = Naive(
            model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
            criterion=torch.nn.CrossEntropyLoss(), train_mb_size=32, train_epochs=args.epochs,
            eval_mb_size=512, plugins=[plugin], evaluator=EvaluationPlugin(loggers=[]),
        )
    matrix = []
    for experience in bench.train_stream:
        strategy.train(experience)
        matrix.append([accuracy(model, e.dataset.x, e.dataset.y) for e in ours.test_stream])
        print(f"after experience {experience.current_experience}: "
              + " ".join(f"{100 * a:5.1f}" for a in matrix[-1]))
    summary = summarize(matrix)
    print(f"average accuracy {summary['average_accuracy']:.3f}, forgetting {summary['forgetting']:.3f}")
    for exp_id, stats in plugin.summary().items():
        print(f"experience {exp_id}: {stats['iterations']} mixed steps, "
              f"{100 * stats['conflict_fraction']:.0f}% conflicting, mean w_h {stats['mean_w_h']:.2f}")
    if args.out is not None:
        for path in plugin.plot_stats(args.out):
            print(f"wrote {path}")
    return {"accuracy_matrix": matrix, **summary, "gradient_stats": plugin.summary(),
            "library_size": len(plugin.library) if plugin.library is not None else 0}


if __name__ == "__main__":
    main()
