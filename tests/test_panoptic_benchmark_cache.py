"""The panoptic benchmarks' cache keys: shared where the training is the same, distinct otherwise."""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from incremental.config import apply_overrides, load_yaml  # noqa: E402
from incremental.runners.panoptic import Config, config_from  # noqa: E402
from panoptic_cache import base_key, joint_key  # noqa: E402


def config(name: str, *overrides: str) -> Config:
    return config_from(apply_overrides(load_yaml(ROOT / "configs" / name), list(overrides)))


def test_step0_model_is_shared_by_both_scenarios_and_ignores_the_update_settings():
    three_two = config("panoptic_shapes_3-2.yaml")
    assert base_key(three_two) == base_key(config("panoptic_shapes_3-1-1.yaml"))
    assert base_key(three_two) == base_key(config("panoptic_shapes_3-2.yaml", "strategy.name=finetune",
                                                  "train.step_lr=0.01", "strategy.lambda_mask=3"))
    assert base_key(three_two) != base_key(config("panoptic_shapes_3-2.yaml", "seed=1"))
    assert base_key(three_two) != base_key(config("panoptic_shapes_3-2.yaml", "train.base_epochs=39"))


def test_joint_key_follows_the_scenario_not_the_strategy():
    three_two = config("panoptic_shapes_3-2.yaml")
    assert joint_key(three_two) != joint_key(config("panoptic_shapes_3-1-1.yaml"))
    assert joint_key(three_two) == joint_key(config("panoptic_shapes_3-2.yaml", "strategy.gamma=2",
                                                    "scenario.data_dir=/elsewhere"))
    assert joint_key(three_two) != joint_key(config("panoptic_shapes_3-2.yaml", "train.joint_epochs=5"))
