"""Classifier models with heads that grow when an experience brings new classes.

Growing keeps the old rows of the output layer untouched, so a deployed model's knowledge of its
classes is exactly what it was before the update; only the new rows start from fresh initialisation.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from .config import check


def outputs_kept(after: torch.Tensor, before: torch.Tensor) -> bool:
    """True when a grown head's old outputs (``after``) equal those before the growth (``before``) up to
    float rounding (relative 1e-5, absolute 1e-6).

    The old rows are copied bit for bit, but a linear layer of another output width may run another
    GEMM kernel (other blocking and vector width, chosen per CPU), whose sums round differently in the
    last bits: exact equality held on one machine of ours and not on another. A wrong copy moves the
    outputs by far more than this tolerance.
    """
    return after.shape == before.shape and bool(torch.allclose(after, before, rtol=1e-5, atol=1e-6))


class GrowingClassifier(nn.Module):
    """Linear output layer whose number of classes can only grow (old rows are copied over)."""

    def __init__(self, in_features: int, n_classes: int) -> None:
        super().__init__()
        check(in_features >= 1, "in_features", f"must be >= 1, got {in_features}")
        check(n_classes >= 1, "n_classes", f"must be >= 1, got {n_classes}")
        self.in_features = in_features
        self.linear = nn.Linear(in_features, n_classes)

    @property
    def n_classes(self) -> int:
        return self.linear.out_features

    def grow_to(self, n_classes: int) -> bool:
        """Make room for ``n_classes`` outputs; returns True when the layer changed."""
        old = self.linear
        if n_classes <= old.out_features:
            return False
        new = nn.Linear(self.in_features, n_classes).to(old.weight.device, old.weight.dtype)
        with torch.no_grad():
            new.weight[: old.out_features] = old.weight
            new.bias[: old.out_features] = old.bias
        self.linear = new
        return True

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(features)


class MLP(nn.Module):
    """Multilayer perceptron on flattened inputs: in -> hidden (x layers) -> classes."""

    def __init__(self, input_size: int = 64, hidden_size: int = 256, n_classes: int = 10,
                 hidden_layers: int = 1, dropout: float = 0.0) -> None:
        super().__init__()
        check(input_size >= 1, "input_size", f"must be >= 1, got {input_size}")
        check(hidden_size >= 1, "hidden_size", f"must be >= 1, got {hidden_size}")
        check(hidden_layers >= 0, "hidden_layers", f"must be >= 0, got {hidden_layers}")
        check(0.0 <= dropout < 1.0, "dropout", f"must be in [0, 1), got {dropout}")
        layers: list[nn.Module] = [nn.Flatten()]
        width = input_size
        for _ in range(hidden_layers):
            layers += [nn.Linear(width, hidden_size), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = hidden_size
        self.features = nn.Sequential(*layers)
        self.classifier = GrowingClassifier(width, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class SmallConvNet(nn.Module):
    """Two conv blocks and a growing classifier, for small images (8x8 digits up to 32x32)."""

    def __init__(self, in_channels: int = 1, image_size: int = 8, channels: int = 32,
                 n_classes: int = 10) -> None:
        super().__init__()
        check(in_channels >= 1, "in_channels", f"must be >= 1, got {in_channels}")
        check(image_size >= 2, "image_size", f"must be >= 2, got {image_size}")
        check(channels >= 1, "channels", f"must be >= 1, got {channels}")
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, channels, 3, padding=1), nn.ReLU(),
            nn.Conv2d(channels, channels * 2, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
        )
        side = image_size // 2
        self.classifier = GrowingClassifier(channels * 2 * side * side, n_classes)
        self.in_channels = in_channels
        self.image_size = image_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:  # flat pixels (digits are stored as 64 features)
            x = x.view(-1, self.in_channels, self.image_size, self.image_size)
        return self.classifier(self.features(x))


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convolutions with batch norm and a (projected) shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ReducedResNet18(nn.Module):
    """The slim ResNet-18 of the class-incremental literature (GEM, A-GEM, ER, DER) for 32x32 inputs:
    four stages of two basic blocks with ``nf, 2nf, 4nf, 8nf`` channels (nf = 20, about 1.1 M
    parameters), a 3x3 stride-1 stem without max pooling, global average pooling, growing head."""

    def __init__(self, in_channels: int = 3, n_classes: int = 10, nf: int = 20) -> None:
        super().__init__()
        check(in_channels >= 1, "in_channels", f"must be >= 1, got {in_channels}")
        check(nf >= 1, "nf", f"must be >= 1, got {nf}")
        self.in_channels = in_channels
        stages: list[nn.Module] = [nn.Conv2d(in_channels, nf, 3, stride=1, padding=1, bias=False),
                                   nn.BatchNorm2d(nf), nn.ReLU()]
        planes = nf
        for i, width in enumerate((nf, 2 * nf, 4 * nf, 8 * nf)):
            stride = 1 if i == 0 else 2
            stages += [BasicBlock(planes, width, stride), BasicBlock(width, width, 1)]
            planes = width
        stages += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.features = nn.Sequential(*stages)
        self.classifier = GrowingClassifier(8 * nf, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def last_linear(model: nn.Module) -> tuple[str, nn.Linear]:
    """Dotted name and module of the last ``nn.Linear`` in registration order: the classification
    layer of every torchvision classifier that has one (``fc``, ``classifier.1``, ``heads.head``, ...)."""
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not found:
        raise ValueError(f"{type(model).__name__} has no nn.Linear layer to use as the classification head")
    return found[-1]


def _set_submodule(model: nn.Module, dotted: str, module: nn.Module) -> None:
    parent_name, _, child = dotted.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def detach_head(model: nn.Module) -> tuple[str, nn.Linear]:
    """Replace the last ``nn.Linear`` of ``model`` by ``nn.Identity`` (in place), so the model returns
    the features that layer took; returns the layer's dotted name and the layer."""
    name, head = last_linear(model)
    _set_submodule(model, name, nn.Identity())
    return name, head


class TorchvisionClassifier(nn.Module):
    """Any torchvision classification model with its last linear layer replaced by a growing head.

    ``features`` is the torchvision model with that layer set to ``nn.Identity`` (so its other layers
    keep torchvision's names); ``classifier`` is the :class:`GrowingClassifier`. ``head_name`` is the
    replaced layer's dotted name in the original model (``fc`` for ResNets), which maps a user's
    torchvision state dict onto this one. One-channel inputs are repeated to three channels when the
    architecture expects three (torchvision models do).
    """

    def __init__(self, name: str, n_classes: int = 10, in_channels: int = 3, weights: str | None = None,
                 options: dict[str, Any] | None = None) -> None:
        super().__init__()
        import torchvision

        check(n_classes >= 1, "n_classes", f"must be >= 1, got {n_classes}")
        check(in_channels in (1, 3), "in_channels", f"must be 1 or 3, got {in_channels}")
        known = torchvision.models.list_models(torchvision.models)  # classification models only
        if name not in known:
            raise ValueError(f"model.name: unknown torchvision model {name!r}; known: {', '.join(known)}")
        try:  # options: the builder's own keyword arguments (``aux_logits``, ``image_size``, ...)
            backbone = torchvision.models.get_model(name, weights=None, **(options or {}))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"model.options: torchvision {name} does not take {options} ({exc})") from None
        self.arch = name
        self.head_name, head = detach_head(backbone)
        self.features = backbone
        self.classifier = GrowingClassifier(head.in_features, n_classes)
        self.in_channels = in_channels
        if weights is not None:
            load_backbone_weights(self, weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.in_channels == 1 and x.shape[1] == 1:
            x = x.expand(-1, 3, *x.shape[2:])
        return self.classifier(self.features(x))


def load_backbone_weights(model: TorchvisionClassifier, path: str) -> None:
    """Load a torchvision state dict (a local file) into ``model.features``; the old head is left out.

    Missing or unexpected keys and shape mismatches are one-line errors naming the first offending key.
    """
    from pathlib import Path

    file = Path(path)
    if not file.is_file():
        raise ValueError(f"model.weights: {path} does not exist")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means an unusable file
        raise ValueError(f"model.weights: {path} is not a readable state dict ({type(exc).__name__})") from None
    if isinstance(state, dict) and not any(isinstance(v, torch.Tensor) for v in state.values()):
        state = state.get("state_dict", state.get("model", state))
    if not isinstance(state, dict):
        raise ValueError(f"model.weights: {path} holds no state dict")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    head = model.head_name + "."
    backbone_state = {k: v for k, v in state.items() if not k.startswith(head)}
    own = model.features.state_dict()
    missing = [k for k in own if k not in backbone_state]
    unexpected = [k for k in backbone_state if k not in own]
    if missing or unexpected:
        key = missing[0] if missing else unexpected[0]
        kind = "missing" if missing else "unexpected"
        raise ValueError(f"model.weights: {path} does not fit torchvision:{model.arch} ({kind} key {key!r})")
    for key, value in backbone_state.items():
        if tuple(value.shape) != tuple(own[key].shape):
            raise ValueError(f"model.weights: {path}: {key!r} has shape {tuple(value.shape)}, "
                             f"torchvision:{model.arch} needs {tuple(own[key].shape)}")
    model.features.load_state_dict(backbone_state)


MODELS: dict[str, type[nn.Module]] = {"mlp": MLP, "convnet": SmallConvNet, "resnet18_reduced": ReducedResNet18}
TORCHVISION_PREFIX = "torchvision:"
def build_model(name: str, **kwargs: Any) -> nn.Module:
    """A classifier by architecture name, as stored in model packages and configs:
    ``mlp``, ``convnet``, ``resnet18_reduced`` or ``torchvision:<any classification model>``."""
    if name.startswith(TORCHVISION_PREFIX):
        return TorchvisionClassifier(name.removeprefix(TORCHVISION_PREFIX), **kwargs)
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {sorted(MODELS)} or torchvision:<name>")
    return MODELS[name](**kwargs)


def model_kwargs(name: str, input_shape: tuple[int, ...], n_classes: int, *, hidden_size: int = 256,
                 hidden_layers: int = 1, channels: int = 32, weights: str | None = None) -> dict[str, Any]:
    """Constructor arguments of ``name`` for inputs of ``input_shape`` ((C, H, W) or (F,))."""
    if name == "mlp":
        return {"input_size": math.prod(input_shape), "hidden_size": hidden_size, "hidden_layers": hidden_layers,
                "n_classes": n_classes}
    if len(input_shape) == 1:  # flat features: only the small convnet reshapes square ones (8x8 digits)
        side = math.isqrt(input_shape[0])
        if name != "convnet" or side * side != input_shape[0]:
            raise ValueError(f"model.name: {name} needs images; the data are flat vectors of {input_shape[0]} values")
        input_shape = (1, side, side)
    if name == "convnet":
        if input_shape[1] != input_shape[2]:
            raise ValueError(f"model.name: convnet needs square images, got {input_shape[1]}x{input_shape[2]}")
        return {"in_channels": input_shape[0], "image_size": input_shape[1], "channels": channels, "n_classes": n_classes}
    if name == "resnet18_reduced":
        return {"in_channels": input_shape[0], "n_classes": n_classes}
    if name.startswith(TORCHVISION_PREFIX):
        return {"in_channels": input_shape[0], "n_classes": n_classes, **({"weights": weights} if weights else {})}
    raise ValueError(f"unknown model {name!r}; known: {sorted(MODELS)} or torchvision:<name>")


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


