"""Kept share and share of joint PQ from several result files of ``benchmarks/panoptic_incremental.py``.

The benchmark computes both shares when one run trains the method and joint side by side. Joint
retraining is the expensive part (about 3 CPU minutes per step and seed), and it does not depend on the
method being measured, so a new method is often run alone (``--methods NAME``) and compared with the
joint runs of earlier files for the same scenario and seeds. This reads every file given, takes the
method's final-step PQ (all classes, and the step-0 classes' PQ before and after the updates) and joint's
final-step PQ per (scenario, seed), and prints per seed and mean ± std (population) over the seeds where
both exist. A seed whose step-0 PQ differs between the files is reported and left out: its joint run
did not start from the same deployed model.

    python benchmarks/panoptic_combine.py --method query_groups NEW.json OLD1.json OLD2.json \\
        --out benchmarks/results/panoptic_query_groups/own_backbone/summary.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from incremental.io import write_json  # noqa: E402
from panoptic_incremental import mean_std  # noqa: E402  (the benchmark's own mean ± population std)


def collect(paths: list[Path], method: str) -> dict[tuple[str, int], dict[str, Any]]:
    """(scenario, seed) -> the method's and joint's final PQ and the step-0 PQ, from every file (the
    first file that holds a method's run of a seed wins, so list the newest first)."""
    rows: dict[tuple[str, int], dict[str, Any]] = {}
    for path in paths:
        try:
            data = json.loads(path.read_text())
            for scenario, entry in data.get("scenarios", {}).items():
                for run in entry.get("seeds", []):
                    row = rows.setdefault((scenario, int(run["seed"])), {"before": {}, "files": {}})
                    row["before"][str(path)] = run["before_update"]["pq_all"]
                    for name, key in ((method, "method"), ("joint", "joint")):
                        if name in run["methods"] and key not in row:
                            m = run["methods"][name]
                            row[key] = {"pq_all": m["pq_all"][-1], "pq_base": m["pq_base"][-1]}
                            row["files"][key] = str(path)
        except (ValueError, KeyError, TypeError, AttributeError, IndexError) as exc:
            raise ValueError(f"{path}: not a result file of benchmarks/panoptic_incremental.py "
                             f"({type(exc).__name__}: {exc})") from None
    return rows


def summarise(rows: dict[tuple[str, int], dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for (scenario, seed), row in sorted(rows.items()):
        if "method" not in row or "joint" not in row:
            continue
        before = {round(v, 10) for v in row["before"].values()}
        entry = out.setdefault(scenario, {"seeds": {}, "left_out": {}})
        if len(before) > 1:
            entry["left_out"][seed] = f"step-0 PQ differs between files: {sorted(before)}"
            continue
        pq_before = next(iter(before))
        entry["seeds"][seed] = {"pq_all": row["method"]["pq_all"], "joint_pq_all": row["joint"]["pq_all"],
                                "kept": row["method"]["pq_base"] / pq_before,
                                "of_joint": row["method"]["pq_all"] / row["joint"]["pq_all"], "files": row["files"]}
    for entry in out.values():
        for key in ("kept", "of_joint", "pq_all"):
            values = [s[key] for s in entry["seeds"].values()]
            entry[key] = {**mean_std(values), "min": min(values)} if values else None
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--method", default="query_groups")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    missing = [str(p) for p in args.files if not p.is_file()]
    if missing:
        parser.error(f"no such file: {', '.join(missing)}")
    try:
        summary = summarise(collect(args.files, args.method))
    except ValueError as exc:
        parser.error(str(exc))
    for scenario, entry in summary.items():
        print(f"{scenario}: {args.method}")
        for seed, s in entry["seeds"].items():
            print(f"  seed {seed}: PQ all {s['pq_all']:.3f} (joint {s['joint_pq_all']:.3f})  kept {s['kept']:.1%}  "
                  f"of joint {s['of_joint']:.1%}")
        for seed, why in entry["left_out"].items():
            print(f"  seed {seed}: left out ({why})")
        if entry["kept"]:
            print(f"  mean ± std over {entry['kept']['n']} seeds: kept {entry['kept']['mean']:.1%} ± {entry['kept']['std']:.1%}"
                  f" (lowest {entry['kept']['min']:.1%}), of joint {entry['of_joint']['mean']:.1%} ± "
                  f"{entry['of_joint']['std']:.1%} (lowest {entry['of_joint']['min']:.1%})")
    if args.out:
        write_json(args.out, {"command": " ".join(["python", *sys.argv]), "method": args.method, "scenarios": summary})
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
