"""The classifiers' old flat ``strategy`` form (benchmarks and old configs build it) reaches the plugins
with every option the gradient-mixing plugin takes, and refuses a key it does not know by name."""
from __future__ import annotations

import pytest

from incremental.config import ConfigError
from incremental.runners.classification import config_from


def test_flat_gradient_mixing_options_reach_the_plugin_and_the_library() -> None:
    cfg = config_from({"strategy": {"name": "gradient_mixing", "mem_size": 200, "storage_policy": "reservoir",
                                    "rule": "pcgrad_der", "history_weight": 3, "history_shift": 1,
                                    "logit_adjustment": 0.5, "logit_weight": 1.0}})
    assert cfg.strategy.plugins == [{"name": "gradient_mixing", "rule": "pcgrad_der", "logit_weight": 1.0,
                                     "history_weight": 3, "history_shift": 1, "logit_adjustment": 0.5}]
    assert (cfg.strategy.history.mem_size, cfg.strategy.history.policy) == (200, "reservoir")


def test_flat_gradient_mixing_defaults_to_the_herding_library() -> None:
    cfg = config_from({"strategy": {"name": "gradient_mixing", "mem_size": 50}})
    assert cfg.strategy.plugins == [{"name": "gradient_mixing"}]
    assert (cfg.strategy.history.mem_size, cfg.strategy.history.policy) == (50, "herding")


def test_an_unknown_flat_key_is_named() -> None:
    with pytest.raises(ConfigError, match=r"strategy\.shift: unknown key"):
        config_from({"strategy": {"name": "gradient_mixing", "shift": 1}})
