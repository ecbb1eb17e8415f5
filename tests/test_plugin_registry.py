"""One plugin registry for every family: names, options checked against signatures, user plugins,
old strategy names as aliases, the replay plugin in both loops."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from incremental.cli import main
from incremental.config import ConfigError
from incremental.plugins import Plugin
from strategies import registry
from strategies.registry import FamilyHook, build_plugin, build_plugins

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--set", "train.epochs=1", "--set", "scenario.n_experiences=2", "--set", "model.hidden_size=16", "--quiet"]


class CountingPlugin(Plugin):
    """A user's plugin: counts training iterations."""

    def __init__(self, *, every: int = 1, label: str = "x") -> None:
        super().__init__()
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.every, self.label, self.count = every, label, 0

    def after_training_iteration(self, strategy, **kwargs):
        self.count += 1


def test_built_in_names_resolve_and_options_are_typed():
    plugin = build_plugin({"name": "gradient_mixing", "rule": "pcgrad"})
    assert type(plugin).__name__ == "GradientMixingPlugin" and plugin.rule_name == "pcgrad"
    lwf = build_plugin({"name": "lwf", "alpha": 2, "temperature": 1})
    assert type(lwf).__name__ == "LwFPlugin"
    assert build_plugin({"name": "tests.test_plugin_registry:CountingPlugin", "every": 3}).every == 3


@pytest.mark.parametrize("entry, key, text", [
    ({"name": "magic"}, "strategy.plugins[0].name", "unknown plugin 'magic'"),
    ({"name": "replay", "rule": "sum"}, "strategy.plugins[0].rule", "unknown option of plugin 'replay'"),
    ({"name": "gradient_mixing", "mem_size": 5}, "strategy.plugins[0].mem_size", "configured in strategy.history"),
    ({"name": "tests.test_plugin_registry:CountingPlugin", "every": "often"}, "strategy.plugins[0].every",
     "expected an integer"),
    ({"name": "tests.test_plugin_registry:CountingPlugin", "every": 0}, "strategy.plugins[0]", "every must be >= 1"),
    ({"name": "tests.test_plugin_registry:Nope"}, "strategy.plugins[0].name", "has no 'Nope'"),
])
def test_bad_entries_are_one_line_naming_the_option(entry, key, text):
    with pytest.raises(ConfigError) as info:
        build_plugin(entry)
    assert str(info.value).startswith(key) and text in str(info.value) and "\n" not in str(info.value)


def test_a_name_twice_is_refused():
    with pytest.raises(ConfigError, match="'replay' is listed twice"):
        build_plugins([{"name": "replay"}, {"name": "replay"}])


def test_entry_points_register_user_plugins(monkeypatch):
    class EntryPoint:
        name = "counting"

        def load(self):
            return CountingPlugin

    monkeypatch.setattr(registry, "_entry_points", lambda: {"counting": EntryPoint()})
    assert "counting" in registry.known_names()
    assert isinstance(build_plugin({"name": "counting", "label": "y"}), CountingPlugin)


def test_family_hooks_add_options_and_objects():
    seen = {}

    def build(options):
        seen.update(options)
        return {"label": f"threshold {options['threshold']}"}

    hook = FamilyHook(build, options={"threshold": float}, defaults={"threshold": 0.5})
    entry = {"name": "tests.test_plugin_registry:CountingPlugin", "threshold": 1}
    plugin = build_plugin(entry, hooks={entry["name"]: hook})
    assert plugin.label == "threshold 1.0" and seen == {"threshold": 1.0}


def test_run_defaults_reach_only_plugins_that_take_them():
    gm = build_plugin({"name": "gradient_mixing"}, defaults={"seed": 7})
    assert gm.seed == 7
    assert isinstance(build_plugin({"name": "tests.test_plugin_registry:CountingPlugin"}, defaults={"seed": 7}),
                      CountingPlugin)


# ----------------------------------------------------------------------------- through the CLI
def _run(tmp_path, capsys, name, *sets):
    code = main(["run", str(ROOT / "configs/quickstart.yaml"), "--out", str(tmp_path / name), *TINY,
                 *[x for s in sets for x in ("--set", s)]])
    captured = capsys.readouterr()
    return code, captured.err, tmp_path / name / "results.json"


def test_old_strategy_names_are_aliases_with_one_line_notice(tmp_path, capsys):
    code, err, new = _run(tmp_path, capsys, "new", "strategy.plugins=[{name: replay}]", "strategy.history.mem_size=50")
    assert code == 0 and "deprecated" not in err
    code, err, old = _run(tmp_path, capsys, "old", "strategy.name=replay", "strategy.mem_size=50")
    assert code == 0
    notices = [line for line in err.splitlines() if line.startswith("deprecated:")]
    assert len(notices) == 1 and "strategy.plugins [replay]" in notices[0]
    a, b = json.loads(new.read_text()), json.loads(old.read_text())
    assert a["accuracy_matrix"] == b["accuracy_matrix"]
    assert b["config"]["strategy"]["plugins"] == [{"name": "replay"}]


def test_naive_is_the_empty_list_and_an_unused_library_is_refused(tmp_path, capsys):
    code, err, _ = _run(tmp_path, capsys, "a", "strategy.plugins=[]")
    assert code == 2 and "strategy.history: a history library is configured but no plugin uses it" in err
    code, _, naive = _run(tmp_path, capsys, "b", "strategy.plugins=[]", "strategy.history.mem_size=0")
    code_old, _, naive_old = _run(tmp_path, capsys, "c", "strategy.name=naive")
    assert code == code_old == 0
    assert json.loads(naive.read_text())["accuracy_matrix"] == json.loads(naive_old.read_text())["accuracy_matrix"]


def test_plugins_combine_and_user_plugins_run_in_the_loop(tmp_path, capsys):
    code, err, path = _run(tmp_path, capsys, "u", "strategy.plugins=[{name: gradient_mixing}, {name: lwf, alpha: 0.5}, "
                                                  "{name: 'tests.test_plugin_registry:CountingPlugin'}]")
    assert code == 0, err
    assert [e["name"] for e in json.loads(path.read_text())["config"]["strategy"]["plugins"]][1] == "lwf"


def test_replay_plugin_runs_inside_avalanche_with_its_own_library():
    import torch
    from avalanche.training import Naive

    from strategies.replay import ReplayPlugin
    from tests.avalanche_helpers import avalanche_split_digits, quiet_evaluator

    bench = avalanche_split_digits(n_experiences=2)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.ReLU(), torch.nn.Linear(16, 10))
    plugin = ReplayPlugin(own_mem_size=30, seed=0)
    sizes = []

    class Probe(Plugin):
        def before_forward(self, strategy, **kwargs):
            sizes.append(len(strategy.mb_x))

    strategy = Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                     criterion=torch.nn.CrossEntropyLoss(), train_mb_size=16, train_epochs=1, eval_mb_size=64,
                     plugins=[plugin, Probe()], evaluator=quiet_evaluator())
    for experience in bench.train_stream:
        strategy.train(experience)
    assert len(plugin.library) == 30
    assert max(sizes) == 32  # 16 new + 16 replayed once the library holds the first experience
