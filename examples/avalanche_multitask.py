"""DynamicLossWeightingPlugin inside Avalanche's own ``Naive`` strategy, with a dict-output HydraNet.

The same plugin object is both the criterion (``criterion=plugin.criterion``: the masked, weighted
multi-task loss) and a plugin (``plugins=[plugin]``: period boundaries, GradNorm's weight update,
uncertainty weighting's optimizer step). Labels travel as a ``LabelDict`` (a dict with ``.to``), which
Avalanche's minibatch unpacking needs. Avalanche's default evaluator computes accuracy on
``mb_output`` and cannot read a dict, so the strategy gets an ``EvaluationPlugin()`` without metrics
and the per-task metrics come from our ``MultiTaskAccumulator``.

``--named-terms`` shows the other mode, the one every model family can use: the strategy's criterion
returns named loss terms (here one per task, :func:`task_loss_terms`), a four-line ``Naive`` subclass
exposes them as ``strategy.loss_terms`` and adds their plain sum to ``strategy.loss``, and the plugin
(built without a task list: it reads the term names at the first iteration) replaces that sum by the
weighted one in ``before_backward``.

    .venv/bin/python examples/avalanche_multitask.py                       # about 15 s of CPU
    .venv/bin/python examples/avalanche_multitask.py --n-train 64 --n-test 64 --epochs 3 --methods gradnorm
    .venv/bin/python examples/avalanche_multitask.py --named-terms --methods dwa_ema_exp_init
"""
from __future__ import annotations

import argparse
import functools
import sys
import warnings
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from incremental.io import write_json  # noqa: E402
from incremental.multitask.loaders import avalanche_dataset  # noqa: E402
from incremental.multitask.metrics import MultiTaskAccumulator, headline  # noqa: E402
from incremental.multitask.model import HydraNet  # noqa: E402
from incremental.multitask.synthfaces import make_synthfaces, synthfaces_tasks  # noqa: E402
from incremental.multitask.tasks import fit_output_scaling, task_loss_terms  # noqa: E402
from incremental.multitask.weighting import METHODS  # noqa: E402
from incremental.trainer import seed_everything  # noqa: E402
from strategies.dynamic_loss_weighting import DynamicLossWeightingPlugin  # noqa: E402


@torch.no_grad()
def evaluate(model: torch.nn.Module, samples: Any, tasks: list, batch_size: int = 256) -> dict[str, Any]:
    model.eval()
    acc = MultiTaskAccumulator(tasks)
    for start in range(0, len(samples), batch_size):
        idx = torch.arange(start, min(len(samples), start + batch_size))
        x, y, _ = samples.batch(idx)
        acc.update(model(x), y)
    model.train()
    return acc.result()


def named_terms_naive() -> type:
    """Avalanche's ``Naive`` whose criterion returns ``{name: loss}``: the terms are exposed as
    ``strategy.loss_terms`` and their plain sum is the strategy's loss, which is all a loop has to do
    for ``DynamicLossWeightingPlugin`` to weight them."""
    from avalanche.training import Naive

    class NamedTermsNaive(Naive):
        def criterion(self) -> torch.Tensor:
            self.loss_terms = self._criterion(self.mb_output, self.mb_y)
            return torch.stack(list(self.loss_terms.values())).sum() if self.loss_terms else self.mb_x.new_zeros(())

    return NamedTermsNaive


def run_method(method: str, args: argparse.Namespace) -> dict[str, Any]:
    from avalanche.benchmarks.scenarios.dataset_scenario import benchmark_from_datasets
    from avalanche.training import Naive
    from avalanche.training.plugins import EvaluationPlugin

    seed_everything(args.seed)
    train = make_synthfaces(args.n_train, 2 * args.seed + 1, missing_fraction=args.missing)
    test = make_synthfaces(args.n_test, 2 * args.seed + 2)
    tasks = fit_output_scaling(synthfaces_tasks(), train.y)
    half = len(train) // 2  # two experiences: the plugin keeps its period history across them
    parts = [train.subset(torch.arange(0, half)), train.subset(torch.arange(half, len(train)))]
    bench = benchmark_from_datasets(train=[avalanche_dataset(p) for p in parts], test=[avalanche_dataset(test)])

    model = HydraNet(tasks, channels=(8, 16, 24, 32))
    if args.named_terms:  # the plugin weighs strategy.loss_terms; term names from the first iteration
        plugin = DynamicLossWeightingPlugin(None, method, gradnorm_lr=args.lr, uncertainty_lr=args.lr)
        template, criterion = named_terms_naive(), functools.partial(task_loss_terms, tasks)
    else:  # the plugin is the criterion
        plugin = DynamicLossWeightingPlugin(tasks, method, gradnorm_lr=args.lr, uncertainty_lr=args.lr)
        template, criterion = Naive, plugin.criterion
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no loggers" from the metric-less evaluator
        evaluator = EvaluationPlugin()
        strategy = template(model=model, optimizer=torch.optim.Adam(model.parameters(), lr=args.lr),
                            criterion=criterion, train_mb_size=args.batch_size, train_epochs=args.epochs,
                            eval_mb_size=256, device="cpu", plugins=[plugin], evaluator=evaluator)
    for experience in bench.train_stream:
        strategy.train(experience)
    strategy.eval(bench.test_stream)  # Avalanche's eval loop calls the criterion under no_grad
    result = evaluate(model, test, tasks)
    return {
        "method": method,
        "mode": "named_terms" if args.named_terms else "criterion",
        "headline": headline(result, tasks),
        "loss_weights": plugin.weights,
        "periods": len(plugin.log),
        "weight_history": plugin.log,
        "log_vars": plugin.log_vars.detach().tolist(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["dwa_ema_exp"], choices=list(METHODS))
    parser.add_argument("--n-train", type=int, default=800)
    parser.add_argument("--n-test", type=int, default=400)
    parser.add_argument("--epochs", type=int, default=4, help="per experience (there are two)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.003)
    parser.add_argument("--missing", type=float, default=0.3, help="fraction of labels missing per task")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--named-terms", action="store_true",
                        help="criterion returns named terms, the plugin weighs strategy.loss_terms")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    results = []
    for method in args.methods:
        r = run_method(method, args)
        results.append(r)
        print(f"{method}: {r['periods']} periods; final weights "
              + ", ".join(f"{k}={v:.2f}" for k, v in r["loss_weights"].items()))
        print("  " + ", ".join(f"{k}={v:.3f}" for k, v in r["headline"].items()))
    if args.out:
        write_json(args.out, {"results": results})
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
