"""digits_transfer: the domain shift, the scene split, the runner and its config."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from incremental.config import ConfigError, from_dict
from incremental.runners.transfer import Config, TransferRun, run
from incremental.scenarios.digits_transfer import digits_transfer, domain_shift, few_shot_indices
from tests.tracking_helpers import assert_logged

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- the shift

def test_shift_inverts_and_rotates_by_hand() -> None:
    # One bright pixel at row 0, column 7 (top right) of an 8x8 image.
    # invert: that pixel becomes 0, every other pixel 1.
    # rot90 (counter-clockwise): out[i][j] = in[j][7 - i] -> out[0][0] = in[0][7] = 0: the dark pixel
    # moves to the top left corner.
    x = torch.zeros(1, 64)
    x[0, 0 * 8 + 7] = 1.0
    out = domain_shift(x, invert=True, rotation=90, noise_std=0.0).view(8, 8)
    expected = torch.ones(8, 8)
    expected[0, 0] = 0.0
    assert torch.equal(out, expected)
    # 180 degrees: out[i][j] = in[7 - i][7 - j] -> the dark pixel goes to row 7, column 0
    out = domain_shift(x, invert=True, rotation=180, noise_std=0.0).view(8, 8)
    assert out[7, 0] == 0.0 and out.sum() == 63.0


def test_shift_noise_is_deterministic_from_the_seed_and_clipped() -> None:
    x = torch.rand(20, 64, generator=torch.Generator().manual_seed(1))
    a = domain_shift(x, noise_std=0.3, seed=4)
    assert torch.equal(a, domain_shift(x, noise_std=0.3, seed=4))
    assert not torch.equal(a, domain_shift(x, noise_std=0.3, seed=5))
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0


def test_shift_with_any_angle_keeps_shape_and_range() -> None:
    x = torch.rand(3, 64)
    out = domain_shift(x, rotation=30, noise_std=0.0)
    assert out.shape == (3, 64) and float(out.min()) >= 0.0 and float(out.max()) <= 1.0


def test_shift_rejects_non_digit_shapes() -> None:
    with pytest.raises(ValueError, match=r"\(N, 64\)"):
        domain_shift(torch.zeros(2, 10))


# ---------------------------------------------------------------- the scenes

def test_few_shot_indices_per_class() -> None:
    y = np.array([0, 0, 0, 1, 1, 1, 1, 2, 2])
    idx = few_shot_indices(y, 2, seed=0)
    assert sorted(np.bincount(y[idx]).tolist()) == [2, 2, 2]
    assert np.array_equal(idx, few_shot_indices(y, 2, seed=0))
    with pytest.raises(ValueError, match="class 2 has only 2"):
        few_shot_indices(y, 3, seed=0)


def test_scenes_sizes_and_what_goes_where() -> None:
    s = digits_transfer(5, noise_std=0.0, seed=0)
    assert len(s.transfer_train.dataset) == 50
    assert torch.bincount(s.transfer_train.dataset.y).tolist() == [5] * 10
    # transfer test = the general test images, shifted (never trained on in either form)
    assert torch.equal(s.transfer_test.dataset.x, domain_shift(s.general_test.dataset.x, noise_std=0.0))
    assert torch.equal(s.transfer_test.dataset.y, s.general_test.dataset.y)
    # transfer shots = shifted general *training* images
    shifted_train = domain_shift(s.general_train.dataset.x, noise_std=0.0)
    rows = {tuple(r.tolist()) for r in shifted_train}
    assert all(tuple(r.tolist()) in rows for r in s.transfer_train.dataset.x)
    assert len(s.general_train.dataset) + len(s.general_test.dataset) == 1797
    assert [e.current_experience for e in s.test_stream] == [0, 1]


def test_scenes_are_deterministic_per_seed() -> None:
    a, b, c = digits_transfer(10, seed=3), digits_transfer(10, seed=3), digits_transfer(10, seed=4)
    assert torch.equal(a.transfer_train.dataset.x, b.transfer_train.dataset.x)
    assert not torch.equal(a.transfer_train.dataset.x, c.transfer_train.dataset.x)


# ---------------------------------------------------------------- config

def small_config(name: str = "gradient_mixing", **history) -> Config:
    plugins = [] if name == "naive" else [{"name": name}]
    return from_dict(Config, {
        "scenario": {"name": "digits_transfer", "shots": 5},
        "general": {"epochs": 2},
        "strategy": {"plugins": plugins, "history": {"mem_size": 100 if plugins else 0, **history}},
        "train": {"epochs": 5},
        "model": {"hidden_size": 32},
    })


@pytest.mark.parametrize("key,value,match", [
    ("scenario", {"name": "digits_transfer", "shots": 0}, "scenario.shots"),
    ("strategy", {"regime": "joint"}, "strategy.regime"),
    ("general", {"epochs": 0}, "general.epochs"),
    ("model", {"growing_head": True}, "model.growing_head"),
])
def test_config_errors_name_the_key(key: str, value: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        from_dict(Config, {"scenario": {"name": "digits_transfer"}, key: value} if key != "scenario" else {key: value})


def test_too_many_shots_for_the_split_is_a_config_error() -> None:
    cfg = from_dict(Config, {"scenario": {"name": "digits_transfer", "shots": 100, "test_fraction": 0.6}})
    with pytest.raises(ConfigError, match="scenario.shots.*cannot take shots=100"):
        TransferRun(cfg)


def test_every_shipped_config_validates() -> None:
    from incremental.cli import prepare_run

    from strategies.mixing_rules import DEFAULT_RULE

    paths = [REPO / "configs" / "digits_transfer.yaml", REPO / "configs" / "fashion_transfer.yaml",
             *sorted((REPO / "configs").glob("split_digits_gradient_mixing*.yaml"))]
    assert len(paths) >= 7
    rules = set()
    for path in paths:
        _, cfg, _ = prepare_run(str(path), [])
        assert cfg.strategy.names() == ["gradient_mixing"]
        rules.add(cfg.strategy.plugins[0].get("rule", DEFAULT_RULE))
    assert rules == {DEFAULT_RULE, "sum", "agem", "pcgrad", "mega"}


# ---------------------------------------------------------------- the runner

def test_run_reports_both_scenes_before_and_after(tmp_path: Path) -> None:
    results = run(small_config(), tmp_path)
    for key in ("general_accuracy", "transfer_accuracy"):
        assert set(results[key]) == {"before", "after"}
    R = results["accuracy_matrix"]
    assert R == [[results["general_accuracy"]["before"], results["transfer_accuracy"]["before"]],
                 [results["general_accuracy"]["after"], results["transfer_accuracy"]["after"]]]
    assert results["general_drop"] == pytest.approx(R[0][0] - R[1][0])
    assert results["gradient_stats"]["1"]["iterations"] == 5 * 2  # 50 shots / 32 = 2 steps per epoch
    assert (tmp_path / "accuracy_before_after.png").is_file()
    assert (tmp_path / "gradient_mixing_exp1.png").is_file()


def test_meta_model_is_the_same_for_every_strategy_and_runs_repeat() -> None:
    befores = []
    for name in ("naive", "replay", "gradient_mixing"):
        r = TransferRun(small_config(name=name))
        befores.append(r.step(0))
    assert befores[0] == befores[1] == befores[2]
    a, b = TransferRun(small_config()), TransferRun(small_config())
    for r in (a, b):
        r.step(0)
        r.step(1)
    assert a.accuracy_matrix == b.accuracy_matrix


def test_resume_after_the_general_step_gives_the_same_numbers(tmp_path: Path) -> None:
    import dataclasses

    from incremental.checkpoint import RunCheckpointer

    cfg = small_config(policy="herding")  # the library and DER's logits are rebuilt on resume
    full = run(cfg, tmp_path / "full")
    killed = TransferRun(cfg)
    killed.step(0)
    RunCheckpointer(tmp_path / "resumed", dataclasses.asdict(cfg)).save(killed, 1)
    resumed = run(cfg, tmp_path / "resumed", resume=True)
    assert resumed["accuracy_matrix"] == full["accuracy_matrix"]


def test_cli_run_writes_before_and_after(tmp_path: Path) -> None:
    from incremental.cli import main

    code = main(["run", str(REPO / "configs" / "digits_transfer.yaml"), "--out", str(tmp_path), "--quiet",
                 "--set", "general.epochs=1", "--set", "train.epochs=2", "--set", "model.hidden_size=16"])
    assert code == 0
    payload = json.loads((tmp_path / "results.json").read_text())
    assert set(payload["general_accuracy"]) == {"before", "after"}
    assert set(payload["transfer_accuracy"]) == {"before", "after"}
    assert payload["config"]["scenario"]["name"] == "digits_transfer"
    assert_logged(tmp_path, experiences=2)
