"""Issue 17's six findings, each as a test that failed on the code before the fix.

1. NaN data / a non-finite loss destroyed a deployed model, and ``update`` wrote over its own --model;
2. two ``run`` processes with the same --out both "succeeded";
3. an .npz holding an object array ended in a numpy traceback;
4. Ctrl-C ended in a KeyboardInterrupt traceback;
5. ``lr: 1e-3`` was refused;
6. constructors accepted impossible values (here: the history library; plugins, models and scenarios
   are validated by their owners).
"""
from __future__ import annotations

import json
import signal
import time

import numpy as np
import pytest

from incremental.config import ConfigError, apply_overrides, load_yaml
from incremental.locking import lock_path_of
from incremental.package import load_model

from .reliability_helpers import (ROOT, TINY_RUN, cli_process, new_class_npz, run_main, snapshot,
                                  tiny_classifier_package)


# ----------------------------------------------------------------------------------------- finding 1
def test_1_a_nan_sample_is_refused_and_the_deployed_model_is_untouched(tmp_path):
    deployed = tmp_path / "deployed"
    package = tiny_classifier_package(deployed / "model.pt")
    data = new_class_npz(tmp_path / "new.npz")
    arrays = dict(np.load(data))
    arrays["x"][7, 5] = np.nan
    np.savez(data, **arrays)
    before = snapshot(deployed, data)
    code, _, err = run_main(["update", "--model", str(package), "--data", str(data), "--out", str(deployed), "--force"])
    assert code == 2, err
    assert err.count("\n") == 1 and "new.npz" in err and "sample 7" in err and "NaN" in err, err
    assert snapshot(deployed, data) == before


def test_1_update_refuses_an_out_holding_a_package_and_replaces_it_only_with_force(tmp_path):
    deployed = tmp_path / "deployed"
    package = tiny_classifier_package(deployed / "model.pt")
    data = new_class_npz(tmp_path / "new.npz")
    before = snapshot(deployed)
    args = ["update", "--model", str(package), "--data", str(data), "--out", str(deployed), "--epochs", "1", "--quiet"]
    code, _, err = run_main(args)
    assert code == 2 and err.count("\n") == 1 and "--force" in err and "model.pt" in err, err
    assert snapshot(deployed) == before
    # a folder holding only a report is someone's output too
    other = tmp_path / "other"
    other.mkdir()
    (other / "report.json").write_text("{}")
    code, _, err = run_main([*args[:5], "--out", str(other)])
    assert code == 2 and "report.json" in err
    assert (other / "report.json").read_text() == "{}"
    # --force: the new package replaces the old one once the update succeeded, nothing else is left
    code, _, err = run_main([*args, "--force"])
    assert code == 0, err
    assert load_model(deployed / "model.pt").class_names == ["zero", "one", "two", "three"]
    assert sorted(p.name for p in deployed.iterdir()) == ["model.pt", "report.json", "report.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deployed", "new.npz", "other"]


def _nan_loss_at(monkeypatch, experience: int, iteration: int) -> None:
    """Make the loss NaN from (experience, iteration) on, as a diverging run's loss becomes."""
    from incremental.trainer import Trainer

    original = Trainer.criterion

    def criterion(self):
        loss = original(self)
        clock = self.clock
        if (clock.train_exp_counter, clock.train_exp_iterations) >= (experience, iteration):
            loss = loss * float("nan")
        return loss

    monkeypatch.setattr(Trainer, "criterion", criterion)


def test_1_a_diverging_run_stops_keeps_its_last_good_checkpoint_and_writes_no_package(tmp_path, monkeypatch):
    _nan_loss_at(monkeypatch, experience=1, iteration=3)
    out = tmp_path / "run"
    code, _, err = run_main(["run", str(ROOT / "configs/split_digits_naive.yaml"), "--out", str(out), *TINY_RUN])
    assert code == 3, err
    assert err.count("\n") == 1 and "experience 1" in err and "iteration 3" in err, err
    assert not (out / "model.pt").exists() and not (out / "results.json").exists()
    from incremental.checkpoint import load_checkpoint

    assert sorted(p.name for p in (out / "checkpoints").glob("*.pt")) == ["exp_001.pt"]
    assert load_checkpoint(out / "checkpoints" / "exp_001.pt")["experiences_done"] == 1


def _dead_network_after(monkeypatch, experience: int) -> None:
    """Kill the hidden units after training ``experience`` (as a burst of huge gradients does): the
    network then answers the output bias's class for every input, with a finite loss."""
    import torch

    from incremental.trainer import Trainer

    original = Trainer._train_experience

    def train_experience(self, **kwargs):
        original(self, **kwargs)
        if self.clock.train_exp_counter == experience:
            with torch.no_grad():
                for module in self.model.modules():
                    if isinstance(module, torch.nn.Linear):
                        module.weight.zero_()
                        module.bias.fill_(-1.0)
                last = [m for m in self.model.modules() if isinstance(m, torch.nn.Linear)][-1]
                last.bias[0] = 1.0

    monkeypatch.setattr(Trainer, "_train_experience", train_experience)


def test_1_a_collapsed_run_stops_like_a_diverged_one(tmp_path, monkeypatch):
    _dead_network_after(monkeypatch, experience=1)
    out = tmp_path / "run"
    code, _, err = run_main(["run", str(ROOT / "configs/split_digits_naive.yaml"), "--out", str(out), *TINY_RUN])
    assert code == 3, err
    assert err.count("\n") == 1 and "collapsed" in err and "after experience 1" in err and "class 0" in err, err
    assert not (out / "model.pt").exists() and not (out / "results.json").exists()
    assert sorted(p.name for p in (out / "checkpoints").glob("*.pt")) == ["exp_001.pt"]


def test_1_a_collapsed_transfer_adaptation_stops_and_the_resumed_run_still_refuses_it(tmp_path, monkeypatch):
    # the adaptation (step 1) kills the network: the deployed meta model's checkpoint is all that is left,
    # and a --resume from it, which starts with the guard's flag from the checkpoint, refuses it again
    _dead_network_after(monkeypatch, experience=1)
    out = tmp_path / "run"
    args = ["run", str(ROOT / "configs/digits_transfer.yaml"), "--out", str(out), "--quiet",
            "--set", "general.epochs=1", "--set", "train.epochs=2", "--set", "model.hidden_size=16"]
    code, _, err = run_main(args)
    assert code == 3, err
    assert err.count("\n") == 1 and "collapsed" in err and "after experience 1" in err and "class 0" in err, err
    assert not (out / "model.pt").exists() and not (out / "results.json").exists()
    assert sorted(p.name for p in (out / "checkpoints").glob("*.pt")) == ["exp_001.pt"]
    from incremental.checkpoint import load_checkpoint

    assert load_checkpoint(out / "checkpoints" / "exp_001.pt")["extra"]["answered_several"] is True
    code, _, err = run_main([*args, "--resume"])
    assert code == 3 and "collapsed" in err, err


def test_1_a_model_that_never_told_classes_apart_is_left_to_the_accuracy_matrix(tmp_path, monkeypatch):
    # dead from the first experience on (as a barely trained model may answer one class): not a collapse
    # the run caused, so it finishes and reports its (chance) accuracy
    _dead_network_after(monkeypatch, experience=0)
    out = tmp_path / "run"
    code, _, err = run_main(["run", str(ROOT / "configs/split_digits_naive.yaml"), "--out", str(out), *TINY_RUN])
    assert code == 0, err
    assert (out / "model.pt").exists()


def test_1_a_diverging_update_writes_nothing(tmp_path, monkeypatch):
    _nan_loss_at(monkeypatch, experience=0, iteration=2)
    deployed = tmp_path / "deployed"
    package = tiny_classifier_package(deployed / "model.pt")
    data = new_class_npz(tmp_path / "new.npz")
    before = snapshot(tmp_path)
    out = tmp_path / "updated"
    code, _, err = run_main(["update", "--model", str(package), "--data", str(data), "--out", str(out), "--quiet"])
    assert code == 3 and err.count("\n") == 1 and "non-finite" in err, err
    assert snapshot(tmp_path) == before and not out.exists()


# ----------------------------------------------------------------------------------------- finding 2
def test_2_a_second_run_on_the_same_out_is_refused_naming_the_holder(tmp_path):
    out = tmp_path / "run"
    args = ["run", str(ROOT / "configs/split_digits_naive.yaml"), "--out", str(out), "--quiet",
            "--set", "scenario.n_experiences=3", "--set", "model.hidden_size=16", "--set", "train.epochs=5000"]
    first = cli_process(args)
    try:
        deadline = time.monotonic() + 60
        while not (lock_path_of(out).exists() or (out / "checkpoints").exists()):
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()
            time.sleep(0.01)
        before = snapshot(out)
        code, _, err = run_main(args)  # the second run, started while the first one trains
        assert first.poll() is None, "the first run ended before the second tried: make it longer"
        assert set(snapshot(out)) <= set(before) | {str(out / "checkpoints" / f"exp_00{k}.{e}") for k in (1, 2) for e in ("pt", "json")}
    finally:
        first.send_signal(signal.SIGINT)  # the first run is not needed to the end
        _, err1 = first.communicate(timeout=300)
    assert code == 2, err
    assert err.count("\n") == 1 and f"pid {first.pid}" in err, err
    assert first.returncode == 130, err1
    assert not (out / "results.json").exists()


# ----------------------------------------------------------------------------------------- finding 3
def test_3_an_npz_with_an_object_array_is_a_one_line_error(tmp_path):
    package = tiny_classifier_package(tmp_path / "model.pt")
    data = tmp_path / "objects.npz"
    ragged = np.empty(2, dtype=object)
    ragged[0], ragged[1] = [1.0, 2.0], [3.0]
    np.savez(data, x=ragged, y=np.array([0, 1]), class_names=np.array(["a", "b"]))
    out = tmp_path / "out"
    code, _, err = run_main(["update", "--model", str(package), "--data", str(data), "--out", str(out)])
    assert code == 2, err
    assert err.count("\n") == 1 and "objects.npz" in err and "object" in err, err
    assert not out.exists()


# ----------------------------------------------------------------------------------------- finding 4
@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), pytest.param(signal.SIGTERM, 143, marks=pytest.mark.slow)])
def test_4_an_interrupted_run_ends_with_one_line_and_resumes_to_the_same_numbers(tmp_path, signum, code):
    args = ["configs/split_digits_naive.yaml", "--quiet", "--set", "scenario.n_experiences=3",
            "--set", "model.hidden_size=16", "--set", "train.epochs=100"]
    out = tmp_path / "k"
    proc = cli_process(["run", *args, "--out", str(out)])
    deadline = time.monotonic() + 60
    while not (out / "checkpoints" / "exp_001.json").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.005)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert err.count("\n") == 1 and "interrupted during experience 1" in err and "--resume" in err, err
    assert not (out / "results.json").exists()
    assert not [p for p in tmp_path.rglob(".*")]  # no temporary file, no lock left
    resumed = run_main(["run", str(ROOT / args[0]), *args[1:], "--out", str(out), "--resume"])
    assert resumed[0] == 0, resumed[2]
    reference = run_main(["run", str(ROOT / args[0]), *args[1:], "--out", str(tmp_path / "ref")])
    assert reference[0] == 0, reference[2]
    a = json.loads((tmp_path / "ref" / "results.json").read_text())
    b = json.loads((out / "results.json").read_text())
    assert a["accuracy_matrix"] == b["accuracy_matrix"]


# ----------------------------------------------------------------------------------------- finding 5
@pytest.mark.parametrize("text, value", [("1e-3", 0.001), ("5e2", 500.0), ("1E3", 1000.0), ("-2.5e-4", -0.00025),
                                         ("+1e3", 1000.0), (".5", 0.5), ("3.", 3.0), ("1.5", 1.5)])
def test_5_numbers_are_read_the_way_people_write_them(tmp_path, text, value):
    path = tmp_path / "c.yaml"
    path.write_text(f"train:\n  lr: {text}\n")
    assert load_yaml(path) == {"train": {"lr": value}}
    assert apply_overrides({}, [f"train.lr={text}"]) == {"train": {"lr": value}}


def test_5_the_float_rule_changes_nothing_else():
    got = apply_overrides({}, ["a=10", "b=e3", "c=1e", "d=true", "e=[1e-3, 2]", "f=0x10", "g=1.0.0", "h=.inf"])
    assert got == {"a": 10, "b": "e3", "c": "1e", "d": True, "e": [0.001, 2], "f": 16, "g": "1.0.0", "h": float("inf")}
    assert isinstance(got["a"], int)


def test_5_a_config_with_1e_minus_3_runs_end_to_end(tmp_path):
    from incremental.cli import prepare_run

    quickstart = str(ROOT / "configs/quickstart.yaml")
    _, config, _ = prepare_run(quickstart, ["train.lr=1e-3", "strategy.history.mem_size=5e2"])
    history = config.strategy.history
    assert config.train.lr == 0.001 and history.mem_size == 500 and isinstance(history.mem_size, int)
    with pytest.raises(ConfigError, match="strategy.history.mem_size: expected an integer, got 2.5"):
        prepare_run(quickstart, ["strategy.history.mem_size=2.5"])


# ----------------------------------------------------------------------------------------- finding 6
@pytest.mark.parametrize("kwargs, message", [
    ({"capacity": -1}, "mem_size: must be an integer >= 0, got -1"),
    ({"capacity": "10"}, "mem_size: must be an integer >= 0, got '10'"),
    ({"capacity": 10, "policy": "fifo"}, "policy: unknown storage policy 'fifo'"),
])
def test_6_the_history_library_refuses_impossible_values_in_its_constructor(kwargs, message):
    from incremental.buffer import HistoryLibrary

    with pytest.raises(ConfigError) as err:
        HistoryLibrary(**kwargs)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)
