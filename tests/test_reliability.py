"""The reliability parts one by one: non-finite guards, output locks, interrupts, failed writes, and
the checks that make a bad config, data file or model package one line."""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from incremental.config import ConfigError, InputError, apply_overrides, load_yaml, one_line
from incremental.guards import LossGuard, NonFiniteLossError, NonFiniteWeightsError, first_non_finite
from incremental.interrupts import Interrupted, deferred, exit_code, signals_as_exceptions
from incremental.io import WriteError, atomic_write, remove_partial_files, save_torch
from incremental.locking import OutputBusyError, OutputLock, lock_path_of
from incremental.package import PackageError, load_model, save_model

from .reliability_helpers import ROOT, TINY_RUN, new_class_npz, run_main, snapshot, tiny_classifier_package


# ----------------------------------------------------------------------------------------- loss guard
def test_loss_guard_names_the_first_non_finite_iteration_and_checks_only_every_n():
    guard = LossGuard(every=5)
    guard.start(experience=4)
    for i, v in enumerate([1.0, 0.5, float("nan"), 0.3]):
        guard.observe(torch.tensor(v), iteration=10 + i)  # 4 < 5 values waiting: nothing checked yet
    with pytest.raises(NonFiniteLossError) as err:
        guard.observe(torch.tensor(float("inf")), iteration=14)
    assert (err.value.experience, err.value.iteration) == (4, 12)
    assert "experience 4, iteration 12" in str(err.value) and "nan" in str(err.value)


def test_loss_guard_checks_what_is_left_at_the_experience_end_and_ignores_finite_losses():
    guard = LossGuard(every=100)
    guard.start(0)
    for i in range(250):
        guard.observe(torch.tensor([0.1 * i]), iteration=i)  # shape (1,) as Avalanche's zeros(1) + loss
    guard.observe(None, iteration=250)
    guard.observe(torch.tensor(0.5), iteration=250)  # shapes () and (1,) mixed
    guard.check()
    guard.observe(torch.tensor([1.0]), iteration=251)
    guard.observe(torch.tensor(float("-inf")), iteration=252)
    with pytest.raises(NonFiniteLossError, match="iteration 252"):
        guard.check()
    guard.check()  # the window was emptied: nothing left to report


def test_loss_guard_does_not_read_the_loss_between_checks():
    """A meta tensor has no value: any host read (``.item()``, ``bool()``) of it raises. The guard keeps
    such losses without error until its check, so it makes no device sync per step."""
    guard = LossGuard(every=50)
    guard.start(0)
    for i in range(49):
        guard.observe(torch.tensor(1.0, device="meta", requires_grad=True) * 2, iteration=i)
    with pytest.raises(Exception):  # noqa: B017 - the check itself must read them
        guard.check()


def test_loss_guard_refuses_an_impossible_period():
    with pytest.raises(ConfigError, match="every: must be an integer >= 1, got 0"):
        LossGuard(every=0)


def test_the_trainer_stops_on_a_nan_loss(digits_tiny):
    from incremental import Trainer
    from incremental.models import MLP

    model = MLP(64, 16, 10)
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=1e30), torch.nn.CrossEntropyLoss(),
                      train_mb_size=16, train_epochs=3)
    with pytest.raises(NonFiniteLossError) as err:
        trainer.train(digits_tiny.train_stream[0])
    assert err.value.experience == 0 and 1 <= err.value.iteration < 10


def test_first_non_finite_by_hand():
    x = np.zeros((4, 2, 2), dtype=np.float32)
    assert first_non_finite(x) is None
    x[2, 1, 0], x[3, 0, 0] = np.inf, np.nan
    assert first_non_finite(x) == (2, float("inf"))
    assert first_non_finite(torch.tensor([1.0, float("nan")])) == (1, pytest.approx(float("nan"), nan_ok=True))
    assert first_non_finite(np.array([1, 2])) is None  # integers cannot be NaN


# ----------------------------------------------------------------------------------------- output locks
def test_a_second_lock_on_the_same_output_names_the_holder_and_the_file_goes_with_the_holder(tmp_path):
    out = tmp_path / "a" / "b" / "run"
    lock = OutputLock(out).acquire()
    assert lock.path == lock_path_of(out) and lock.path.read_text() == f"{os.getpid()}\n"
    with pytest.raises(OutputBusyError, match=f"in use by another incremental process \\(pid {os.getpid()}\\)"):
        OutputLock(tmp_path / "a" / "b" / ".." / "b" / "run").acquire()  # another spelling of the same path
    lock.release()
    assert not (tmp_path / "a").exists()  # the folders made for the lock went with it
    with OutputLock(out):
        pass


def test_a_lock_file_left_by_a_killed_process_is_taken_over(tmp_path):
    out = tmp_path / "run"
    lock_path_of(out).write_text("99999999\n")  # a holder that died: the file stays, the kernel lock does not
    with OutputLock(out) as lock:
        assert lock.path.read_text() == f"{os.getpid()}\n"
    assert not lock_path_of(out).exists()


HOLD = """
import importlib.util, sys, time
spec = importlib.util.spec_from_file_location("locking", sys.argv[2])  # without importing torch
locking = importlib.util.module_from_spec(spec)
spec.loader.exec_module(locking)
with locking.OutputLock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(60)
"""


@pytest.fixture()
def held_by_other_process(tmp_path):
    def hold(output):
        proc = subprocess.Popen([sys.executable, "-c", HOLD, str(output), str(ROOT / "incremental" / "locking.py")],
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "held"
        procs.append(proc)
        return proc.pid

    procs: list[subprocess.Popen] = []
    yield hold
    for proc in procs:
        proc.kill()
        proc.wait()


def test_update_and_feedback_refuse_an_output_another_process_writes(tmp_path, held_by_other_process):
    package = tiny_classifier_package(tmp_path / "model.pt")
    data = new_class_npz(tmp_path / "new.npz")
    out = tmp_path / "updated"
    pid = held_by_other_process(out)
    before = snapshot(tmp_path)
    code, _, err = run_main(["update", "--model", str(package), "--data", str(data), "--out", str(out)])
    assert code == 2 and err.count("\n") == 1 and f"pid {pid}" in err, err
    target = tmp_path / "train.json"
    pid = held_by_other_process(target)
    code, _, err = run_main(["feedback", "--model", str(package), "--images", str(tmp_path), "--predictions", "p.json",
                             "--verified", "v.json", "--out", str(target)])
    assert code == 2 and f"pid {pid}" in err, err
    before[str(lock_path_of(target))] = snapshot(lock_path_of(target))[str(lock_path_of(target))]
    assert snapshot(tmp_path) == before


# ----------------------------------------------------------------------------------------- interrupts
def test_a_signal_inside_a_deferred_block_waits_for_its_end():
    # what was installed before (SIG_IGN, not Python's default, when pytest runs as a background job)
    before = signal.getsignal(signal.SIGINT)
    with signals_as_exceptions():
        done = []
        with pytest.raises(Interrupted) as err:
            with deferred():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.05)  # the handler has run by now, and only noted the signal
                done.append(True)
        assert done == [True] and exit_code(err.value) == 143
        with pytest.raises(KeyboardInterrupt) as err:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
        assert exit_code(err.value) == 130
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored


# ----------------------------------------------------------------------------------------- failed writes
def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_write_that_fails_leaves_the_previous_file_and_no_temporary(tmp_path, monkeypatch):
    path = save_torch(tmp_path / "state.pt", {"a": 1})
    before = path.read_bytes()
    monkeypatch.setattr(torch, "save", _no_space)
    with pytest.raises(WriteError) as err:
        save_torch(path, {"a": 2})
    assert str(err.value) == f"cannot write {path} (No space left on device); the previous version of it is unchanged"
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["state.pt"]


def test_a_full_disk_during_a_checkpoint_ends_with_one_line_and_the_run_resumes(tmp_path, monkeypatch):
    from incremental.checkpoint import load_checkpoint

    real = torch.save

    def full_at_second(obj, path, *args, **kwargs):  # the disk fills up while checkpoint 2 is written
        return _no_space() if ".exp_002.pt." in str(path) else real(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_at_second)
    args = ["run", str(ROOT / "configs/split_digits_naive.yaml"), *TINY_RUN]
    code, _, err = run_main([*args, "--out", str(tmp_path / "k")])
    assert code == 1 and err.count("\n") == 1 and "No space left on device" in err and "exp_002.pt" in err, err
    assert load_checkpoint(tmp_path / "k" / "checkpoints" / "exp_001.pt")["experiences_done"] == 1
    assert not list(tmp_path.rglob(".*"))
    monkeypatch.setattr(torch, "save", real)
    assert run_main([*args, "--out", str(tmp_path / "k"), "--resume"])[0] == 0
    assert run_main([*args, "--out", str(tmp_path / "ref")])[0] == 0
    matrix = [json.loads((tmp_path / d / "results.json").read_text())["accuracy_matrix"] for d in ("k", "ref")]
    assert matrix[0] == matrix[1]


def test_partial_files_of_a_killed_write_are_removed(tmp_path):
    (tmp_path / ".exp_002.pt.abc123.tmp").write_bytes(b"half")
    (tmp_path / "exp_001.pt").write_bytes(b"whole")
    assert [p.name for p in remove_partial_files(tmp_path)] == [".exp_002.pt.abc123.tmp"]
    assert [p.name for p in tmp_path.iterdir()] == ["exp_001.pt"]


def test_an_interrupt_during_a_write_finishes_it(tmp_path):
    def slow_write(p):
        p.write_text("complete")
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)

    with signals_as_exceptions(), pytest.raises(Interrupted):
        atomic_write(tmp_path / "f.txt", slow_write)
    assert (tmp_path / "f.txt").read_text() == "complete" and len(list(tmp_path.iterdir())) == 1


# ----------------------------------------------------------------------------------------- one-line errors
def test_every_input_error_is_one_line_whatever_the_user_wrote():
    assert one_line("a\nb\rc\x00d\u2028e") == "a\\nb\\rc\\x00d\\u2028e"
    with pytest.raises(ConfigError) as err:
        apply_overrides({}, ["bad\nkey"])
    assert "\n" not in str(err.value) and isinstance(err.value, InputError)
    code, _, err = run_main(["run", "--set"])
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: argument --set")


def test_config_numbers_must_be_finite_and_fit_64_bits(tmp_path):
    from incremental.cli import prepare_run

    quickstart = str(ROOT / "configs/quickstart.yaml")
    with pytest.raises(ConfigError, match="train.lr: expected a finite number, got inf"):
        prepare_run(quickstart, ["train.lr=.inf"])
    with pytest.raises(ConfigError, match="strategy.history.mem_size: 10+19884624838656 is out of range"):
        prepare_run(quickstart, ["strategy.history.mem_size=1e30"])
    with pytest.raises(ConfigError, match="train.lr: .* is out of range"):
        prepare_run(quickstart, [f"train.lr={10**400}"])
    binary = tmp_path / "c.yaml"
    binary.write_bytes(b"seed: \xff\n")
    with pytest.raises(ConfigError, match="not a UTF-8 text file"):
        load_yaml(binary)


@pytest.mark.parametrize("x, message", [
    (lambda x: np.where(np.arange(x.size).reshape(x.shape) == 70, np.inf, x), "sample 1 holds NaN or infinite"),
    (lambda x: np.where(np.arange(x.size).reshape(x.shape) == 3, 1e39, x), "sample 0 holds NaN or infinite"),  # beyond float32
    (lambda x: x.astype(np.complex64), "x must hold numbers"),
])
def test_npz_values_that_would_poison_training_are_refused(tmp_path, x, message):
    from incremental.datasets import DataError
    from incremental.preprocessing import Preprocessing, load_labelled

    path = new_class_npz(tmp_path / "d.npz")
    arrays = dict(np.load(path))
    arrays["x"] = x(arrays["x"].astype(np.float64))
    np.savez(path, **arrays)
    with pytest.raises(DataError, match=message.replace("[", "\\[")):
        load_labelled(path, Preprocessing(channels=1, size=(8, 8), flat=True))


def test_a_single_npy_array_is_not_an_npz(tmp_path):
    from incremental.datasets import DataError
    from incremental.preprocessing import Preprocessing, load_labelled

    np.save(tmp_path / "x.npy", np.zeros(3))
    with pytest.raises(DataError, match="a single numpy array, not an .npz archive"):
        load_labelled(tmp_path / "x.npy", Preprocessing(channels=1, size=(8, 8), flat=True))


@pytest.mark.parametrize("field, value", [("channels", float("inf")), ("size", [8, float("inf")]),
                                          ("resize", float("-inf"))])
def test_an_infinite_preprocessing_size_names_its_field(field, value):
    """int(inf) raises OverflowError, not ValueError: a package whose size is infinite once escaped
    ``incremental update`` as a traceback (exit 1), found by the slow ``model_package`` fuzz profile."""
    from incremental.preprocessing import Preprocessing

    fields = dict(channels=1, size=(8, 8), flat=True) | {field: value}
    with pytest.raises(ValueError, match=f"preprocessing.{field}: must be"):
        Preprocessing(**fields)


# ----------------------------------------------------------------------------------------- packages
def test_a_package_is_never_saved_from_or_loaded_with_nan_weights(tmp_path):
    from incremental.models import MLP

    model = MLP(64, 8, 3)
    with torch.no_grad():
        model.classifier.linear.weight[1, 2] = float("nan")
    with pytest.raises(NonFiniteWeightsError, match="classifier.linear.weight"):
        save_model(tmp_path / "m.pt", model, kind="classifier", architecture="mlp",
                   arch_kwargs={"input_size": 64, "hidden_size": 8, "n_classes": 3}, class_names=["a", "b", "c"])
    assert not (tmp_path / "m.pt").exists()
    good = tiny_classifier_package(tmp_path / "good.pt")
    payload = torch.load(good, weights_only=True)
    payload["state_dict"]["classifier.linear.bias"][0] = float("inf")
    torch.save(payload, tmp_path / "bad.pt")
    with pytest.raises(PackageError, match="weight 'classifier.linear.bias' holds NaN or inf"):
        load_model(tmp_path / "bad.pt")


@pytest.mark.parametrize("edit, message", [
    (lambda p: p.update(class_names="abc"), "package field 'class_names' must be a list, got str"),
    (lambda p: p.update(class_names=["a", "a", "b"]), "class_names must be distinct strings"),
    (lambda p: p.update(arch_kwargs=[1, 2]), "package field 'arch_kwargs' must be a dict, got list"),
    (lambda p: p["state_dict"].update(extra=3), "state_dict entry 'extra' must be a named tensor"),
    (lambda p: p["arch_kwargs"].update(hidden_layers=10**9), "arch_kwargs hidden_layers = 1000000000 is larger than"),
    (lambda p: p["arch_kwargs"].update(hidden_size=9), "weights do not fit architecture 'mlp'"),
    (lambda p: p["arch_kwargs"].update(colour="red"), "cannot be built from arch_kwargs"),
    (lambda p: p.update(extra=torch.zeros(3)), "package field 'extra' must be a dict, got Tensor"),
    (lambda p: p["extra"].update(input=torch.zeros(3)), "extra['input'] must be a dict, got Tensor"),
    (lambda p: p["extra"]["input"].update(channels=torch.zeros(3)), "extra['input'] is unusable (preprocessing.channels: must be a number"),
])
def test_a_package_with_wrong_fields_is_one_line(tmp_path, edit, message):
    from incremental.update_classifier import package_preprocessing

    payload = torch.load(tiny_classifier_package(tmp_path / "good.pt"), weights_only=True)
    edit(payload)
    torch.save(payload, tmp_path / "bad.pt")
    with pytest.raises(PackageError) as err:
        package = load_model(tmp_path / "bad.pt")
        package.build()
        package_preprocessing(package)
    assert message in str(err.value) and str(tmp_path / "bad.pt") in str(err.value)
