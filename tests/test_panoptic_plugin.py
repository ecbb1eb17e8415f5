"""PseudoLabelDistillationPlugin inside incremental.Trainer (alone, with replay) and Avalanche's Naive."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from incremental import HistoryLibrary, Plugin, Trainer
from incremental.data import Experience, ListSamples, move_to
from incremental.panoptic.coco import collate_panoptic
from incremental.panoptic.criterion import SetCriterion
from incremental.panoptic.model import build_panoptic_model
from strategies import PseudoLabelDistillationPlugin
from strategies.pseudo_label_distillation import (
    MaskFormerAdapter,
    distillation_loss,
    mask_distillation_loss,
    no_object_weights,
)

TINY = dict(n_queries=4, hidden_dim=16, n_layers=1, n_heads=2, ffn_dim=16, mask_dim=16, backbone_channels=[8, 8, 8])
SIZE = 32


class FixedOldModel(nn.Module):
    """An 'old model' with 2 classes whose prediction is known: query 0 = class 0 on the top-left
    quarter (confident), query 1 = class 1 exactly on the ground-truth object, queries 2, 3 = no object."""

    n_classes = 2

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        b = x.shape[0]
        logits = torch.tensor([[6.0, 0.0, 0.0], [0.0, 6.0, 0.0], [0.0, 0.0, 6.0], [0.0, 0.0, 6.0]])
        masks = torch.full((4, SIZE // 4, SIZE // 4), -10.0)
        masks[0, :4, :4] = 10.0  # top-left quarter
        masks[1, 4:, 4:] = 10.0  # bottom-right quarter = the new object's ground truth
        return {"pred_logits": logits.expand(b, -1, -1), "pred_masks": masks.expand(b, -1, -1, -1)}


def new_object_sample(label: int = 2) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    mask = torch.zeros(1, SIZE, SIZE, dtype=torch.bool)
    mask[0, SIZE // 2:, SIZE // 2:] = True
    return torch.rand(3, SIZE, SIZE), {"labels": torch.tensor([label]), "masks": mask}, 0


def samples(n: int, label: int) -> ListSamples:
    torch.manual_seed(label)
    return ListSamples([new_object_sample(label) for _ in range(n)], torch.full((n,), label), collate_panoptic)


class RecordingCriterion(SetCriterion):
    def __init__(self) -> None:
        super().__init__()
        self.targets: list[list[dict]] = []
        self.values: list[float] = []

    def __call__(self, outputs, targets):
        self.targets.append(targets)
        loss = super().__call__(outputs, targets)
        self.values.append(float(loss))
        return loss


class LossProbe(Plugin):
    """Records strategy.loss after the plugins before it added their terms, and mb_output."""

    def __init__(self) -> None:
        super().__init__()
        self.losses: list[float] = []
        self.outputs: list[dict] = []

    def before_backward(self, strategy, **kwargs):
        self.losses.append(float(strategy.loss))
        self.outputs.append({"pred_logits": strategy.mb_output["pred_logits"].detach().clone(),
                             "pred_masks": strategy.mb_output["pred_masks"].detach().clone()})


def trainer_with(plugin, criterion, history=None) -> Trainer:
    torch.manual_seed(0)
    model = build_panoptic_model(n_classes=2, **TINY)
    probe = LossProbe()
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.01), criterion, train_mb_size=2,
                      plugins=[plugin, probe], history=history, seed=0)
    trainer.probe = probe  # type: ignore[attr-defined]
    return trainer


def test_pseudo_labels_reach_the_loss_and_distillation_is_added():
    criterion = RecordingCriterion()
    plugin = PseudoLabelDistillationPlugin(FixedOldModel(), lambda_distill=2.0, gamma=1.0)
    trainer = trainer_with(plugin, criterion)
    data = samples(2, label=2)
    trainer.train(Experience(data, 1, [2]))
    # The old model's class-0 query becomes a pseudo label; its class-1 query matches the ground
    # truth (IoU 1 > 0.5) and is dropped: targets are [gt class 2, pseudo class 0].
    (targets,) = criterion.targets
    assert [t["labels"].tolist() for t in targets] == [[2, 0], [2, 0]]
    pseudo = targets[0]["masks"][1]  # the 4x4 stride-4 cells upsampled: the top-left 16x16 pixels
    assert pseudo[:15, :15].all() and not pseudo[17:].any() and not pseudo[:, 17:].any()
    assert [len(s[1]["labels"]) for s in data.samples] == [1, 1]  # the data set itself is untouched
    # loss = criterion + lambda * distillation(old logits, current logits)
    old = FixedOldModel()(torch.zeros(2, 3, SIZE, SIZE))["pred_logits"]
    new = trainer.probe.outputs[0]["pred_logits"]
    expected = criterion.values[0] + 2.0 * float(distillation_loss(old.reshape(-1, 3), new.reshape(-1, 4), [0, 1], 2, 3))
    assert trainer.probe.losses[0] == pytest.approx(expected, rel=1e-5)
    assert plugin.summary()["pseudo_labels_per_image"] == 1.0
    # after the experience the plugin holds a frozen copy of the trained model as the next old model
    assert isinstance(plugin.old_model, type(trainer.model)) and not any(p.requires_grad for p in plugin.old_model.parameters())


def test_switches_for_ablations():
    criterion = RecordingCriterion()
    trainer = trainer_with(PseudoLabelDistillationPlugin(FixedOldModel(), pseudo_labels=False), criterion)
    trainer.train(Experience(samples(2, 2), 1, [2]))
    assert [t["labels"].tolist() for t in criterion.targets[0]] == [[2], [2]]
    assert trainer.probe.losses[0] > criterion.values[0]  # distillation only
    criterion = RecordingCriterion()
    trainer = trainer_with(PseudoLabelDistillationPlugin(FixedOldModel(), distillation=False), criterion)
    trainer.train(Experience(samples(2, 2), 1, [2]))
    assert trainer.probe.losses[0] == pytest.approx(criterion.values[0])  # pseudo labels only
    with pytest.raises(ValueError, match="gamma"):
        PseudoLabelDistillationPlugin(gamma=-1.0)


def old_logits_and_masks() -> tuple[torch.Tensor, torch.Tensor]:
    out = FixedOldModel()(torch.zeros(2, 3, SIZE, SIZE))
    return out["pred_logits"].reshape(-1, 3), out["pred_masks"].reshape(8, -1)


@pytest.mark.parametrize("claimed", ["skip", "no_object"])
def test_claimed_queries_are_skipped_or_distilled_to_no_object(claimed):
    # FixedOldModel's query 1 lies exactly on the ground-truth object: the ground truth claims it
    criterion = RecordingCriterion()
    trainer = trainer_with(PseudoLabelDistillationPlugin(FixedOldModel(), claimed_queries=claimed), criterion)
    trainer.train(Experience(samples(2, 2), 1, [2]))
    old, _ = old_logits_and_masks()
    new = trainer.probe.outputs[0]["pred_logits"].reshape(-1, 4)
    rows = torch.tensor([False, True, False, False] * 2)
    if claimed == "skip":
        distill = distillation_loss(old, new, [0, 1], 2, 3, row_mask=~rows)
    else:
        distill = distillation_loss(old, new, [0, 1], 2, 3, to_no_object=rows)
    assert trainer.probe.losses[0] == pytest.approx(criterion.values[0] + float(distill), rel=1e-5)
    plain = distillation_loss(old, new, [0, 1], 2, 3)
    assert float(distill) != pytest.approx(float(plain))


def test_unlabelled_queries_reach_the_criterion():
    for mode, expected in (("unbiased", {"unlabelled_classes": 2}),
                           ("skip", {"skip_queries": [True, False, False, False]})):  # q0 saw an unclaimed old object
        criterion = RecordingCriterion()
        trainer = trainer_with(PseudoLabelDistillationPlugin(FixedOldModel(), unlabelled_queries=mode), criterion)
        trainer.train(Experience(samples(2, 2), 1, [2]))
        for target in criterion.targets[0]:
            (key, value), = expected.items()
            assert (target[key].tolist() if isinstance(target[key], torch.Tensor) else target[key]) == value
            assert target["labels"].tolist() == [2, 0]  # the pseudo labels are still there
    criterion = RecordingCriterion()
    trainer = trainer_with(PseudoLabelDistillationPlugin(FixedOldModel()), criterion)
    trainer.train(Experience(samples(2, 2), 1, [2]))
    assert not any("skip_queries" in t or "unlabelled_classes" in t for t in criterion.targets[0])


def test_mask_distillation_is_added_with_its_weight():
    criterion = RecordingCriterion()
    plugin = PseudoLabelDistillationPlugin(FixedOldModel(), lambda_distill=0.0, lambda_mask=3.0)
    trainer = trainer_with(plugin, criterion)
    trainer.train(Experience(samples(2, 2), 1, [2]))
    old, old_masks = old_logits_and_masks()
    new_masks = trainer.probe.outputs[0]["pred_masks"].reshape(8, -1)
    weights = no_object_weights(old.softmax(-1)[:, 2])
    expected = criterion.values[0] + 3.0 * float(mask_distillation_loss(old_masks, new_masks, weights))
    assert trainer.probe.losses[0] == pytest.approx(expected, rel=1e-5)
    assert plugin.summary()["mean_mask_distillation_loss"] > 0


def test_deep_distillation_pairs_every_decoder_stage():
    torch.manual_seed(1)
    old = build_panoptic_model(n_classes=2, **{**TINY, "n_layers": 2})
    adapter = MaskFormerAdapter(distill_aux=True)

    class Strategy:
        mb_x = torch.rand(2, 3, SIZE, SIZE)
        mbatch = [mb_x, [new_object_sample()[1], new_object_sample()[1]]]

    strategy = Strategy()
    prediction = adapter.predict(old, strategy)
    current = build_panoptic_model(n_classes=3, **{**TINY, "n_layers": 2})
    strategy.mb_output = current(strategy.mb_x)
    pairs = adapter.distillation_pairs(prediction, strategy, old)
    assert len(pairs) == 3  # the query features before the first layer, after layer 1, after layer 2
    assert [tuple(p.new_logits.shape) for p in pairs] == [(8, 4)] * 3
    assert len(MaskFormerAdapter().distillation_pairs(prediction, strategy, old)) == 1


def test_plugin_options_are_validated():
    for kwargs, name in (({"lambda_mask": -1.0}, "lambda_mask"), ({"claimed_queries": "drop"}, "claimed_queries"),
                         ({"unlabelled_queries": "ignore"}, "unlabelled_queries"), ({"gamma": -1.0}, "gamma")):
        with pytest.raises(ValueError, match=name):
            PseudoLabelDistillationPlugin(**kwargs)


def test_first_experience_without_old_model_is_plain_training_then_snapshot():
    criterion = RecordingCriterion()
    plugin = PseudoLabelDistillationPlugin()
    trainer = trainer_with(plugin, criterion)
    trainer.train(Experience(samples(2, 0), 0, [0, 1]))
    assert [t["labels"].tolist() for t in criterion.targets[0]] == [[0], [0]]
    assert trainer.probe.losses[0] == pytest.approx(criterion.values[0])
    assert plugin.old_model is not None and plugin.old_model.n_classes == 2
    trainer.train(Experience(samples(2, 2), 1, [2]))  # second experience: distillation from the snapshot
    assert trainer.model.n_classes == 3 and plugin.stats["iterations"] == 1


def test_works_with_replay():
    criterion = RecordingCriterion()
    plugin = PseudoLabelDistillationPlugin()
    trainer = trainer_with(plugin, criterion, history=HistoryLibrary(2, seed=0))
    trainer.train(Experience(samples(2, 0), 0, [0, 1]))
    plugin.old_model = FixedOldModel()  # a known old model for the check below
    trainer.train(Experience(samples(2, 2), 1, [2]))
    # the minibatch holds 2 new images and 2 replayed ones; every image got the old model's pseudo label
    (targets,) = criterion.targets[1:]
    assert len(targets) == 4
    assert [t["labels"].tolist()[-1] for t in targets] == [0, 0, 0, 0]
    assert plugin.stats["images"] == 4


def test_adapter_interface_is_overridable():
    class NoPseudo(MaskFormerAdapter):
        def pseudo_targets(self, prediction, targets, old_model):
            return [{**t, "seen_by_adapter": True} for t in targets]

    criterion = RecordingCriterion()
    trainer = trainer_with(PseudoLabelDistillationPlugin(FixedOldModel(), adapter=NoPseudo()), criterion)
    trainer.train(Experience(samples(2, 2), 1, [2]))
    assert all(t["seen_by_adapter"] for t in criterion.targets[0])


def test_runs_inside_avalanche_naive():
    from avalanche.benchmarks.scenarios.dataset_scenario import benchmark_from_datasets
    from avalanche.benchmarks.utils import AvalancheDataset
    from avalanche.benchmarks.utils.data_attribute import DataAttribute
    from avalanche.training import Naive
    from torch.utils.data import DataLoader

    class PanopticNaive(Naive):
        """Avalanche's Naive for dict targets: its unpacking calls .to() on every batch field."""

        def _unpack_minibatch(self):
            self.mbatch = move_to(list(self.mbatch), self.device)

        def make_train_dataloader(self, shuffle=True, **kwargs):
            self.dataloader = DataLoader(self.adapted_dataset, batch_size=self.train_mb_size, shuffle=shuffle,
                                         collate_fn=collate_panoptic)

    def avalanche_dataset(s: ListSamples) -> AvalancheDataset:
        return AvalancheDataset([s], data_attributes=[DataAttribute(s.labels.tolist(), "targets"),
                                                      DataAttribute([0] * len(s), "targets_task_labels")],
                                collate_fn=collate_panoptic)

    bm = benchmark_from_datasets(train=[avalanche_dataset(samples(2, 0)), avalanche_dataset(samples(2, 2))])
    torch.manual_seed(0)
    model = build_panoptic_model(n_classes=3, **TINY)
    criterion = RecordingCriterion()
    plugin = PseudoLabelDistillationPlugin(lambda_distill=1.0)
    strategy = PanopticNaive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.01), criterion=criterion,
                             train_mb_size=2, train_epochs=1, plugins=[plugin], evaluator=None)
    experiences = list(bm.train_stream)
    strategy.train(experiences[0])
    assert plugin.old_model is not None and plugin.stats["iterations"] == 0
    plugin.old_model = FixedOldModel()  # known prediction: one pseudo label per image
    strategy.train(experiences[1])
    assert [t["labels"].tolist() for t in criterion.targets[-1]] == [[2, 0], [2, 0]]
    assert plugin.stats["iterations"] == 1 and math.isfinite(plugin.summary()["mean_distillation_loss"])
