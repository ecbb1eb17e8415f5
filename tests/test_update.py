"""`incremental update` and model packages: end to end on digits, and every bad-input case."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from incremental.buffer import HistoryLibrary
from incremental.cli import main
from incremental.data import TensorSamples
from incremental.models import MLP
from incremental.package import PACKAGE_FORMAT, PackageError, load_model, save_model
from incremental.scenarios.digits import load_digits_arrays
from incremental.update_classifier import classifier_package_extra


@pytest.fixture(scope="module")
def digits():
    return load_digits_arrays()


@pytest.fixture()
def package(tmp_path, digits):
    x, y = digits
    torch.manual_seed(0)
    model = MLP(64, 32, 3)
    history = HistoryLibrary(30, "class_balanced")
    keep = y < 3
    history.update(TensorSamples(torch.from_numpy(x[keep]), torch.from_numpy(y[keep])))
    return save_model(tmp_path / "base.pt", model, kind="classifier", architecture="mlp",
                      arch_kwargs={"input_size": 64, "hidden_size": 32, "n_classes": 3},
                      class_names=["zero", "one", "two"], extra=classifier_package_extra(history))


def write_npz(path, x, y, names):
    np.savez(path, x=x, y=y, class_names=np.array(names))
    return path


def run(args, capsys):
    code = main(args)
    return code, capsys.readouterr()


def test_package_round_trip_rebuilds_the_same_model(package):
    pkg = load_model(package)
    assert pkg.kind == "classifier" and pkg.class_names == ["zero", "one", "two"]
    assert pkg.format_version == PACKAGE_FORMAT
    model = pkg.build()
    x = torch.rand(4, 64)
    torch.manual_seed(0)
    ref = MLP(64, 32, 3).eval()
    assert torch.allclose(model(x), ref(x))


def test_demo_end_to_end(tmp_path, capsys):
    code, out = run(["update", "--demo", "--out", str(tmp_path), "--quiet"], capsys)
    assert code == 0, out.err
    report = json.loads((tmp_path / "updated" / "report.json").read_text())
    assert report["new_classes"] == ["5", "6", "7", "8", "9"]
    assert report["before"]["new_accuracy"] == 0.0
    assert report["after"]["new_accuracy"] > 0.7
    assert report["after"]["old_accuracy"] > 0.8  # rehearsal keeps the old classes
    assert (tmp_path / "updated" / "report.png").stat().st_size > 1000
    updated = load_model(tmp_path / "updated" / "model.pt")
    assert updated.class_names == [str(c) for c in range(10)]
    assert updated.arch_kwargs["n_classes"] == 10
    assert updated.build()(torch.rand(2, 64)).shape == (2, 10)


def test_update_with_npz_keeps_old_rows_and_reports(tmp_path, package, digits, capsys):
    x, y = digits
    sel = (y >= 1) & (y <= 4)  # classes one, two (known) and three, four (new)
    data = write_npz(tmp_path / "new.npz", x[sel], y[sel] - 1, ["one", "two", "three", "four"])
    out = tmp_path / "out"
    code, cap = run(["update", "--model", str(package), "--data", str(data), "--out", str(out), "--quiet",
                     "--epochs", "2"], capsys)
    assert code == 0, cap.err
    report = json.loads((out / "report.json").read_text())
    assert report["new_classes"] == ["three", "four"]
    assert report["n_eval_old"] > 0  # held-out samples of "one" and "two"
    updated = load_model(out / "model.pt")
    assert updated.class_names == ["zero", "one", "two", "three", "four"]


def _assert_refused(capsys, args, out_dir, fragment):
    code, cap = run(args, capsys)
    assert code == 2
    assert fragment in cap.err, cap.err
    assert cap.err.count("\n") == 1
    assert not out_dir.exists()


def test_data_with_no_new_class_is_refused(tmp_path, package, digits, capsys):
    x, y = digits
    data = write_npz(tmp_path / "old.npz", x[y < 2], y[y < 2], ["zero", "one"])
    out = tmp_path / "out"
    _assert_refused(capsys, ["update", "--model", str(package), "--data", str(data), "--out", str(out)], out, "no new class")


def test_clashing_class_names_are_refused(tmp_path, package, digits, capsys):
    x, y = digits
    data = write_npz(tmp_path / "clash.npz", x[y < 2], y[y < 2], ["Zero", "new"])
    out = tmp_path / "out"
    _assert_refused(capsys, ["update", "--model", str(package), "--data", str(data), "--out", str(out)], out,
                    "class 'Zero' clashes with the model's class 'zero'")


def test_a_file_that_is_not_a_package_is_refused(tmp_path, digits, capsys):
    x, y = digits
    data = write_npz(tmp_path / "d.npz", x[:20], y[:20] % 2, ["a", "b"])
    out = tmp_path / "out"
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"definitely not a zip file")
    _assert_refused(capsys, ["update", "--model", str(junk), "--data", str(data), "--out", str(out)], out,
                    "is not a model package")
    plain = tmp_path / "state_dict.pt"
    torch.save(MLP(64, 8, 2).state_dict(), plain)  # weights without the package header
    _assert_refused(capsys, ["update", "--model", str(plain), "--data", str(data), "--out", str(out)], out,
                    "no package header")


class NotAllowed:
    """Pickled objects of arbitrary classes could run code when loaded: they must be refused."""


def test_loading_never_unpickles_arbitrary_objects(tmp_path):
    evil = tmp_path / "evil.pt"
    torch.save({"magic": "incremental-model-package", "payload": NotAllowed()}, evil)
    with pytest.raises(PackageError, match="cannot be read safely"):
        load_model(evil)


def test_a_newer_package_format_is_a_clear_error(tmp_path, package):
    payload = torch.load(package, weights_only=True)
    payload["format_version"] = PACKAGE_FORMAT + 1
    newer = tmp_path / "newer.pt"
    torch.save(payload, newer)
    with pytest.raises(PackageError, match="newer than this version"):
        load_model(newer)


@pytest.mark.parametrize("mutate, fragment", [
    (lambda d: d.pop("class_names"), "missing array 'class_names'"),
    (lambda d: d.update(y=d["y"] + 5), "outside class_names"),
    (lambda d: d.update(x=d["x"][:, :10]), "the model takes 64"),
])
def test_bad_npz_is_a_clear_error(tmp_path, package, digits, capsys, mutate, fragment):
    x, y = digits
    d = {"x": x[:40], "y": (y[:40] % 2), "class_names": np.array(["a", "b"])}
    mutate(d)
    np.savez(tmp_path / "bad.npz", **d)
    out = tmp_path / "out"
    _assert_refused(capsys, ["update", "--model", str(package), "--data", str(tmp_path / "bad.npz"), "--out", str(out)],
                    out, fragment)


def test_image_folder_with_an_unreadable_image_names_the_file(tmp_path, package, capsys):
    folder = tmp_path / "imgs" / "cat"
    folder.mkdir(parents=True)
    (folder / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "out"
    _assert_refused(capsys, ["update", "--model", str(package), "--data", str(tmp_path / "imgs"), "--out", str(out)],
                    out, "broken.png")


def test_update_without_arguments_explains(capsys):
    code, cap = run(["update"], capsys)
    assert code == 2 and "--model" in cap.err


def test_config_names_of_strategies_are_accepted(tmp_path, package, digits, capsys):
    """`--strategy finetune` (the config name) is `naive`; unknown names are still refused."""
    from incremental.update import canonical_strategy

    assert canonical_strategy("finetune") == "naive"
    assert canonical_strategy("pseudo_label_distillation") == "pseudo_distill"
    assert canonical_strategy("replay") == "replay" and canonical_strategy(None) is None
    x, y = digits
    sel = (y >= 1) & (y <= 3)
    data = write_npz(tmp_path / "new.npz", x[sel], y[sel] - 1, ["one", "two", "three"])
    out = tmp_path / "ft"
    code, cap = run(["update", "--model", str(package), "--data", str(data), "--out", str(out), "--quiet",
                     "--epochs", "1", "--strategy", "finetune"], capsys)
    assert code == 0, cap.err
    assert json.loads((out / "report.json").read_text())["strategy"] == "naive"
    _assert_refused(capsys, ["update", "--model", str(package), "--data", str(data), "--out", str(tmp_path / "x"),
                             "--quiet", "--strategy", "magic"], tmp_path / "x", "magic")
