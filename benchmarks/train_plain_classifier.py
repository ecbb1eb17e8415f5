"""A plain PyTorch training script, the kind a user already has: Fashion-MNIST, a small CNN, its own loop.

Nothing from ``incremental`` is used here on purpose: this is the model a user trained before they met
this project. It reads the IDX files itself, normalises with the usual Fashion-MNIST mean / std,
trains with Adam and saves ``torch.save(model.state_dict())`` plus a ``classes.txt``.
``benchmarks/own_model_fashion_mnist.py`` then brings it in with ``incremental package`` and updates it.

    python benchmarks/train_plain_classifier.py --classes 0 1 2 3 4 5 6 7 --out runs/fmnist8 --seed 0
"""
from __future__ import annotations

import argparse
import gzip
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

DATA = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
MEAN, STD = 0.2860, 0.3530  # Fashion-MNIST training-set pixel mean / std (in [0, 1])


class FashionCNN(nn.Module):
    """Two 3x3 conv blocks (16 and 32 channels, max-pooled), a 128-unit hidden layer, ``num_classes`` outputs;
    207 k parameters for 10 classes."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(),
        )
        self.hidden = nn.Sequential(nn.Linear(32 * 7 * 7, 128), nn.ReLU())
        self.out = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.hidden(self.features(x)))


def read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load(split: str, classes: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Images of ``classes`` as normalised float tensors (N, 1, 28, 28), labels re-indexed 0..len-1."""
    prefix = "train" if split == "train" else "t10k"
    images = read_idx(DATA / f"{prefix}-images-idx3-ubyte.gz")
    labels = read_idx(DATA / f"{prefix}-labels-idx1-ubyte.gz").astype(np.int64)
    keep = np.isin(labels, classes)
    x = torch.from_numpy(images[keep].astype(np.float32) / 255.0).unsqueeze(1)
    remap = {c: i for i, c in enumerate(classes)}
    y = torch.tensor([remap[int(c)] for c in labels[keep]])
    return (x - MEAN) / STD, y


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, nargs="+", default=list(range(10)), help="Fashion-MNIST labels to train on")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    x, y = load("train", args.classes)
    model = FashionCNN(num_classes=len(args.classes))
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    loss_fn = nn.CrossEntropyLoss()
    start = time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(x))
        total = 0.0
        for i in range(0, len(x), args.batch_size):
            idx = order[i:i + args.batch_size]
            optimizer.zero_grad()
            loss = loss_fn(model(x[idx]), y[idx])
            loss.backward()
            optimizer.step()
            total += float(loss) * len(idx)
        print(f"epoch {epoch + 1}: loss {total / len(x):.4f} ({time.perf_counter() - start:.0f} s)", flush=True)
    x_test, y_test = load("test", args.classes)
    model.eval()
    with torch.no_grad():
        accuracy = float((model(x_test).argmax(1) == y_test).float().mean())
    print(f"test accuracy on {len(args.classes)} classes: {accuracy:.4f}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), out / "model.pth")
    (out / "classes.txt").write_text("".join(CLASSES[c] + "\n" for c in args.classes))


if __name__ == "__main__":
    main()
