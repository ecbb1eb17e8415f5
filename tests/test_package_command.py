"""`incremental package` and `incremental.package_model`: weights files in the shapes users have, a
user's own module:Class, preprocessing stored once, and every bad input as one line with exit code 2."""
from __future__ import annotations

import json

import pytest
import torch
import torchvision
from torch import nn

import incremental
from incremental.cli import main
from incremental.importing import read_class_names
from incremental.package import PackageError, load_model
from incremental.preprocessing import Preprocessing


class TinyMLP(nn.Module):
    """A user's own classifier: flat 8x8 images -> hidden -> classes (``num_classes`` rows)."""

    def __init__(self, num_classes: int = 4, hidden: int = 16) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(64, hidden), nn.ReLU())
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x.flatten(1)))


class SoftmaxAtTheEnd(TinyMLP):
    """The last nn.Linear is not what forward ends with: packaging must refuse it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(super().forward(x), dim=1)


MODULE = __name__  # tests.test_package_command


@pytest.fixture()
def files(tmp_path):
    torch.manual_seed(0)
    resnet = torchvision.models.resnet18(weights=None, num_classes=3).eval()
    torch.save(resnet.state_dict(), tmp_path / "plain.pth")
    (tmp_path / "classes.txt").write_text("cat\ndog\n\nbird\n")
    return tmp_path, resnet


def package(tmp_path, *extra, weights="plain.pth", classes="classes.txt", arch="torchvision:resnet18", out="m.pt"):
    return main(["package", "--architecture", arch, "--weights", str(tmp_path / weights), "--classes",
                 str(tmp_path / classes), "--out", str(tmp_path / out), "--quiet", *extra])


def refused(capsys, tmp_path, fragment, *args, out="m.pt", **kw):
    assert package(tmp_path, *args, out=out, **kw) == 2
    err = capsys.readouterr().err
    assert fragment in err, err
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert not (tmp_path / out).exists()


@pytest.mark.parametrize("wrap", ["plain", "checkpoint_state_dict", "dataparallel_model", "lightning"])
def test_weights_files_in_the_shapes_users_save_them(files, wrap):
    tmp_path, resnet = files
    state = resnet.state_dict()
    saved = {
        "plain": state,
        "checkpoint_state_dict": {"epoch": 7, "state_dict": state, "optimizer": {"lr": 0.1}},
        "dataparallel_model": {"model": {f"module.{k}": v for k, v in state.items()}},
        "lightning": {"state_dict": {f"model.{k}": v for k, v in state.items()}},
    }[wrap]
    torch.save(saved, tmp_path / "w.pth")
    assert package(tmp_path, "--input-size", "32", weights="w.pth") == 0
    pkg = load_model(tmp_path / "m.pt")
    assert pkg.class_names == ["cat", "dog", "bird"] and pkg.extra["input"]["size"] == [32, 32]
    assert pkg.extra["imported"]["head"] == "fc"
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(pkg.build()(x), resnet(x), atol=1e-5)


def test_wrong_weights_name_the_first_offending_key(files, capsys):
    tmp_path, resnet = files
    state = resnet.state_dict()
    refused(capsys, tmp_path, "does not fit torchvision:resnet34: missing key 'layer1.2.conv1.weight' (and 95 more)",
            arch="torchvision:resnet34")
    torch.save({**state, "extra.weight": torch.zeros(2)}, tmp_path / "extra.pth")
    refused(capsys, tmp_path, "unexpected key 'extra.weight'", weights="extra.pth")
    torch.save({**state, "conv1.weight": torch.zeros(64, 3, 5, 5)}, tmp_path / "shape.pth")
    refused(capsys, tmp_path, "'conv1.weight' has shape (64, 3, 5, 5), torchvision:resnet18 needs (64, 3, 7, 7)",
            weights="shape.pth")
    torch.save(resnet, tmp_path / "pickled.pth")
    refused(capsys, tmp_path, "holds pickled Python objects", weights="pickled.pth")
    torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "nostate.pth")
    refused(capsys, tmp_path, "holds no state dict (found: epoch, lr", weights="nostate.pth")
    refused(capsys, tmp_path, "weights file", weights="missing.pth")


def test_classes_file_must_match_the_head(files, capsys):
    tmp_path, _ = files
    (tmp_path / "four.txt").write_text("cat\ndog\nbird\nfish\n")
    refused(capsys, tmp_path, "four.txt lists 4 classes, the weights' head 'fc' has 3 outputs", classes="four.txt")
    (tmp_path / "twice.txt").write_text("cat\ndog\ncat\n")
    refused(capsys, tmp_path, "class 'cat' is listed twice (entries 1 and 3)", classes="twice.txt")
    (tmp_path / "empty.txt").write_text("\n\n")
    refused(capsys, tmp_path, "lists no class", classes="empty.txt")


def test_cli_usage_errors(files, capsys):
    tmp_path, _ = files
    refused(capsys, tmp_path, "--mean and --std go together", "--mean", "0.5")
    refused(capsys, tmp_path, "needs 1 or 3 values", "--mean", "0.5", "0.5", "--std", "1", "1")
    refused(capsys, tmp_path, "--kwargs: not valid JSON", "--kwargs", "{num_classes: 3}")
    refused(capsys, tmp_path, "is not a torchvision classification model", arch="torchvision:resnet_nine")
    refused(capsys, tmp_path, "--resize is for classifiers", "--resize", "256",
            arch="torchvision:fasterrcnn_mobilenet_v3_large_320_fpn")
    assert package(tmp_path) == 0
    assert package(tmp_path) == 2 and "exists; use --force" in capsys.readouterr().err
    assert package(tmp_path, "--force", "--input-size", "64") == 0
    assert load_model(tmp_path / "m.pt").extra["input"]["size"] == [64, 64]


def test_module_class_with_kwargs(tmp_path, capsys):
    torch.manual_seed(0)
    net = TinyMLP(num_classes=2, hidden=8).eval()
    torch.save(net.state_dict(), tmp_path / "net.pt")
    (tmp_path / "classes.txt").write_text("no\nyes\n")
    arch = f"{MODULE}:TinyMLP"
    refused(capsys, tmp_path, "--input-size is needed", "--kwargs", '{"num_classes": 2, "hidden": 8}',
            weights="net.pt", arch=arch)
    # the class's defaults (4 classes, hidden 16) do not build this model: the key that differs is named
    refused(capsys, tmp_path, "'body.0.weight' has shape (8, 64)", "--input-size", "8", weights="net.pt", arch=arch)
    assert package(tmp_path, "--input-size", "8", "--kwargs", '{"num_classes": 2, "hidden": 8}',
                   weights="net.pt", arch=arch) == 0
    pkg = load_model(tmp_path / "m.pt")
    assert pkg.architecture == arch and pkg.arch_kwargs == {"n_classes": 2, "kwargs": {"num_classes": 2, "hidden": 8}}
    assert pkg.extra["input"] == {"channels": 1, "size": [8, 8], "flat": True, "max_value": 1.0}  # inferred: no conv
    x = torch.rand(3, 64)
    with torch.no_grad():
        assert torch.allclose(pkg.build()(x), net(x), atol=1e-6)
    grown = pkg.build()
    grown.classifier.grow_to(3)
    with torch.no_grad():
        assert torch.equal(grown(x)[:, :2], pkg.build()(x))  # growing keeps the old rows
    (tmp_path / "m.pt").unlink()

    torch.save(SoftmaxAtTheEnd(2, 8).state_dict(), tmp_path / "soft.pt")
    refused(capsys, tmp_path, "its last nn.Linear 'fc' is not the layer its forward() ends with", "--input-size", "8",
            "--kwargs", '{"num_classes": 2, "hidden": 8}', weights="soft.pt", arch=f"{MODULE}:SoftmaxAtTheEnd")
    refused(capsys, tmp_path, "cannot import 'no_such_module_xyz'", "--input-size", "8", weights="net.pt",
            arch="no_such_module_xyz:Net")
    refused(capsys, tmp_path, "is a standard-library module", "--input-size", "8", weights="net.pt", arch="subprocess:Popen")
    refused(capsys, tmp_path, "read_class_names is a function, not an nn.Module class", "--input-size", "8",
            weights="net.pt", arch="incremental.importing:read_class_names")
    refused(capsys, tmp_path, "TinyMLP(**{'width': 3}) fails", "--input-size", "8", "--kwargs", '{"width": 3}',
            weights="net.pt", arch=arch)


def test_package_model_python_api(tmp_path):
    torch.manual_seed(0)
    net = TinyMLP(num_classes=3).eval()
    path = incremental.package_model(net, ["a", "b", "c"], tmp_path / "api.pt",
                                     preprocessing={"size": 8, "mean": [0.5], "std": [0.5]})
    pkg = load_model(path)
    assert pkg.architecture == f"{MODULE}:TinyMLP" and pkg.extra["input"]["normalize"] == {"mean": [0.5], "std": [0.5]}
    assert net.training is False
    with pytest.raises(PackageError, match="2 class names for a model whose head 'fc' has 3 outputs"):
        incremental.package_model(net, ["a", "b"], tmp_path / "x.pt", preprocessing={"size": 8})
    with pytest.raises(PackageError, match="architecture='torchvision:<name>'"):
        incremental.package_model(torchvision.models.resnet18(num_classes=3), ["a", "b", "c"], tmp_path / "x.pt")
    resnet = torchvision.models.resnet18(num_classes=3).eval()
    path = incremental.package_model(resnet, ["a", "b", "c"], tmp_path / "r.pt", architecture="torchvision:resnet18",
                                     preprocessing={"size": 32})
    assert load_model(path).extra["input"]["channels"] == 3
    assert not (tmp_path / "x.pt").exists()


def test_read_class_names_from_json(tmp_path):
    (tmp_path / "names.json").write_text(json.dumps(["x", "y"]))
    assert read_class_names(tmp_path / "names.json") == (["x", "y"], None)
    coco = {"categories": [{"id": 7, "name": "car"}, {"id": 3, "name": "bike"}]}
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    assert read_class_names(tmp_path / "coco.json") == (["car", "bike"], [7, 3])


def test_preprocessing_by_hand():
    prep = Preprocessing(channels=3, size=(2, 2), mean=[0.5], std=[0.25])
    # uint8 255 -> 1.0 -> (1 - 0.5) / 0.25 = 2; 0 -> -2; a grey image is repeated to 3 channels
    x = torch.tensor([[[[255, 0], [0, 255]]]], dtype=torch.uint8)
    assert prep(x).tolist() == [[[[2.0, -2.0], [-2.0, 2.0]]] * 3]
    # float arrays are in the model's pixel scale already: 0.75 -> (0.75 - 0.5) / 0.25 = 1
    assert torch.allclose(prep(torch.full((1, 3, 2, 2), 0.75)), torch.ones(1, 3, 2, 2))
    # pixel scale 0..255 (max_value) and flat models; RGB -> one channel by ITU-R 601 luma
    flat = Preprocessing(channels=1, size=(1, 2), flat=True, max_value=255.0)
    rgb = torch.tensor([[[[100, 0]], [[100, 0]], [[100, 0]]]], dtype=torch.uint8)
    assert flat(rgb).tolist() == [[100.0, 0.0]]
    # resize the shorter side, then crop the centre
    crop = Preprocessing(channels=1, size=(4, 4), resize=6)
    assert crop(torch.zeros(2, 1, 12, 18, dtype=torch.uint8)).shape == (2, 1, 4, 4)
    # round trip through the package's extra, and packages written before normalisation existed
    assert Preprocessing.from_any(prep.to_extra()) == prep
    legacy = Preprocessing.from_any({"channels": 1, "size": [8, 8], "max_value": 1.0, "flat": True})
    assert legacy.mean is None and legacy.input_shape == (64,)
    with pytest.raises(ValueError, match="resize"):
        Preprocessing(size=224, resize=200)
    with pytest.raises(ValueError, match="unknown entry 'scale'"):
        Preprocessing.from_any({"scale": 2})
    assert Preprocessing(channels=1, size=8, flat=True).input_shape == (64,)


def test_a_weights_file_with_nan_is_bad_input(files, capsys):
    tmp_path, resnet = files
    state = resnet.state_dict()
    state["fc.bias"] = torch.tensor([0.0, float("nan"), 1.0])
    torch.save(state, tmp_path / "nan.pth")
    refused(capsys, tmp_path, "weight 'fc.bias' holds NaN or inf", weights="nan.pth")
