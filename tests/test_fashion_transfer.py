"""fashion_transfer: the scenes from (a small stand-in for) the Fashion-MNIST IDX files, and the runner."""
from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from incremental.config import ConfigError, from_dict
from incremental.runners.transfer import Config, TransferRun
from incremental.scenarios.domain_shift import shift_images
from incremental.scenarios.fashion_transfer import fashion_transfer

REPO = Path(__file__).resolve().parents[1]


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture(scope="module")
def idx_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 training and 2 test images of 28x28 per class, in the IDX layout of the Debian package."""
    root = tmp_path_factory.mktemp("fashion")
    rng = np.random.RandomState(0)
    for split, per_class in (("train", 4), ("t10k", 2)):
        labels = np.repeat(np.arange(10), per_class)
        write_idx(root / f"{split}-images-idx3-ubyte.gz", rng.randint(0, 256, (len(labels), 28, 28)))
        write_idx(root / f"{split}-labels-idx1-ubyte.gz", labels)
    return root


def test_shift_inverts_rotates_and_blurs_by_hand() -> None:
    # One bright pixel at (0, 27) of a dark 28x28 image; invert: dark pixel on a white image; rot90 moves
    # (0, 27) to (0, 0); a blur spreads the dark pixel, keeping the value range.
    img = torch.zeros(1, 1, 28, 28)
    img[0, 0, 0, 27] = 1.0
    out = shift_images(img, invert=True, rotation=90)
    assert out[0, 0, 0, 0] == 0.0 and out.sum() == 28 * 28 - 1
    blurred = shift_images(img, invert=True, rotation=90, blur_sigma=1.0)
    assert 0.0 < float(blurred[0, 0, 0, 0]) < 1.0 and float(blurred.min()) >= 0.0
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        shift_images(torch.zeros(2, 64))


def test_scenes_what_goes_where(idx_root: Path) -> None:
    s = fashion_transfer(2, root=idx_root, invert=True, rotation=90, blur_sigma=0.0, seed=0)
    assert s.input_shape == (1, 28, 28) and s.n_classes == 10
    assert len(s.general_train.dataset) == 40 and len(s.general_test.dataset) == 20
    assert torch.bincount(s.transfer_train.dataset.y).tolist() == [2] * 10
    # transfer test = the general test images, shifted; the shots = shifted general *training* images
    assert torch.equal(s.transfer_test.dataset.x, shift_images(s.general_test.dataset.x))
    shifted_train = {tuple(r.flatten().tolist()) for r in shift_images(s.general_train.dataset.x)}
    assert all(tuple(r.flatten().tolist()) in shifted_train for r in s.transfer_train.dataset.x)
    other = fashion_transfer(2, root=idx_root, invert=True, rotation=90, blur_sigma=0.0, seed=1)
    assert not torch.equal(other.transfer_train.dataset.x, s.transfer_train.dataset.x)
    # the defaults (the shipped config's shift): rotated by 90 degrees and blurred by one pixel, not inverted
    default = fashion_transfer(2, root=idx_root, seed=0)
    assert torch.equal(default.transfer_test.dataset.x,
                       shift_images(s.general_test.dataset.x, invert=False, rotation=90, blur_sigma=1.0))


def small(root: Path, **strategy) -> Config:
    return from_dict(Config, {
        "scenario": {"name": "fashion_transfer", "shots": 2, "root": str(root)},
        "general": {"epochs": 1, "batch_size": 8},
        "strategy": {"plugins": [{"name": "gradient_mixing", **strategy}], "history": {"mem_size": 20, "policy": "herding"}},
        "train": {"epochs": 3, "batch_size": 8},
        "model": {"name": "mlp", "hidden_size": 16, "hidden_layers": 2},
    })


def test_runner_adapts_with_the_default_gradient_mixing(idx_root: Path) -> None:
    run = TransferRun(small(idx_root))
    run.step(0)
    run.step(1)
    results = run.results()
    assert set(results["general_accuracy"]) == {"before", "after"}
    assert results["gradient_stats"]["1"]["iterations"] == 3 * 3  # 20 shots / 8 = 3 steps per epoch
    assert len(run.trainer.history) == 20


def test_config_errors_name_the_key(idx_root: Path) -> None:
    with pytest.raises(ConfigError, match="scenario.blur_sigma"):
        from_dict(Config, {"scenario": {"name": "fashion_transfer", "blur_sigma": -1}})
    with pytest.raises(ConfigError, match="scenario.blur_sigma: digits_transfer has no blur"):
        from_dict(Config, {"scenario": {"name": "digits_transfer", "blur_sigma": 1.0}})
    cfg = from_dict(Config, {"scenario": {"name": "fashion_transfer"}})  # each scene's own defaults
    assert (cfg.scenario.invert, cfg.scenario.noise_std, cfg.scenario.blur_sigma) == (False, 0.0, 1.0)
    with pytest.raises(ConfigError, match="scenario.shots"):
        TransferRun(from_dict(Config, {"scenario": {"name": "fashion_transfer", "shots": 5, "root": str(idx_root)}}))


def test_shipped_config_validates() -> None:
    from incremental.cli import prepare_run

    _, cfg, _ = prepare_run(str(REPO / "configs" / "fashion_transfer.yaml"), [])
    assert cfg.scenario.name == "fashion_transfer" and cfg.strategy.names() == ["gradient_mixing"]
    assert cfg.strategy.history.policy == "herding"


def test_split_fashion_mnist_config_takes_the_quickstart_overrides() -> None:
    from incremental.cli import prepare_run

    sets = ["seed=3", "scenario.class_order=[9,8,7,6,5,4,3,2,1,0]", "strategy.name=replay", "strategy.mem_size=500",
            "train.epochs=3", "train.batch_size=64", "train.lr=0.01", "model.name=mlp", "model.hidden_layers=3"]
    _, cfg, _ = prepare_run(str(REPO / "configs" / "split_fashion_mnist.yaml"), sets)
    assert (cfg.seed, cfg.scenario.class_order, cfg.strategy.names(), cfg.strategy.history.mem_size) == \
        (3, [9, 8, 7, 6, 5, 4, 3, 2, 1, 0], ["replay"], 500)
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.train.lr, cfg.model.hidden_layers) == (3, 64, 0.01, 3)


def test_split_fashion_mnist_3epochs_config_takes_the_measured_options() -> None:
    from incremental.cli import prepare_run
    from strategies.registry import build_plugin

    _, cfg, _ = prepare_run(str(REPO / "configs" / "split_fashion_mnist_3epochs.yaml"), [])
    assert (cfg.train.epochs, cfg.strategy.history.mem_size, cfg.train.grad_clip) == (3, 200, 5.0)
    (entry,) = cfg.strategy.plugins
    plugin = build_plugin(entry)
    assert (plugin.history_shift, plugin.logit_weight, plugin.rule_name) == (1, 1.0, "similarity_der")


@pytest.mark.parametrize("name,weight,shift", [("split_fashion_mnist_low_forgetting", 3.0, 1), ("digits_transfer", 3.0, 0)])
def test_configs_with_a_heavier_history_step_build_it(name: str, weight: float, shift: int) -> None:
    from incremental.cli import prepare_run
    from strategies.registry import build_plugin

    _, cfg, _ = prepare_run(str(REPO / "configs" / f"{name}.yaml"), [])
    (entry,) = cfg.strategy.plugins
    plugin = build_plugin(entry)
    assert (plugin.history_weight, plugin.history_shift, plugin.rule_name) == (weight, shift, "similarity_der")
