"""Issue 14's panoptic targets from the saved runs of ``benchmarks/panoptic_incremental.py``.

Reads the per-seed results under ``benchmarks/results/panoptic_runs/`` (each file holds the exact
command that produced it) and computes, per scenario and seed, the share of the deployed model's
old-class PQ kept after the updates (``PQ old after / PQ old before``) and PQ of all classes relative
to joint retraining (the upper bound), then mean ± std over seeds, for the measured setting of each
scenario and for the METHODS defaults (``pseudo_distill`` at the first update rate). Nothing is
trained here; the runs take hours (see the commands in the files).

    python benchmarks/panoptic_targets.py      # prints the table, writes benchmarks/results/panoptic_targets.json
"""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from incremental.io import write_json  # noqa: E402

RUNS = ROOT / "benchmarks" / "results" / "panoptic_runs"
#: scenario -> (method label in the run files, files holding it); the setting tuned on seed 0 and
#: confirmed on seeds 1 and 2 (the configs' own settings)
TUNED = {"3-2": ("L10C", ["pG.json", "c32.json"]), "3-1-1": ("L10S", ["pH.json", "c311.json"])}
JOINT = {"3-2": ["s0_base.json", "s1_base.json", "s2_base.json"], "3-1-1": ["j311.json", "j311_s2.json"]}
TARGETS = {"kept": 0.90, "of_joint": 0.85}


def seeds_of(files: list[str], scenario: str, method: str) -> dict[int, dict[str, Any]]:
    """seed -> {before, old, new, all, command} of ``method`` in ``files``."""
    out: dict[int, dict[str, Any]] = {}
    for name in files:
        data = json.loads((RUNS / name).read_text())
        for seed_run in data["scenarios"].get(scenario, {}).get("seeds", []):
            m = seed_run["methods"].get(method)
            if m is None:
                continue
            out[int(seed_run["seed"])] = {"before": seed_run["before_update"]["pq_all"], "old": m["pq_old"][-1],
                                          "new": m["pq_new"][-1], "all": m["pq_all"][-1], "command": data["command"]}
    return out


def mean_std(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def main() -> None:
    report: dict[str, Any] = {"targets": TARGETS, "scenarios": {}}
    lines = ["scenario  setting  seeds   PQ old        PQ new        PQ all        old kept      all / joint"]
    for scenario, (method, files) in TUNED.items():
        joint = {s: r["all"] for s, r in seeds_of(JOINT[scenario], scenario, "joint").items()}
        tuned = seeds_of(files, scenario, method)
        rows: dict[str, Any] = {}
        for label, runs, seeds in ((method, tuned, sorted(tuned)), (f"{method}, seeds 1-2", tuned, [1, 2])):
            seeds = [s for s in seeds if s in runs and s in joint]
            kept = [runs[s]["old"] / runs[s]["before"] for s in seeds]
            of_joint = [runs[s]["all"] / joint[s] for s in seeds]
            row = {"seeds": seeds, "pq_old": mean_std([runs[s]["old"] for s in seeds]),
                   "pq_new": mean_std([runs[s]["new"] for s in seeds]), "pq_all": mean_std([runs[s]["all"] for s in seeds]),
                   "kept": mean_std(kept), "of_joint": mean_std(of_joint),
                   "kept_per_seed": kept, "of_joint_per_seed": of_joint,
                   "met": {"kept": statistics.mean(kept) >= TARGETS["kept"],
                           "of_joint": statistics.mean(of_joint) >= TARGETS["of_joint"]}}
            rows[label] = row
            lines.append(f"{scenario:8s}  {label:16s} {len(seeds)}  "
                         + "  ".join(f"{row[k]['mean']:.3f}±{row[k]['std']:.3f}" for k in ("pq_old", "pq_new", "pq_all"))
                         + f"  {row['kept']['mean']:.1%}±{row['kept']['std']:.1%}  {row['of_joint']['mean']:.1%}±{row['of_joint']['std']:.1%}")
        report["scenarios"][scenario] = {"joint_pq_all": joint, "runs": {str(s): r for s, r in tuned.items()}, "rows": rows}
    print("\n".join(lines))
    write_json(ROOT / "benchmarks" / "results" / "panoptic_targets.json", report)


if __name__ == "__main__":
    main()
