"""Multi-task data from disk: UTKFace (labels in file names) and a generic CSV (one column per task).

Both read everything once into a :class:`~incremental.data.TensorSamples` with ``y = {task: tensor}``
(images resized to a square ``image_size``, float in [0, 1]). A file that cannot be used (a malformed
UTKFace name, an unreadable image, a bad CSV cell) is skipped and counted in the returned report,
with the first few reasons, never a crash halfway through a data set of 20,000 files.
"""
from __future__ import annotations

import csv
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..data import TensorSamples
from .tasks import LabelDict, TaskSpec

#: UTKFace's three tasks (gender 0 male / 1 female; race 0 White, 1 Black, 2 Asian, 3 Indian, 4 Others).
UTKFACE_TASKS: tuple[TaskSpec, ...] = (
    TaskSpec("age", "regression", loss="l1"),
    TaskSpec("gender", "binary"),
    TaskSpec("race", "multiclass", dim=5, class_names=("white", "black", "asian", "indian", "others")),
)

_UTK_NAME = re.compile(r"^(\d+)_(\d+)_(\d+)_(\d+)\.jpg(\.chip\.jpg)?$", re.IGNORECASE)
MAX_REASONS = 20


@dataclass
class LoadReport:
    """What a loader read: files found, samples loaded, and what was skipped and why."""

    source: str
    found: int = 0
    loaded: int = 0
    skipped: int = 0
    reasons: list[str] = field(default_factory=list)

    def skip(self, reason: str) -> None:
        self.skipped += 1
        if len(self.reasons) < MAX_REASONS:
            self.reasons.append(reason)

    def as_dict(self) -> dict[str, Any]:
        return {"source": self.source, "found": self.found, "loaded": self.loaded, "skipped": self.skipped,
                "skipped_examples": list(self.reasons)}


def parse_utkface_name(name: str) -> tuple[dict[str, int] | None, str]:
    """Labels from ``age_gender_race_datetime.jpg.chip.jpg`` (or ``.jpg``): (labels, "") or (None, why)."""
    m = _UTK_NAME.match(name)
    if m is None:
        return None, f"{name}: not age_gender_race_datetime.jpg.chip.jpg"
    age, gender, race = int(m.group(1)), int(m.group(2)), int(m.group(3))
    if not 0 <= age <= 120:
        return None, f"{name}: age {age} outside 0..120"
    if gender not in (0, 1):
        return None, f"{name}: gender {gender} is not 0 or 1"
    if not 0 <= race <= 4:
        return None, f"{name}: race {race} is not 0..4"
    return {"age": age, "gender": gender, "race": race}, ""


def read_image(path: Path, image_size: int) -> torch.Tensor:
    """(3, S, S) float32 in [0, 1]; raises OSError / ValueError on an unreadable file."""
    from PIL import Image

    with Image.open(path) as img:
        img = img.convert("RGB").resize((image_size, image_size), Image.BILINEAR)
        arr = np.asarray(img, dtype=np.float32) / 255.0
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


def load_utkface(directory: str | Path, image_size: int = 64, limit: int | None = None
                 ) -> tuple[TensorSamples, LoadReport]:
    """All UTKFace images of ``directory`` (sorted by name, first ``limit``) with age / gender / race."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"UTKFace directory {str(directory)!r} does not exist")
    report = LoadReport(str(directory))
    images, labels = [], {"age": [], "gender": [], "race": []}
    for path in sorted(p for p in directory.iterdir() if p.is_file()):
        if limit is not None and report.loaded >= limit:
            break
        report.found += 1
        parsed, why = parse_utkface_name(path.name)
        if parsed is None:
            report.skip(why)
            continue
        try:
            images.append(read_image(path, image_size))
        except (OSError, ValueError) as exc:
            report.skip(f"{path.name}: unreadable image ({exc})")
            continue
        for key, value in parsed.items():
            labels[key].append(value)
        report.loaded += 1
    if not images:
        raise ValueError(f"no usable UTKFace images in {directory} ({report.skipped} skipped: {report.reasons[:3]})")
    y = {
        "age": torch.tensor(labels["age"], dtype=torch.float32),
        "gender": torch.tensor(labels["gender"], dtype=torch.float32),
        "race": torch.tensor(labels["race"], dtype=torch.long),
    }
    return TensorSamples(torch.stack(images), y), report


def _parse_cell(cell: str, spec: TaskSpec) -> list[float] | None:
    """The label values of one CSV cell; None when the cell means "missing" (empty or the marker)."""
    text = cell.strip()
    if text == "":
        return None
    parts = [p for p in re.split(r"[\s;]+", text) if p]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise ValueError(f"{text!r} is not a number or a list of numbers") from None
    marker = spec.marker
    if all((math.isnan(v) if math.isnan(marker) else v == marker) for v in values):
        return None
    expected = 1 if spec.kind in ("binary", "multiclass") else spec.dim
    if len(values) != expected:
        raise ValueError(f"expected {expected} value(s), got {len(values)}")
    if spec.kind == "binary" and values[0] not in (0.0, 1.0):
        raise ValueError(f"a binary label must be 0 or 1, got {values[0]:g}")
    if spec.kind == "multiclass" and (values[0] != int(values[0]) or not 0 <= values[0] < spec.dim):
        raise ValueError(f"a class label must be an integer in 0..{spec.dim - 1}, got {values[0]:g}")
    return values


def load_csv_multitask(
    csv_path: str | Path, tasks: Sequence[TaskSpec], image_column: str = "path", image_size: int = 64,
    limit: int | None = None,
) -> tuple[TensorSamples, LoadReport]:
    """A CSV with an image path column and one column per task; empty or marker cells are missing.

    Image paths are relative to the CSV's folder (or absolute). Points / multi-value regression cells
    hold the values separated by spaces or ``;``. A row with a bad cell or an unreadable image is
    skipped and counted; a missing column is an error naming the file and the column.
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise FileNotFoundError(f"CSV file {str(csv_path)!r} does not exist")
    report = LoadReport(str(csv_path))
    with open(csv_path, newline="") as handle:
        reader = csv.DictReader(handle)
        columns = reader.fieldnames or []
        for needed in [image_column] + [t.name for t in tasks]:
            if needed not in columns:
                raise ValueError(f"{csv_path}: no column {needed!r} (columns: {columns})")
        images: list[torch.Tensor] = []
        values: dict[str, list[list[float]]] = {t.name: [] for t in tasks}
        for row_no, row in enumerate(reader, start=2):  # line 1 is the header
            if limit is not None and report.loaded >= limit:
                break
            report.found += 1
            parsed: dict[str, list[float]] = {}
            try:
                for spec in tasks:
                    try:
                        cell = _parse_cell(row.get(spec.name) or "", spec)
                    except ValueError as exc:
                        raise ValueError(f"column {spec.name!r}: {exc}") from None
                    n_values = 1 if spec.kind in ("binary", "multiclass") else spec.dim
                    parsed[spec.name] = cell if cell is not None else [spec.marker] * n_values
            except ValueError as exc:
                report.skip(f"{csv_path.name} line {row_no}: {exc}")
                continue
            rel = (row.get(image_column) or "").strip()
            path = Path(rel) if Path(rel).is_absolute() else csv_path.parent / rel
            if not rel:
                report.skip(f"{csv_path.name} line {row_no}: empty {image_column!r}")
                continue
            try:
                images.append(read_image(path, image_size))
            except (OSError, ValueError) as exc:
                report.skip(f"{csv_path.name} line {row_no}: image {rel!r} unreadable ({type(exc).__name__})")
                continue
            for name, vals in parsed.items():
                values[name].append(vals)
            report.loaded += 1
    if not images:
        raise ValueError(f"{csv_path}: no usable rows ({report.skipped} skipped: {report.reasons[:3]})")
    y: dict[str, torch.Tensor] = {}
    for spec in tasks:
        t = torch.tensor(values[spec.name], dtype=torch.float32)
        if spec.kind == "multiclass":
            y[spec.name] = t.reshape(-1).long()
        elif spec.kind == "binary" or (spec.kind == "regression" and spec.dim == 1):
            y[spec.name] = t.reshape(-1)
        else:
            y[spec.name] = t
    return TensorSamples(torch.stack(images), y), report


def split_samples(samples: TensorSamples, test_fraction: float, seed: int) -> tuple[TensorSamples, TensorSamples]:
    """Random train / test split (fixed by ``seed``)."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    n = len(samples)
    n_test = max(1, int(round(test_fraction * n)))
    if n_test >= n:
        raise ValueError(f"{n} samples are too few to split off {test_fraction:.0%} for testing")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))
    return samples.subset(order[n_test:].sort().values), samples.subset(order[:n_test].sort().values)


class _LabelDictDataset(torch.utils.data.Dataset):
    """``(x, LabelDict, t)`` per sample, for Avalanche's loaders (they call ``.to`` on every field)."""

    def __init__(self, samples: TensorSamples) -> None:
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, LabelDict, int]:
        y = self.samples.y
        return self.samples.x[i], LabelDict({k: v[i] for k, v in y.items()}), int(self.samples.t[i])


def avalanche_dataset(samples: TensorSamples) -> Any:
    """An ``AvalancheDataset`` over multi-task samples (imports Avalanche only when called)."""
    from avalanche.benchmarks.utils import make_avalanche_dataset

    return make_avalanche_dataset(_LabelDictDataset(samples))
