"""Δm% of every weighting method over the seeds of several ``benchmarks/multitask_weighting.py`` files.

One benchmark run of five seeds cannot tell two methods apart whose paired difference is within a point
or two (its t interval at n = 5 is about ±1.2 standard deviations of the differences); more seeds run
as separate files (each half on its own core) answer it. The benchmark measures each seed's Δm% against
the single-task networks averaged over its seeds, so the per-seed Δm% of two files rest on different
references; this recomputes every seed's Δm% from the runs' task metrics against the single-task
networks averaged over all seeds of all files (what one run over all the seeds would report), pairs
each method with ``--baseline`` seed by seed (seeds both have), and prints mean ± std and the paired
difference with its 95% t interval (the benchmark's own ``paired``). Files must share the benchmark's
settings (images, epochs, missing fraction); a file whose settings differ from the first file's is
refused, naming the field.

    python benchmarks/multitask_combine.py benchmarks/results/multitask_weighting.json \\
        benchmarks/results/multitask_weighting_seeds5-12.json benchmarks/results/multitask_weighting_seeds13-19.json \\
        --ratio "dwa_ema_exp_init 50% missing, masked" dwa_ema_exp_init --out benchmarks/results/multitask_weighting_20seeds.json
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from incremental.io import write_json  # noqa: E402
from multitask_weighting import mean, paired, score_ratios, score_runs, std  # noqa: E402  (the benchmark's own scoring)

#: Settings that must agree for two files' Δm% to be comparable.
SAME_SETTINGS = ("n_train", "n_test", "epochs", "missing", "default")


def collect(paths: list[Path]) -> "Pooled":
    """Every file's runs and single-task networks, pooled by seed (a seed that two files both hold must
    agree: the benchmark is deterministic, so a mismatch means different code or settings)."""
    headlines: dict[str, dict[int, dict[str, float]]] = {}
    single: dict[str, dict[int, float]] = {}
    higher: dict[str, bool] = {}
    first: dict[str, Any] | None = None
    for path in paths:
        try:
            data = json.loads(path.read_text())
            settings, runs = data["settings"], data["runs"]
            higher, stl = data["higher_is_better"], data["single_task"]
        except (OSError, ValueError, KeyError) as exc:
            raise SystemExit(f"{path}: not a multitask_weighting.py result ({exc})") from None
        first = first or settings
        for key in SAME_SETTINGS:
            if settings.get(key) != first.get(key):
                raise SystemExit(f"{path}: settings.{key} is {settings.get(key)!r}, the first file has {first.get(key)!r}")
        for task, by_seed in stl.items():
            for seed, value in by_seed.items():
                _merge(single.setdefault(task, {}), int(seed), value, path, f"single_task.{task}")
        for method, by_seed in runs.items():
            for seed, run in by_seed.items():
                _merge(headlines.setdefault(method, {}), int(seed), run["headline"], path, method)
    reference = {task: mean(list(by_seed.values())) for task, by_seed in single.items()}
    return Pooled(headlines, reference, higher, first or {})


@dataclass
class Pooled:
    """Every file's runs by method and seed, and the single-task reference averaged over all seeds."""

    headlines: dict[str, dict[int, dict[str, float]]]
    reference: dict[str, float]
    higher: dict[str, bool]
    settings: dict[str, Any]

    def score(self, method: str) -> dict[str, Any]:
        """The method's Δm% per seed, task means, drops and worst task against the pooled reference (the
        benchmark's own :func:`score_runs`)."""
        return score_runs(self.headlines[method], self.reference, self.higher)


def _merge(known: dict[int, Any], seed: int, value: Any, path: Path, what: str) -> None:
    if seed in known and known[seed] != value:
        raise SystemExit(f"{path}: {what} seed {seed} reads {value}, another file {known[seed]}")
    known[seed] = value


def combine(pooled: Pooled, baseline: str) -> dict[str, dict[str, Any]]:
    if baseline not in pooled.headlines:
        raise SystemExit(f"--baseline {baseline!r} is in no file; methods: {', '.join(pooled.headlines)}")
    scores = {method: pooled.score(method) for method in pooled.headlines}
    base = scores[baseline]["delta_m_by_seed"]
    out = {}
    for method, score in scores.items():
        by_seed = score["delta_m_by_seed"]
        values = [by_seed[s] for s in sorted(by_seed)]
        shared = sorted(set(by_seed) & set(base))
        out[method] = {"seeds": sorted(by_seed), "delta_m_mean": mean(values), "delta_m_std": std(values),
                       f"minus_{baseline}": paired([by_seed[s] - base[s] for s in shared]),
                       f"lower_than_{baseline}_on": sum(by_seed[s] < base[s] for s in shared),
                       **{k: score[k] for k in ("relative_drop_pct", "worst_task", "worst_drop_pct")}}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--baseline", default="equal", help="the method every other is paired with")
    parser.add_argument("--ratio", nargs=2, metavar=("PART", "FULL"), action="append", default=[],
                        help="also each task's score of PART over FULL's (seed means; 1 = as good), e.g. the "
                             "masked run over the all-label run; repeatable")
    parser.add_argument("--out", type=Path, help="JSON of the combined table (temp file + rename)")
    args = parser.parse_args(argv)
    pooled = collect(args.files)
    table = combine(pooled, args.baseline)
    ratios = {}
    for part, full in args.ratio:
        for name in (part, full):
            if name not in pooled.headlines:
                raise SystemExit(f"--ratio: {name!r} is in no file; methods: {', '.join(pooled.headlines)}")
        ratios[f"{part} / {full}"] = score_ratios(pooled.score(part)["tasks"], pooled.score(full)["tasks"], pooled.higher)
    key = f"minus_{args.baseline}"
    print(f"Δm% (lower is better) over the seeds of {len(args.files)} files; paired with {args.baseline} seed by seed")
    print(f"{'method':44s} {'n':>3s} {'Δm% mean ± std':>16s}   {'minus ' + args.baseline + ' [95% t]':>30s}  "
          f"lower on  worst task")
    for method, row in sorted(table.items(), key=lambda kv: kv[1]["delta_m_mean"]):
        p = row[key]
        interval = f"{p['mean']:+6.2f} ± {p['std']:4.2f} [{p['ci95'][0]:+6.2f}, {p['ci95'][1]:+6.2f}]"
        print(f"{method:44s} {len(row['seeds']):3d} {row['delta_m_mean']:+8.2f} ± {row['delta_m_std']:5.2f}   "
              f"{interval:>30s}  {row['lower_than_' + args.baseline + '_on']:>3d}/{p['n']:<3d}  "
              f"{row['worst_task']} {row['worst_drop_pct']:+.1f}%")
    for name, by_task in ratios.items():
        cells = ", ".join(f"{t} {r:.3f}" for t, r in sorted(by_task.items(), key=lambda kv: -kv[1]))
        print(f"{name}: {cells}; {sum(r >= 0.95 for r in by_task.values())} of {len(by_task)} at >= 0.95")
    if args.out:
        write_json(args.out, {"files": [str(p) for p in args.files], "baseline": args.baseline,
                              "settings": {k: pooled.settings.get(k) for k in SAME_SETTINGS},
                              "single_task_reference": pooled.reference, "methods": table, "score_ratios": ratios})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
