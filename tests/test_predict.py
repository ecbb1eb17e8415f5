"""`incremental predict` on classifier packages: top-k with the package's preprocessing, and errors."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from incremental.cli import main
from incremental.datasets import save_image_folder
from incremental.models import MLP
from incremental.package import save_model
from incremental.scenarios.digits import load_digits_arrays
from incremental.update_classifier import classifier_package_extra


@pytest.fixture()
def digits_package(tmp_path):
    """An MLP on 8x8 digits 0-2 that takes flat pixels normalised with mean 0.5, std 0.5."""
    x, y = load_digits_arrays()
    keep = y < 3
    xs, ys = torch.from_numpy((x[keep] - 0.5) / 0.5).float(), torch.from_numpy(y[keep]).long()
    torch.manual_seed(0)
    model = MLP(64, 32, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(100):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(xs), ys).backward()
        opt.step()
    spec = {"channels": 1, "size": [8, 8], "flat": True, "normalize": {"mean": [0.5], "std": [0.5]}}
    path = save_model(tmp_path / "digits.pt", model, kind="classifier", architecture="mlp",
                      arch_kwargs={"input_size": 64, "hidden_size": 32, "n_classes": 3},
                      class_names=["zero", "one", "two"], extra=classifier_package_extra(None, spec))
    return path, x[keep], y[keep]


def test_predict_image_folder_applies_the_stored_normalisation(digits_package, tmp_path, capsys):
    path, x, y = digits_package
    save_image_folder(tmp_path / "imgs", (x[:30] * 16.0).reshape(-1, 8, 8), y[:30], ["zero", "one", "two"])
    out = tmp_path / "pred.json"
    assert main(["predict", "--model", str(path), "--images", str(tmp_path / "imgs"), "--out", str(out),
                 "--top-k", "2"]) == 0
    assert "30 predictions (top 2)" in capsys.readouterr().out
    pred = json.loads(out.read_text())
    assert pred["kind"] == "classifier" and pred["top_k"] == 2 and pred["class_names"] == ["zero", "one", "two"]
    rows = pred["predictions"]
    assert len(rows) == 30 and all(len(r["top_k"]) == 2 and r["top_k"][0]["score"] >= r["top_k"][1]["score"] for r in rows)
    accuracy = np.mean([r["label"] == r["file"].split("/")[0] for r in rows])
    assert accuracy > 0.9


def test_predict_npz_rows(digits_package, tmp_path):
    path, x, y = digits_package
    np.savez(tmp_path / "x.npz", x=x[:5].astype(np.float32))
    out = tmp_path / "p.json"
    assert main(["predict", "--model", str(path), "--images", str(tmp_path / "x.npz"), "--out", str(out), "--quiet"]) == 0
    rows = json.loads(out.read_text())["predictions"]
    assert [r["index"] for r in rows] == [0, 1, 2, 3, 4] and len(rows[0]["top_k"]) == 3  # top-k capped at 3 classes
    # the scores are the model's softmax on the normalised inputs (x - 0.5) / 0.5 the package prescribes
    from incremental.package import load_model

    with torch.no_grad():
        probs = torch.softmax(load_model(path).build()(torch.from_numpy((x[:5] - 0.5) / 0.5).float()), dim=1)
    assert np.allclose([r["score"] for r in rows], probs.max(1).values.numpy(), atol=1e-5)


def test_predict_errors_are_one_line(digits_package, tmp_path, capsys):
    path, x, _ = digits_package
    out = tmp_path / "p.json"
    cases = [
        (["--images", str(tmp_path / "nowhere")], "does not exist"),
        (["--images", str(tmp_path)], "holds no image file"),
        (["--images", str(tmp_path), "--top-k", "0"], "--top-k must be >= 1"),
        (["--images", str(tmp_path), "--instances", "x.json"], "--instances is for detector packages"),
    ]
    np.savez(tmp_path / "bad.npz", x=x[:3, :10].astype(np.float32))
    cases.append((["--images", str(tmp_path / "bad.npz")], "samples have 10 values, the model takes 64"))
    for args, fragment in cases:
        assert main(["predict", "--model", str(path), "--out", str(out), *args]) == 2
        err = capsys.readouterr().err
        assert fragment in err and err.count("\n") == 1, err
        assert not out.exists()
    out.write_text("{}")
    assert main(["predict", "--model", str(path), "--out", str(out), "--images", str(tmp_path / "bad.npz")]) == 2
    assert "exists; use --force" in capsys.readouterr().err


def test_predict_npz_with_empty_images_is_one_line(digits_package, tmp_path, capsys):
    """Found by the fuzz suite (predict_npz): an x of shape (0, 0, 0) ended in a torch reshape traceback."""
    path, _, _ = digits_package
    out = tmp_path / "p.json"
    for shape in [(0, 0, 0), (2, 0), (3, 8, 0)]:
        np.savez(tmp_path / "empty.npz", x=np.zeros(shape, dtype=np.float32))
        assert main(["predict", "--model", str(path), "--out", str(out), "--images", str(tmp_path / "empty.npz")]) == 2
        err = capsys.readouterr().err
        assert "empty.npz: samples of shape" in err and "hold no pixels" in err and err.count("\n") == 1, err
        assert not out.exists()


def test_predict_npz_without_samples_and_a_damaged_input_entry_are_one_line(digits_package, tmp_path, capsys):
    """Found by the slow fuzz profile: x of shape (0, 1) reached topk (exit 1), and a package whose
    extra['input'] is not a dict reached dict() (exit 1); both are bad input."""
    import torch

    path, _, _ = digits_package
    out = tmp_path / "p.json"
    np.savez(tmp_path / "none.npz", x=np.zeros((0, 1), dtype=np.float64))
    assert main(["predict", "--model", str(path), "--out", str(out), "--images", str(tmp_path / "none.npz")]) == 2
    err = capsys.readouterr().err
    assert "none.npz: x holds no images" in err and err.count("\n") == 1, err
    payload = torch.load(path, weights_only=True)
    payload["extra"]["input"] = True
    torch.save(payload, tmp_path / "bad.pt")
    np.savez(tmp_path / "one.npz", x=np.zeros((1, 64), dtype=np.float32))
    assert main(["predict", "--model", str(tmp_path / "bad.pt"), "--out", str(out), "--images", str(tmp_path / "one.npz")]) == 2
    err = capsys.readouterr().err
    assert "extra['input'] must be a dict, got bool" in err and err.count("\n") == 1, err
    assert not out.exists()
