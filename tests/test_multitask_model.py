"""HydraNet (multi-level fusion on / off) and the multi-task metrics."""
from __future__ import annotations

import pytest
import torch

from incremental.multitask.metrics import (
    MultiTaskAccumulator,
    delta_m,
    landmark_nme,
    mae,
    relative_drop,
)
from incremental.multitask.model import HydraNet, middle_stage
from incremental.multitask.tasks import TaskSpec

TASKS = [TaskSpec("pts", "points", dim=10), TaskSpec("pose", "regression", dim=3), TaskSpec("age", "regression"),
         TaskSpec("smile", "binary"), TaskSpec("race", "multiclass", dim=5)]


def test_middle_stage():
    # n/2 for even n, (n+1)/2 for odd n
    assert [middle_stage(n) for n in (3, 4, 5, 6)] == [2, 2, 3, 3]
    with pytest.raises(ValueError, match="more than 2 stages"):
        middle_stage(2)


def test_hydranet_outputs_per_task_type():
    model = HydraNet(TASKS, image_size=64, channels=(8, 16, 16, 32))
    out = model(torch.rand(3, 3, 64, 64))
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "pts": (3, 10), "pose": (3, 3), "age": (3,), "smile": (3,), "race": (3, 5)}


def test_fusion_reads_stages_1_j_n_and_off_reads_stage_n_only():
    on = HydraNet(TASKS, image_size=64, channels=(8, 16, 24, 32), fusion_channels=12)
    off = HydraNet(TASKS, image_size=64, channels=(8, 16, 24, 32), fusion=False, fusion_channels=12)
    # stage 1 (8) + stage j=2 (16) + stage n (32) channels into the 1x1 conv; off: stage n only
    assert on.last_shared_layer.in_channels == 8 + 16 + 32
    assert off.last_shared_layer.in_channels == 32
    assert on.last_shared_layer.out_channels == off.last_shared_layer.out_channels == 12
    # the heads see the same feature size either way
    assert on.shared_features(torch.rand(2, 3, 64, 64)).shape == off.shared_features(torch.rand(2, 3, 64, 64)).shape


@pytest.mark.parametrize("fusion", [True, False])
def test_fusion_passes_low_level_information_to_the_heads(fusion):
    # silence every stage after the first (zero conv weights: their output is constant); then only
    # the fusion path can carry anything about the image to the heads
    torch.manual_seed(0)
    model = HydraNet(TASKS, image_size=64, channels=(8, 16, 24, 32), fusion=fusion).eval()
    with torch.no_grad():
        for stage in model.stages[1:]:
            stage.body[0].weight.zero_()
    a = model.shared_features(torch.rand(2, 3, 64, 64))
    b = model.shared_features(torch.rand(2, 3, 64, 64))
    assert torch.allclose(a, b) is (not fusion)


def test_head_scaling_starts_at_the_label_mean():
    spec = TaskSpec("age", "regression", offset=(40.0,), scale=(1e-9,))
    model = HydraNet([spec], image_size=32, channels=(4, 4, 4))
    assert torch.allclose(model(torch.rand(2, 3, 32, 32))["age"], torch.full((2,), 40.0), atol=1e-3)


def test_bad_model_settings_are_clear():
    with pytest.raises(ValueError, match="at least 3 conv stages"):
        HydraNet(TASKS, channels=(8, 16))
    with pytest.raises(ValueError, match="divisible by 2\\*\\*4"):
        HydraNet(TASKS, image_size=40, channels=(8, 8, 8, 8))


# ------------------------------------------------------------------ metrics
def test_mae_and_nme_by_hand():
    # MAE of (1, 3) vs (2, 1): (1 + 2) / 2 = 1.5
    assert mae(torch.tensor([[1.0, 3.0]]), torch.tensor([[2.0, 1.0]])).tolist() == [1.5]
    # target eyes (0,0), (4,0); prediction (0,3), (4,0): mean error (3+0)/2 = 1.5, inter-ocular 4 -> 0.375
    nme = landmark_nme(torch.tensor([[0.0, 3.0, 4.0, 0.0]]), torch.tensor([[0.0, 0.0, 4.0, 0.0]]))
    assert nme.item() == pytest.approx(0.375)


def test_delta_m_by_hand():
    # a: accuracy 0.9 vs 0.8 (higher better): -(0.9-0.8)/0.8 = -0.125
    # b: MAE 2.2 vs 2.0 (lower better): (2.2-2)/2 = +0.1;  mean -0.0125 -> -1.25 %
    assert delta_m({"a": 0.9, "b": 2.2}, {"a": 0.8, "b": 2.0}, {"a": True, "b": False}) == pytest.approx(-1.25)
    assert relative_drop(0.5, 1.0, higher_is_better=True) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="lack tasks"):
        delta_m({"a": 1.0}, {"a": 1.0, "b": 1.0}, {"a": True, "b": True})


def test_accumulator_skips_missing_labels():
    specs = [TaskSpec("age", "regression", loss="l1"), TaskSpec("smile", "binary"), TaskSpec("race", "multiclass", dim=3)]
    acc = MultiTaskAccumulator(specs)
    out = {"age": torch.tensor([30.0, 50.0, 0.0]), "smile": torch.tensor([2.0, -2.0, 2.0]),
           "race": torch.tensor([[5.0, 0, 0], [0, 5.0, 0], [0, 0, 5.0]])}
    # age: samples 0, 1 labelled: |30-20| + |50-50| -> MAE 5; smile: (1, 1, marker) -> 1 of 2 right
    # race: labels (0, 2, -1): 1 of 2 right
    acc.update(out, {"age": torch.tensor([20.0, 50.0, -1.0]), "smile": torch.tensor([1.0, 1.0, -1.0]),
                     "race": torch.tensor([0, 2, -1])})
    r = acc.result()
    assert r["age"]["mae"] == pytest.approx(5.0) and r["age"]["count"] == 2
    assert r["smile"]["accuracy"] == pytest.approx(0.5) and r["race"]["accuracy"] == pytest.approx(0.5)
    empty = MultiTaskAccumulator(specs).result()
    assert empty["age"]["count"] == 0 and empty["age"]["mae"] != empty["age"]["mae"]  # nan
