"""What every family's run must leave in ``DIR/logs``: the default CSV logger's iteration rows and one
evaluation row per experience, so a grid's report and a dashboard read any family alike."""
from __future__ import annotations

import csv
from pathlib import Path


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def assert_logged(run_dir: Path, experiences: int) -> None:
    logs = Path(run_dir) / "logs"
    iterations, evaluations = read_csv(logs / "iterations.csv"), read_csv(logs / "eval.csv")
    loss = "Loss_MB/train_phase/train_stream"  # Avalanche's name, as every logger writes it
    assert iterations and all(float(r[loss]) == float(r[loss]) for r in iterations), "no training loss logged"
    assert [int(r["iteration"]) for r in iterations] == list(range(len(iterations)))
    ends: dict[int, int] = {}  # training experience -> the iteration its evaluation was logged at
    for r in evaluations:
        assert ends.setdefault(int(r["training_exp"]), int(r["iteration"])) == int(r["iteration"]), r
    assert sorted(ends) == list(range(experiences)), evaluations
    # an iteration row names the experience whose evaluation follows it (what resume and dashboards group by)
    for row in iterations:
        e, i = int(row["experience"]), int(row["iteration"])
        assert ends.get(e - 1, 0) <= i < ends[e], (row, ends)
