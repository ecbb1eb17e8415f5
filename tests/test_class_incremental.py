"""Class-incremental scenarios over users' data: splitting rules, presets, runs and bad inputs."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from incremental.cli import main
from incremental.config import ConfigError
from incremental.data import TensorSamples, TransformedSubset
from incremental.datasets import DataError
from incremental.scenarios import class_incremental as ci
from incremental.scenarios.class_incremental import (
    DataConfig, ScenarioConfig, build_benchmark, experience_sizes, resolve_order,
)
from incremental.transforms import NormalizeConfig, RandomCropConfig, TransformsConfig
from tests.data_fixtures import class_images, write_idx_folder, write_image_folder


def test_experience_sizes_by_count_by_size_and_with_a_first_experience():
    assert experience_sizes(10, n_experiences=5) == [2, 2, 2, 2, 2]
    assert experience_sizes(10, n_experiences=3) == [4, 3, 3]
    assert experience_sizes(10, classes_per_experience=4) == [4, 4, 2]
    assert experience_sizes(10, classes_per_experience=2, first_experience_classes=6) == [6, 2, 2]
    assert experience_sizes(10, n_experiences=3, first_experience_classes=4) == [4, 3, 3]
    assert experience_sizes(100, n_experiences=6, first_experience_classes=50) == [50, 10, 10, 10, 10, 10]
    with pytest.raises(ConfigError, match="scenario.n_experiences: must be between 1"):
        experience_sizes(4, n_experiences=5)
    with pytest.raises(ConfigError, match="scenario.first_experience_classes: is 7"):
        experience_sizes(4, n_experiences=2, first_experience_classes=7)


def test_class_order_takes_names_or_indices_and_names_a_class_the_data_lack():
    names = ["cat", "dog", "fox"]
    assert resolve_order(["fox", 0, "dog"], [0, 1, 2], names, False, 0) == [2, 0, 1]
    assert resolve_order(None, [2, 0, 1], names, False, 0) == [0, 1, 2]
    shuffled = resolve_order(None, [0, 1, 2], names, True, 3)
    assert sorted(shuffled) == [0, 1, 2] and shuffled == resolve_order(None, [0, 1, 2], names, True, 3)
    with pytest.raises(ConfigError, match="scenario.class_order: class 'owl' is not in the data"):
        resolve_order(["owl", 0, 1], [0, 1, 2], names, False, 0)
    with pytest.raises(ConfigError, match=r"scenario.class_order: class 7 is not in the data"):
        resolve_order([7, 0, 1], [0, 1, 2], names, False, 0)
    with pytest.raises(ConfigError, match=r"must list every class of the data once; missing \['fox'\]"):
        resolve_order([0, 1], [0, 1, 2], names, False, 0)


def _npz(tmp_path: Path, n_per_class: int = 10, n_classes: int = 4) -> Path:
    x, y = class_images(n_per_class, n_classes)
    np.savez(tmp_path / "data.npz", x=x, y=y, class_names=np.array(["a", "b", "c", "d"][:n_classes]))
    return tmp_path / "data.npz"


def test_npz_benchmark_in_memory_by_default_and_lazy_with_random_augmentation(tmp_path):
    cfg = ScenarioConfig(name="class_incremental", source="npz", root=str(_npz(tmp_path)), test_fraction=0.25,
                         n_experiences=2, class_order=["d", "c", "b", "a"])
    bench = build_benchmark(cfg, DataConfig(), seed=0)
    assert bench.in_memory and isinstance(bench.train_stream[0].dataset, TensorSamples)
    assert bench.classes_per_experience == [[2, 3], [0, 1]] and bench.input_shape == (1, 8, 8)
    assert sum(len(e.dataset) for e in bench.train_stream) == 30 and sum(len(e.dataset) for e in bench.test_stream) == 10
    assert all(set(e.dataset.labels.tolist()) == set(e.classes_in_this_experience) for e in bench.train_stream)
    assert bench.train_stream[0].dataset.x.dtype == torch.float32 and float(bench.train_stream[0].dataset.x.max()) <= 1.0
    cfg.transforms = TransformsConfig(random_crop=RandomCropConfig(padding=2), horizontal_flip=0.5)
    lazy = build_benchmark(cfg, DataConfig(), seed=0)
    assert not lazy.in_memory and isinstance(lazy.train_stream[0].dataset, TransformedSubset)
    assert lazy.train_stream[0].dataset.training and not lazy.test_stream[0].dataset.training
    with pytest.raises(ConfigError, match="data.in_memory: true transforms the data once"):
        build_benchmark(cfg, DataConfig(in_memory=True), seed=0)


def test_same_samples_on_both_paths(tmp_path):
    cfg = ScenarioConfig(name="class_incremental", source="npz", root=str(_npz(tmp_path)), test_fraction=0.25,
                         n_experiences=2, transforms=TransformsConfig(normalize=NormalizeConfig([0.5], [0.25])))
    fast = build_benchmark(cfg, DataConfig(in_memory=True), seed=0)
    lazy = build_benchmark(cfg, DataConfig(in_memory=False), seed=0)
    for a, b in zip(fast.train_stream + fast.test_stream, lazy.train_stream + lazy.test_stream):
        stacked = torch.stack([b.dataset[i][0] for i in range(len(b.dataset))])
        torch.testing.assert_close(stacked, a.dataset.x)
        assert b.dataset.labels.tolist() == a.dataset.labels.tolist()


def test_image_folder_with_train_and_test_folders(tmp_path):
    write_image_folder(tmp_path / "d" / "train", n_per_class=4, n_classes=3, seed=0)
    write_image_folder(tmp_path / "d" / "test", n_per_class=2, n_classes=3, seed=1)
    cfg = ScenarioConfig(name="class_incremental", source="imagefolder", root=str(tmp_path / "d"),
                         classes_per_experience=2, transforms=TransformsConfig(resize=[6, 6]))
    bench = build_benchmark(cfg, DataConfig(), seed=0)
    assert bench.class_names == ["cat", "dog", "fox"] and bench.classes_per_experience == [[0, 1], [2]]
    assert not bench.in_memory and bench.input_shape == (1, 6, 6)
    x, y, t = bench.train_stream[1].dataset[0]
    assert x.shape == (1, 6, 6) and x.dtype == torch.float32 and y == 2 and t == 0


def test_fashion_mnist_preset_says_how_to_get_the_files(tmp_path, monkeypatch):
    monkeypatch.setattr(ci, "DEBIAN_FASHION_MNIST", tmp_path / "nowhere")
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        build_benchmark(ScenarioConfig(name="split_fashion_mnist"), DataConfig(), seed=0)
    monkeypatch.setattr(ci, "DEBIAN_FASHION_MNIST", write_idx_folder(tmp_path / "fm", n_per_class=3, n_classes=10))
    bench = build_benchmark(ScenarioConfig(name="split_fashion_mnist"), DataConfig(), seed=0)
    assert bench.class_names[0] == "T-shirt/top" and len(bench.train_stream) == 5


def test_presets_fill_only_what_the_config_leaves_unset():
    cfg = ScenarioConfig(name="split_cifar100")
    assert (cfg.source, cfg.dataset, cfg.n_experiences) == ("torchvision", "CIFAR100", 10)
    assert ScenarioConfig(name="split_cifar100", n_experiences=20).n_experiences == 20


# ----------------------------------------------------------------------------- through the CLI
def _config(tmp_path: Path, scenario: dict, **sections) -> Path:
    data = {"seed": 0, "scenario": {"name": "class_incremental", **scenario},
            "strategy": {"plugins": [{"name": "replay"}], "history": {"mem_size": 20}},
            "train": {"epochs": 1, "batch_size": 8, "lr": 0.1},
            "model": {"name": "mlp", "hidden_size": 16}, **sections}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _run(argv, capsys):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_runs_an_image_folder_with_augmentation_and_reports_library_bytes(tmp_path, capsys):
    write_image_folder(tmp_path / "imgs", n_per_class=8, n_classes=3)
    config = _config(tmp_path, {"source": "imagefolder", "root": str(tmp_path / "imgs"), "test_fraction": 0.25,
                                "n_experiences": 3, "transforms": {"random_crop": {"padding": 1}}})
    code, out, err = _run(["run", str(config), "--out", str(tmp_path / "run"), "--quiet"], capsys)
    assert code == 0, err
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert len(results["accuracy_matrix"]) == 3 and results["in_memory"] is False
    assert results["class_names"] == ["cat", "dog", "fox"]
    # 18 training samples of 1x8x8 uint8 kept raw (64 bytes each) + labels and task labels (8 bytes each x 3)
    assert results["history_bytes"] == 18 * 64 + 18 * 8 * 3


@pytest.mark.parametrize("case, message", [
    ("missing_root", "scenario.root does not exist"),
    ("empty_class", "class folder holds no image"),
    ("unreadable", "cannot be read as an image"),
    ("unknown_class", "scenario.class_order: class 'owl' is not in the data"),
    ("label_outside", "y holds index 5, outside class_names"),
])
def test_cli_bad_data_is_one_line_exit_2_and_nothing_written(tmp_path, capsys, case, message):
    root = write_image_folder(tmp_path / "imgs", n_per_class=4, n_classes=3)
    scenario = {"source": "imagefolder", "root": str(root), "test_fraction": 0.25, "n_experiences": 3}
    if case == "missing_root":
        scenario["root"] = str(tmp_path / "nope")
    elif case == "empty_class":
        (root / "owl").mkdir()
    elif case == "unreadable":
        (root / "dog" / "bad.png").write_text("nope")
    elif case == "unknown_class":
        scenario["class_order"] = ["owl", "cat", "dog"]
    elif case == "label_outside":
        x, _ = class_images(2, 3)
        np.savez(tmp_path / "d.npz", x=x, y=np.array([0, 1, 2, 0, 1, 5]), class_names=np.array(["a", "b", "c"]))
        scenario = {"source": "npz", "root": str(tmp_path / "d.npz"), "test_fraction": 0.5, "n_experiences": 1}
    out = tmp_path / "run"
    code, _, err = _run(["run", str(_config(tmp_path, scenario)), "--out", str(out), "--quiet"], capsys)
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert not out.exists()


@pytest.mark.parametrize("kwargs, key", [
    (dict(n_experiences=0), "scenario.n_experiences"),
    (dict(channels=2), "scenario.channels"),
    (dict(source="npz", root="x.npz", test_fraction=2.0), "scenario.test_fraction"),
    (dict(name="no_such_scenario"), "scenario.name"),
])
def test_the_scenario_constructor_refuses_impossible_values(kwargs, key):
    """Issue 17: a ScenarioConfig built in code is checked like one read from a config file."""
    from incremental.config import ConfigError

    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        ScenarioConfig(**{"name": "class_incremental", "source": "npz", "root": "x.npz", "n_experiences": 2, **kwargs})
