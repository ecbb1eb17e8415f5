"""CSV logs under ``DIR/logs/``, appended while the run trains (written at every tracker flush:
at least once per experience; pandas reads them).

- ``iterations.csv``: one row per training iteration: ``iteration, experience, epoch``, then
  ``Loss_MB/train_phase/train_stream``, ``loss_terms/*``, ``loss_weights/*``;
- ``<plugin>.csv`` (``gradient_mixing.csv``): the plugin's per-iteration statistics, one row per iteration
  it recorded one;
- ``epochs.csv``: one row per epoch: ``Loss_Epoch``, ``Time_Epoch`` and the epoch means of terms and weights;
- ``eval.csv``: long format, one row per value: ``training_exp, iteration, metric, value`` with
  Avalanche's metric names (``Top1_Acc_Exp/eval_phase/test_stream/Exp003``, ...).

A column that appears mid-run (a loss term first computed in a later experience) rewrites the file once
with the wider header. A resumed run drops the rows of experiences its checkpoint had not
finished, so a killed and resumed run logs every iteration exactly once.
"""
from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from .tracker import IterationLog, Logger


FLOAT = "%.9g"


class GrowingCSV:
    """An append-only CSV file whose header can gain columns (the file is rewritten when it does)."""

    def __init__(self, path: Path, keep: Callable[[dict[str, str]], bool] | None = None) -> None:
        self.path = path
        self.fields: list[str] = []
        if keep is not None and path.is_file():
            with open(path, newline="") as handle:
                reader = csv.DictReader(handle)
                self.fields = list(reader.fieldnames or [])
                rows = [row for row in reader if keep(row)]
            self._rewrite(rows)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._open("w")

    def _rewrite(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """Write header and rows to a temporary file and rename it over the log (no fsync: it is a log,
        rewritten while training; a lost tail is rewritten by a resume)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, self.fields, restval="")
            if self.fields:
                writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, self.path)
        self._open("a")

    def _open(self, mode: str) -> None:
        self._handle = open(self.path, mode, newline="")
        self._writer = csv.writer(self._handle)

    def append(self, fields: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        """Append ``rows`` (values in the order of ``fields``)."""
        new = [f for f in fields if f not in self.fields]
        if new and not self.fields:  # empty file: the header is the first line
            self.fields = list(new)
            self._writer.writerow(self.fields)
        elif new:
            self._handle.close()
            with open(self.path, newline="") as handle:
                old = list(csv.DictReader(handle)) if self.fields else []
            self.fields += new
            self._rewrite(old)
        if list(fields) != self.fields:
            pos = {f: k for k, f in enumerate(fields)}
            rows = [[row[pos[f]] if f in pos else "" for f in self.fields] for row in rows]
        # NaN -> empty; floats with 9 significant digits: every float32 (losses, weights) round-trips, and
        # it is 2x faster than repr's shortest form, which was most of the logger's time on the quickstart.
        self._writer.writerows([["" if v != v else FLOAT % v if type(v) is float else v for v in row]
                                for row in rows])

    def flush(self) -> None:
        self._handle.flush()

    def close(self) -> None:
        self._handle.close()


MAIN_FILES = ("iterations.csv", "epochs.csv", "eval.csv")


class CSVLogger(Logger):
    """Writes ``iterations.csv``, ``epochs.csv``, ``eval.csv`` and one ``<plugin>.csv`` per plugin that
    keeps per-iteration statistics (``gradient_mixing.csv``: one row per iteration it mixed) in ``log_dir``.
    Why a file per plugin: its statistics start later than the loss (gradient mixing from the second
    experience) and would otherwise widen ``iterations.csv`` mid-run (a rewrite of the file).

    ``experiences_done``: when resuming, rows of experiences from this one on are dropped (they were
    logged by the killed run and will be logged again); ``None`` starts fresh files.
    """

    def __init__(self, log_dir: str | Path, experiences_done: int | None = None) -> None:
        self.dir = Path(log_dir)
        self.dir.mkdir(parents=True, exist_ok=True)

        def keep(column: str) -> Callable[[dict[str, str]], bool] | None:
            if experiences_done is None:
                return None
            return lambda row: row.get(column, "") != "" and int(row[column]) < experiences_done

        self.iterations = GrowingCSV(self.dir / "iterations.csv", keep("experience"))
        self.epochs = GrowingCSV(self.dir / "epochs.csv", keep("experience"))
        self.eval = GrowingCSV(self.dir / "eval.csv", keep("training_exp"))
        self.plugins: dict[str, GrowingCSV] = {}
        for path in sorted(self.dir.glob("*.csv")):
            if path.name in MAIN_FILES:
                continue
            if experiences_done is None:
                path.unlink()  # a fresh run: the old run's plugin logs go
            else:
                self.plugins[path.stem] = GrowingCSV(path, keep("experience"))
        self._detail: set[str] = set()
        self._epochs: list[tuple[list[str], list[Any]]] = []  # fields, row: epochs logged since the last flush

    def _plugin_file(self, prefix: str) -> GrowingCSV:
        if prefix not in self.plugins:
            self.plugins[prefix] = GrowingCSV(self.dir / f"{prefix}.csv")
        return self.plugins[prefix]

    def log_iterations(self, log: IterationLog) -> None:
        index = [log.iteration, log.experience, log.epoch]
        head = ["iteration", "experience", "epoch"]
        main = [k for k in log.values if k not in log.detail]
        self.iterations.append([*head, *main], list(zip(*index, *(log.values[k] for k in main))))
        groups: dict[str, list[str]] = {}
        for key in log.detail:
            groups.setdefault(key.split("/", 1)[0], []).append(key)
        self._detail.update(log.detail)
        for prefix, keys in groups.items():
            keys = sorted(keys, key=list(log.values).index)
            columns = [log.values[k] for k in keys]
            rows = [r for r in zip(*index, *columns) if any(v == v for v in r[3:])]
            self._plugin_file(prefix).append([*head, *(k.split("/", 1)[1] for k in keys)], rows)

    def log_epoch(self, iteration: int, experience: int, epoch: int, values: Mapping[str, float]) -> None:
        # Held until flush(): the epochs of a flushed block go to the file in one append.
        kept = {k: v for k, v in values.items() if k not in self._detail}
        self._epochs.append((["iteration", "experience", "epoch", *kept], [iteration, experience, epoch, *kept.values()]))

    def _write_epochs(self) -> None:
        pending, self._epochs = self._epochs, []
        start = 0
        for k in range(1, len(pending) + 1):  # one append per run of rows with the same columns
            if k == len(pending) or pending[k][0] != pending[start][0]:
                self.epochs.append(pending[start][0], [row for _, row in pending[start:k]])
                start = k

    def log_eval(self, iteration: int, experience: int, values: Mapping[str, float],
                 accuracy_matrix: Sequence[Sequence[float]] | None) -> None:
        self.eval.append(["training_exp", "iteration", "metric", "value"],
                         [[experience, iteration, k, v] for k, v in values.items()])
        self.eval.flush()

    def _files(self) -> list[GrowingCSV]:
        return [self.iterations, self.epochs, self.eval, *self.plugins.values()]

    def flush(self) -> None:
        self._write_epochs()
        for f in self._files():
            f.flush()

    def close(self) -> None:
        self._write_epochs()
        for f in self._files():
            f.close()
