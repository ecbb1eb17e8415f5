"""The semi-supervised probes of benchmarks/multitask_semi_supervised.py: what the EMA teacher fills in,
where, and the EMA step itself, by hand on a two-task toy model."""
from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from multitask_semi_supervised import Consistency, TeacherFill  # noqa: E402

from incremental.multitask.tasks import LabelDict, TaskSpec  # noqa: E402

TASKS = [TaskSpec("age", "regression", marker=-1.0), TaskSpec("smile", "binary", marker=-1.0)]


class Toy(torch.nn.Module):
    """age = w * x, smile logit = v * x (x one number per sample)."""

    def __init__(self, w: float, v: float) -> None:
        super().__init__()
        self.w, self.v = torch.nn.Parameter(torch.tensor(w)), torch.nn.Parameter(torch.tensor(v))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"age": self.w * x, "smile": self.v * x}


def strategy(model: torch.nn.Module, x: list[float], age: list[float], smile: list[float]) -> SimpleNamespace:
    y = LabelDict(age=torch.tensor(age), smile=torch.tensor(smile))
    s = SimpleNamespace(model=model, mbatch=[torch.tensor(x), y, torch.zeros(len(x))], plugins=[])
    s.mb_x, s.mb_y = s.mbatch[0], s.mbatch[1]
    return s


def test_teacher_fill_replaces_missing_labels_only_and_waits_for_its_epoch() -> None:
    plugin = TeacherFill(TASKS, start_epoch=1)
    s = strategy(Toy(2.0, 3.0), [1.0, 2.0], [30.0, -1.0], [-1.0, 1.0])
    plugin.before_training_exp(s)
    plugin.before_training_iteration(s)
    assert s.mbatch[1]["age"].tolist() == [30.0, -1.0]  # epoch 0 < start_epoch: untouched
    plugin.after_training_epoch(s)
    plugin.before_training_iteration(s)
    filled = s.mbatch[1]
    assert filled["age"].tolist() == [30.0, 4.0]  # the teacher's age for sample 2: 2 * 2
    assert filled["smile"].tolist() == [1.0, 1.0]  # sigmoid(3 * 1) > 0.5 -> 1; sample 2 keeps its label


def test_confidence_rule_and_classification_only() -> None:
    # logit 0.5 * x: sample 1 p = sigmoid(0.5) = 0.62 (not sure), sample 2 p = sigmoid(4) = 0.98 (sure)
    plugin = TeacherFill(TASKS, start_epoch=0, confidence=0.95, classification_only=True)
    s = strategy(Toy(2.0, 0.5), [1.0, 8.0], [-1.0, -1.0], [-1.0, -1.0])
    plugin.before_training_exp(s)
    plugin.before_training_iteration(s)
    assert s.mbatch[1]["smile"].tolist() == [-1.0, 1.0]
    assert s.mbatch[1]["age"].tolist() == [-1.0, -1.0]  # regression left alone


def test_ema_step_by_hand() -> None:
    plugin = TeacherFill(TASKS)
    model = Toy(1.0, 1.0)
    s = strategy(model, [1.0], [1.0], [1.0])
    plugin.before_training_exp(s)
    with torch.no_grad():
        model.w.fill_(2.0)
    plugin.after_update(s)
    assert float(plugin.teacher.w) == pytest.approx(0.99 * 1.0 + 0.01 * 2.0)


def test_consistency_pulls_only_missing_entries_towards_the_teacher() -> None:
    weighting = SimpleNamespace(loss_scales=lambda: torch.tensor([2.0, float("nan")]),
                                current_weights=lambda: torch.tensor([1.0, 1.0]), criterion=None)
    plugin = Consistency(TASKS[:1], ramp_epochs=0)
    model = Toy(1.0, 1.0)
    s = strategy(model, [1.0, 3.0], [5.0, -1.0], [1.0, 1.0])
    s.plugins = [weighting]
    plugin.before_training_exp(s)
    with torch.no_grad():
        model.w.fill_(2.0)  # student 2x, teacher still 1x
    s.mb_output = model(s.mb_x)
    s.loss = torch.zeros(())
    plugin.epoch = 1
    plugin.before_backward(s)
    # only sample 2 is missing its age: (2 * 3 - 1 * 3)^2 = 9, times w / s = 1 / 2
    assert float(s.loss) == pytest.approx(4.5)
