"""The loop's two data paths: lazy DataLoader reading with per-epoch augmentation, and the in-memory
fast path; the history library's raw storage and per-replay transform."""
from __future__ import annotations

import torch
from torch import nn
from torchvision.transforms import v2

from incremental.buffer import HistoryLibrary
from incremental.data import EpochBatchSampler, Experience, TensorSamples, TransformedSubset, batch_indices
from incremental.models import MLP
from incremental.plugins import Plugin
from incremental.sources import ArraySource
from incremental.trainer import Trainer
from tests.data_fixtures import class_images


def _source(n_per_class: int = 8, n_classes: int = 2) -> ArraySource:
    x, y = class_images(n_per_class, n_classes)
    return ArraySource(torch.from_numpy(x).unsqueeze(1), torch.from_numpy(y), ["a", "b", "c", "d"][:n_classes], "fixture")


def _trainer(plugins=(), history=None, epochs=1, shuffle=True, seed=0, num_workers=0, batch=4) -> Trainer:
    torch.manual_seed(seed)
    model = MLP(64, 16, 4)
    return Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), nn.CrossEntropyLoss(), train_mb_size=batch,
                   train_epochs=epochs, plugins=list(plugins), history=history, seed=seed, shuffle=shuffle,
                   num_workers=num_workers)


class FirstBatchRecorder(Plugin):
    def __init__(self) -> None:
        super().__init__()
        self.first: list[torch.Tensor] = []

    def before_training_iteration(self, strategy, **kwargs):
        if strategy.clock.train_epoch_iterations == 0:
            self.first.append(strategy.mb_x.clone())


def test_random_augmentation_differs_between_epochs():
    source = _source()
    crop = v2.Compose([v2.RandomCrop(8, padding=2), v2.ToDtype(torch.float32, scale=True)])
    dataset = TransformedSubset(source, torch.arange(len(source)), crop, v2.ToDtype(torch.float32, scale=True))
    recorder = FirstBatchRecorder()
    _trainer([recorder], epochs=3, shuffle=False).train(Experience(dataset, 0, [0, 1]))
    assert len(recorder.first) == 3
    assert not torch.equal(recorder.first[0], recorder.first[1]) and not torch.equal(recorder.first[1], recorder.first[2])


class CountingDataset(torch.utils.data.Dataset):
    def __init__(self, n: int) -> None:
        self.reads = 0
        self.x = torch.rand(n, 64)
        self.targets = torch.arange(n) % 2

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        self.reads += 1
        return self.x[i], int(self.targets[i])


class ReadsAtFirstStep(Plugin):
    def __init__(self, dataset: CountingDataset) -> None:
        super().__init__()
        self.dataset, self.reads = dataset, None

    def before_training_iteration(self, strategy, **kwargs):
        if self.reads is None:
            self.reads = self.dataset.reads


def test_a_dataset_is_read_lazily_not_before_the_first_step():
    dataset = CountingDataset(200)
    probe = ReadsAtFirstStep(dataset)
    trainer = _trainer([probe], batch=8)
    trainer.train(Experience(dataset, 0, [0, 1]))
    assert probe.reads == 8  # the first minibatch, nothing more
    assert dataset.reads == 200  # one epoch reads each sample once
    history = HistoryLibrary(10, "reservoir", seed=0)
    before = dataset.reads
    history.update(dataset)
    assert dataset.reads - before == 10  # labels come from `targets`; only the kept samples are read


def _final_state(dataset, **kwargs) -> tuple[dict[int, dict], dict[str, torch.Tensor]]:
    trainer = _trainer(history=HistoryLibrary(6, "reservoir", seed=1), epochs=2, **kwargs)
    trainer.train(Experience(dataset, 0, [0, 1]))
    results = trainer.eval([Experience(dataset, 0, [0, 1])])
    return results, {k: v.clone() for k, v in trainer.model.state_dict().items()}


def test_same_seed_same_numbers_on_both_paths_and_with_workers():
    source = _source()
    scale = v2.ToDtype(torch.float32, scale=True)
    fast = TensorSamples(source.x.float() / 255, source.targets)
    lazy = TransformedSubset(source, torch.arange(len(source)), scale, scale)
    results_fast, state_fast = _final_state(fast)
    results_lazy, state_lazy = _final_state(lazy)
    results_workers, state_workers = _final_state(lazy, num_workers=2)
    assert results_fast == results_lazy == results_workers
    for key in state_fast:
        torch.testing.assert_close(state_lazy[key], state_fast[key])
        torch.testing.assert_close(state_workers[key], state_fast[key])


def test_epoch_batch_sampler_draws_the_fast_paths_order():
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    sampler = EpochBatchSampler(11, 4, g1, shuffle=True)
    assert len(sampler) == 3
    for _ in range(2):  # a fresh permutation each epoch, identical to the fast path's
        assert list(sampler) == [idx.tolist() for idx in batch_indices(11, 4, g2, True)]


def test_library_keeps_raw_samples_and_augments_each_replay():
    source = _source()
    flip_all = v2.Compose([v2.RandomCrop(8, padding=3), v2.ToDtype(torch.float32, scale=True)])
    dataset = TransformedSubset(source, torch.arange(len(source)), flip_all, v2.ToDtype(torch.float32, scale=True))
    library = HistoryLibrary(16, "class_balanced", seed=0)
    library.update(dataset)
    assert library.samples.x.dtype == torch.uint8  # stored as the data set has them
    assert library.nbytes == 16 * 64 + 16 * 8 * 3
    torch.manual_seed(0)
    first = library.sample(16)
    assert first[0].dtype == torch.float32 and float(first[0].max()) <= 1.0
    replays = torch.stack([library.sample(16)[0].sort(dim=0).values for _ in range(2)])
    assert not torch.equal(replays[0], replays[1])  # the same 16 samples, cropped differently
    exported = library.export_state()["samples"]["x"]
    assert exported.dtype == torch.float32  # packages carry exemplars as model inputs
    torch.testing.assert_close(exported, library.samples.x.float() / 255)
