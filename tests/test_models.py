"""Backbones: slim ResNet-18, any torchvision classifier with a growing head, argument checks."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from incremental.config import ConfigError
from incremental.models import (
    MLP, ReducedResNet18, SmallConvNet, TorchvisionClassifier, build_model, count_parameters, last_linear, model_kwargs,
)


def test_reduced_resnet18_is_the_literatures_slim_network():
    model = ReducedResNet18(in_channels=3, n_classes=10)
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    # nf = 20: 1.09 M parameters (GEM / DER's "reduced ResNet-18" counts about 1.1 M)
    assert 1.05e6 < count_parameters(model) < 1.15e6
    model.classifier.grow_to(12)
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 12)


def test_torchvision_classifier_replaces_the_last_linear_layer_and_takes_one_channel():
    model = build_model("torchvision:resnet18", n_classes=4, in_channels=1)
    assert isinstance(model, TorchvisionClassifier) and model.head_name == "fc"
    assert isinstance(model.features.fc, nn.Identity)
    assert model(torch.zeros(2, 1, 32, 32)).shape == (2, 4)
    old = model.classifier.linear.weight.detach().clone()
    model.classifier.grow_to(6)
    torch.testing.assert_close(model.classifier.linear.weight[:4], old)
    mobile = build_model("torchvision:mobilenet_v3_small", n_classes=3)
    assert mobile.head_name == "classifier.3" and mobile(torch.zeros(2, 3, 32, 32)).shape == (2, 3)


def test_backbone_weights_load_and_mismatches_name_the_first_key(tmp_path):
    import torchvision

    reference = torchvision.models.resnet18(weights=None, num_classes=1000)
    torch.save({"state_dict": {f"module.{k}": v for k, v in reference.state_dict().items()}}, tmp_path / "w.pth")
    model = TorchvisionClassifier("resnet18", n_classes=5, weights=str(tmp_path / "w.pth"))
    torch.testing.assert_close(model.features.conv1.weight, reference.conv1.weight)
    state = reference.state_dict()
    state.pop("layer1.0.bn1.weight")
    torch.save(state, tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="missing key 'layer1.0.bn1.weight'"):
        TorchvisionClassifier("resnet18", n_classes=5, weights=str(tmp_path / "missing.pth"))
    with pytest.raises(ValueError, match="unknown torchvision model 'resnet19'"):
        TorchvisionClassifier("resnet19")


def test_model_kwargs_follow_the_input_shape():
    assert model_kwargs("mlp", (1, 28, 28), 10)["input_size"] == 784
    assert model_kwargs("convnet", (64,), 10) == {"in_channels": 1, "image_size": 8, "channels": 32, "n_classes": 10}
    assert model_kwargs("resnet18_reduced", (3, 32, 32), 10) == {"in_channels": 3, "n_classes": 10}
    with pytest.raises(ValueError, match="resnet18_reduced needs images"):
        model_kwargs("resnet18_reduced", (64,), 10)


def test_last_linear_refuses_a_model_without_one():
    with pytest.raises(ValueError, match="has no nn.Linear"):
        last_linear(nn.Sequential(nn.Conv2d(1, 2, 3)))


@pytest.mark.parametrize("build, key", [
    (lambda: MLP(input_size=0), "input_size"),
    (lambda: MLP(hidden_size=-3), "hidden_size"),
    (lambda: MLP(dropout=1.5), "dropout"),
    (lambda: SmallConvNet(channels=0), "channels"),
    (lambda: ReducedResNet18(nf=0), "nf"),
    (lambda: TorchvisionClassifier("resnet18", in_channels=2), "in_channels"),
])
def test_constructors_refuse_impossible_arguments_with_one_line(build, key):
    with pytest.raises(ConfigError, match=f"^{key}: must"):
        build()
