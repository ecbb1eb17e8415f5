"""The input boundaries the fuzz suite attacks, as a table: one :class:`Boundary` row per input format.

A row says how to write a valid input (``seed``), how hypothesis may damage it (``mutate``), which
library function reads it (``load``: it must return, or raise one of :data:`INPUT_ERRORS` with a
one-line message) and which ``incremental`` command reads it (``cli``: exit 0, or exit 2 / 3 with one
line on stderr and nothing written; never a traceback; the input files unchanged either way).

Adding a boundary is a row in :data:`BOUNDARIES`: a seed writer, a mutation (the generic ones below
cover JSON, YAML, raw bytes and trees of values) and the two readers.
"""
from __future__ import annotations

import copy
import functools
import io
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import yaml
from hypothesis import strategies as st

from incremental.config import InputError

from .reliability_helpers import ROOT, new_class_npz, tiny_classifier_package

#: What a reader may raise for a bad input: the project's own error type (ConfigError, DataError,
#: PackageError, UsageError are InputErrors), or FileNotFoundError for a file that an entry names.
INPUT_ERRORS = (InputError, FileNotFoundError)


@dataclass(frozen=True)
class Boundary:
    name: str
    seed: Callable[[Path, "Assets"], Path]  # write a valid input into an empty folder; returns the input path
    mutate: Callable[[Any, Path], None]  # (hypothesis data, input path): damage the input in place
    load: Callable[[Path, "Assets"], Any]  # the library's reader
    cli: Callable[[Path, Path, "Assets"], list[str]] | None  # (input, output that does not exist) -> argv
    cli_when_loaded: bool = True  # also run the command when the reader accepted the input (cheap ones only)
    slow_examples: int = 1500  # cases in the slow profile


# ============================================================================ shared valid inputs
@dataclass
class Assets:
    """Valid files every case may point at (built once per session)."""

    root: Path
    classifier: Path  # package: MLP on 8x8 digits, classes zero, one, two
    npz: Path  # new data for it: one (known), three (new)
    detector: Path  # package: tiny Faster R-CNN, classes circle, square, triangle
    scene: Path  # generated transfer scene: instances.json (the person's boxes), images/, pred.json
    panoptic: Path  # package: tiny panoptic model, classes circle, square, sky, ground
    weights: Path  # a user's plain state dict: tests.test_package_command:TinyMLP, 3 classes, hidden 8
    classes: Path  # its classes file: cat, dog, bird


@functools.lru_cache(maxsize=None)
def assets() -> Assets:
    root = Path(tempfile.mkdtemp(prefix="incremental-fuzz-assets-"))
    from incremental.detection.feedback import predictions_to_results
    from incremental.detection.model import build_detector, predict
    from incremental.detection.packaging import save_detector
    from incremental.detection.scenes import generate_scene
    from incremental.package import save_model
    from incremental.panoptic.model import build_panoptic_model
    from incremental.panoptic.update import package_extra

    classifier = tiny_classifier_package(root / "classifier.pt")
    npz = new_class_npz(root / "new.npz")
    torch.manual_seed(0)
    detector = build_detector(num_classes=3, image_size=64, box_score_thresh=0.0)
    save_detector(root / "detector.pt", detector, ["circle", "square", "triangle"], [1, 2, 3])
    scene = generate_scene("transfer", 2, seed=0, image_size=64)
    scene.write(root / "scene")
    images = [torch.from_numpy(im).permute(2, 0, 1).float() / 255 for im in scene.images]
    (root / "scene" / "pred.json").write_text(json.dumps(predictions_to_results(predict(detector, images), [1, 2], [1, 2, 3])))
    tiny = dict(n_queries=4, hidden_dim=16, n_layers=1, n_heads=2, ffn_dim=16, mask_dim=16, backbone_channels=[8, 8, 8])
    old = ["circle", "square", "sky", "ground"]
    panoptic = save_model(root / "panoptic.pt", build_panoptic_model(n_classes=4, **tiny), kind="panoptic",
                          architecture="panoptic_tiny", arch_kwargs={"n_classes": 4, **tiny}, class_names=old,
                          extra=package_extra(old, [0, 1], 32))
    (root / "idx_config.yaml").write_text(IDX_CONFIG)
    from tests.test_package_command import TinyMLP

    torch.manual_seed(0)
    torch.save(TinyMLP(**USER_MODEL_KWARGS).state_dict(), root / "user_weights.pth")
    (root / "classes.txt").write_text("cat\ndog\nbird\n")
    return Assets(root, classifier, npz, root / "detector.pt", root / "scene", panoptic, root / "user_weights.pth",
                  root / "classes.txt")


# ============================================================================ generic mutations
#: Values a damaged or hand-edited file holds where something else was expected.
NASTY = st.one_of(
    st.none(), st.booleans(),
    st.sampled_from([0, -1, 1, 2, 255, 2**31, 2**63, -(2**63) - 1, 10**30, 0.5, -0.0, 1e-300, 1e308, -1e308,
                     float("nan"), float("inf"), float("-inf")]),
    st.integers(), st.floats(),
    st.sampled_from(["", "1e-3", ".inf", "NaN", "null", "../../etc", "\x00", "x" * 300, "Zero", "one"]),
    st.text(max_size=6),
    st.lists(st.integers(min_value=-5, max_value=70), max_size=5),
    st.dictionaries(st.sampled_from(["id", "name", "x"]), st.integers(-2, 3), max_size=2),
)


def tree_paths(doc: Any, limit: int = 400) -> list[tuple[Any, ...]]:
    """Paths (key / index tuples) of every node of a JSON-like tree, breadth first, root included."""
    paths: list[tuple[Any, ...]] = [()]
    queue: list[tuple[tuple[Any, ...], Any]] = [((), doc)]
    while queue and len(paths) < limit:
        path, node = queue.pop(0)
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
        for key, child in items:
            paths.append((*path, key))
            queue.append(((*path, key), child))
    return paths[:limit]


def _get(doc: Any, path: tuple[Any, ...]) -> Any:
    for key in path:
        doc = doc[key]
    return doc


def mutate_tree(data: Any, doc: Any, values: Any = NASTY) -> Any:
    """1-3 edits of a JSON-like tree: replace a node, delete it, duplicate a list item (duplicate ids),
    copy a sibling's id, empty a container or wrap a value in a list. Returns the new tree."""
    for _ in range(data.draw(st.integers(1, 3), label="edits")):
        path = data.draw(st.sampled_from(tree_paths(doc)), label="path")
        op = data.draw(st.sampled_from(["replace", "replace", "delete", "duplicate", "same_id", "empty", "wrap"]), label="op")
        if not path:
            doc = data.draw(values, label="root") if op == "replace" else [doc] if op == "wrap" else doc
            continue
        parent, key = _get(doc, path[:-1]), path[-1]
        node = parent[key]
        if op == "replace":
            parent[key] = data.draw(values, label="value")
        elif op == "delete":
            del parent[key]
        elif op == "duplicate" and isinstance(node, list) and node:
            node.append(copy.deepcopy(node[data.draw(st.integers(0, len(node) - 1))]))
        elif op == "same_id" and isinstance(parent, list) and len(parent) > 1 and isinstance(node, dict):
            other = parent[(key + 1) % len(parent)]
            if isinstance(other, dict) and "id" in other:
                node["id"] = other["id"]
        elif op == "empty" and isinstance(node, (list, dict)):
            parent[key] = type(node)()
        elif op == "wrap":
            parent[key] = [node]
    return doc


def mutate_bytes(data: Any, path: Path) -> None:
    """Truncate, overwrite, insert or zero bytes of a file (a damaged copy, an interrupted download)."""
    raw = path.read_bytes()
    op = data.draw(st.sampled_from(["truncate", "overwrite", "insert", "empty", "zeros"]), label="byte op")
    if op == "empty" or not raw:
        raw = b""
    elif op == "truncate":
        raw = raw[: data.draw(st.integers(0, len(raw) - 1), label="keep")]
    elif op == "zeros":
        start = data.draw(st.integers(0, len(raw) - 1))
        raw = raw[:start] + b"\0" * min(64, len(raw) - start) + raw[start + 64:]
    else:
        at = data.draw(st.integers(0, len(raw) - 1), label="at")
        chunk = data.draw(st.binary(min_size=1, max_size=8), label="bytes")
        raw = raw[:at] + chunk + raw[at + (len(chunk) if op == "overwrite" else 0):]
    path.write_bytes(raw)


def mutate_json_file(data: Any, path: Path) -> None:
    if data.draw(st.integers(0, 4), label="bytes?") == 0:
        return mutate_bytes(data, path)
    doc = mutate_tree(data, json.loads(path.read_text()))
    path.write_text(json.dumps(doc))  # NaN / Infinity are written as Python's json writes them


# ============================================================================ configs
QUICKSTART = ROOT / "configs" / "quickstart.yaml"
CONFIG_KEYS = ["seed", "scenario.name", "scenario.n_experiences", "scenario.class_order", "scenario.test_fraction",
               "strategy.plugins", "strategy.plugins[0]", "strategy.history.mem_size", "strategy.history.policy",
               "strategy.history.batch_size", "strategy.regime", "strategy.name", "train.epochs", "train.batch_size",
               "train.lr", "train.optimizer", "train.device", "train.threads", "model.name", "model.hidden_size",
               "model.hidden_layers"]


def seed_config(folder: Path, _: Assets) -> Path:
    return Path(shutil.copy(QUICKSTART, folder / "config.yaml"))


def mutate_config(data: Any, path: Path) -> None:
    kind = data.draw(st.sampled_from(["tree", "tree", "bytes", "text"]), label="config edit")
    if kind == "bytes":
        return mutate_bytes(data, path)
    if kind == "text":
        text = path.read_text()
        at = data.draw(st.integers(0, len(text)))
        path.write_text(text[:at] + data.draw(st.text(max_size=12), label="inserted") + text[at:])
        return
    doc = mutate_tree(data, yaml.safe_load(path.read_text()))
    path.write_text(yaml.safe_dump(doc, allow_unicode=True))


def load_config(path: Path, _: Assets) -> Any:
    from incremental.cli import prepare_run

    return prepare_run(str(path), [])


def run_config(path: Path, out: Path, _: Assets) -> list[str]:
    return ["run", str(path), "--out", str(out), "--quiet"]


def seed_overrides(folder: Path, _: Assets) -> Path:
    path = folder / "overrides.json"
    path.write_text("[]")
    return path


OVERRIDE = st.one_of(
    st.builds(lambda k, v: f"{k}={v}", st.one_of(st.sampled_from(CONFIG_KEYS), st.text(max_size=12)),
              st.one_of(st.text(max_size=12), st.sampled_from(["1e-3", "5e2", "-1", "0", "1e400", ".nan", "[1,2]",
                                                                "{a: 1}", "[", "null", "2.5", "10.0", "1_000",
                                                                "0x10", "yes", "9" * 30]))),
    st.text(max_size=12),
)


def mutate_overrides(data: Any, path: Path) -> None:
    path.write_text(json.dumps(data.draw(st.lists(OVERRIDE, min_size=1, max_size=3), label="--set")))


def load_overrides(path: Path, _: Assets) -> Any:
    from incremental.cli import prepare_run

    return prepare_run(str(QUICKSTART), json.loads(path.read_text()))


def run_overrides(path: Path, out: Path, _: Assets) -> list[str]:
    sets = [arg for item in json.loads(path.read_text()) for arg in ("--set", item)]
    return ["run", str(QUICKSTART), "--out", str(out), "--quiet", *sets]


# ============================================================================ classifier data
def seed_npz(folder: Path, a: Assets) -> Path:
    return Path(shutil.copy(a.npz, folder / "new.npz"))


def _random_array(data: Any) -> np.ndarray:
    dtype = data.draw(st.sampled_from(["float64", "float32", "float16", "int64", "uint8", "bool", "complex64",
                                       "object", "<U3", "S2", "datetime64[s]"]), label="dtype")
    shape = tuple(data.draw(st.lists(st.integers(0, 5), max_size=3), label="shape"))
    if dtype == "object":
        array = np.empty(shape, dtype=object)
        array.fill([1, 2])
        return array
    values = np.arange(int(np.prod(shape)) if shape else 1) % 3
    return values.astype(dtype).reshape(shape)


def mutate_npz(data: Any, path: Path) -> None:
    if data.draw(st.integers(0, 5), label="bytes?") == 0:
        return mutate_bytes(data, path)
    with np.load(path) as f:
        arrays = {k: f[k] for k in f.files}
    for _ in range(data.draw(st.integers(1, 2))):
        key = data.draw(st.sampled_from(["x", "y", "class_names", "extra"]), label="array")
        op = data.draw(st.sampled_from(["value", "replace", "delete", "reshape"]), label="npz op")
        if op == "delete":
            arrays.pop(key, None)
        elif op == "replace" or key not in arrays:
            arrays[key] = _random_array(data)
        elif op == "reshape":
            arrays[key] = arrays[key].reshape(-1) if arrays[key].ndim > 1 else arrays[key].reshape(-1, 1)
        elif arrays[key].size and arrays[key].ndim and arrays[key].dtype.kind in "biufUS":
            flat = arrays[key].reshape(-1).copy()
            at = data.draw(st.integers(0, flat.size - 1), label="index")
            if flat.dtype.kind in "US":
                flat = flat.astype(object)
                flat[at] = data.draw(st.sampled_from(["", "one", "One", "zero", " three"]))
                flat = flat.astype(str)
            else:
                value = data.draw(st.sampled_from([np.nan, np.inf, -np.inf, 1e39, -1e39, 1e30, -1, 2**40, 7]))
                exact_int = flat.dtype.kind in "iub" and float(value).is_integer() and abs(value) < 2**62
                flat = flat.astype(np.int64 if exact_int else np.float64)
                flat[at] = value
            arrays[key] = flat.reshape(arrays[key].shape)
    with open(path, "wb") as handle:
        np.savez(handle, **arrays)


def load_classifier_data(path: Path, a: Assets) -> Any:
    from incremental.package import load_model
    from incremental.preprocessing import load_labelled
    from incremental.update_classifier import package_preprocessing

    return load_labelled(path, package_preprocessing(load_model(a.classifier)))


def run_classifier_update(path: Path, out: Path, a: Assets) -> list[str]:
    return ["update", "--model", str(a.classifier), "--data", str(path), "--out", str(out), "--epochs", "1", "--quiet"]


def seed_image_folder(folder: Path, a: Assets) -> Path:
    from incremental.datasets import save_image_folder

    with np.load(a.npz) as f:
        x, y, names = f["x"][:6], f["y"][:6], [str(n) for n in f["class_names"]]
    save_image_folder(folder / "images", x.reshape(-1, 8, 8), y, names, max_value=1.0)
    return folder / "images"


IMAGE_MODES = ["1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "I", "I;16", "F", "YCbCr"]


def _odd_image(data: Any) -> bytes:
    """An image file in an unusual mode / format (16-bit, float, palette, CMYK, 1-pixel wide, ...)."""
    from PIL import Image

    mode = data.draw(st.sampled_from(IMAGE_MODES), label="mode")
    size = (data.draw(st.integers(1, 40)), data.draw(st.integers(1, 40)))
    first = data.draw(st.sampled_from(["PNG", "TIFF", "BMP", "GIF", "JPEG"]), label="format")
    image = Image.new(mode, size)
    for fmt in (first, "TIFF", "PNG"):  # the first format that can hold this mode
        buffer = io.BytesIO()
        try:
            image.save(buffer, format=fmt)
            return buffer.getvalue()
        except (OSError, ValueError, KeyError):
            continue
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def _png_claiming(width: int, height: int) -> bytes:
    """A PNG header declaring a huge image (a decompression bomb) with no pixel data."""
    import struct
    import zlib

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))


def mutate_image_folder(data: Any, root: Path) -> None:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    classes = sorted(p for p in root.iterdir() if p.is_dir())
    for _ in range(data.draw(st.integers(1, 2))):
        op = data.draw(st.sampled_from(["bytes", "odd_image", "bomb", "empty_class", "no_images", "nested",
                                        "other_file", "odd_name", "empty_root"]), label="folder op")
        target = data.draw(st.sampled_from(files), label="file") if files else root / "one" / "x.png"
        if op == "bytes" and target.exists():
            mutate_bytes(data, target)
        elif op == "odd_image":
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(_odd_image(data))
        elif op == "bomb":
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(_png_claiming(data.draw(st.sampled_from([0, 1, 60000, 2**31 - 1])), 60000))
        elif op == "empty_class":
            (root / data.draw(st.sampled_from(["new", "zero", "One"]))).mkdir(exist_ok=True)
        elif op == "no_images" and classes:
            for p in data.draw(st.sampled_from(classes)).iterdir():
                p.unlink() if p.is_file() else shutil.rmtree(p)
        elif op == "nested" and classes and files:
            nested = data.draw(st.sampled_from(classes)) / "sub"
            nested.mkdir(exist_ok=True)
            shutil.copy(files[0], nested / "a.png")
        elif op == "other_file":
            (root / "notes.txt").write_text("not a class")
            if classes:
                (classes[0] / "readme.md").write_text("hello")
        elif op == "odd_name" and classes:
            name = data.draw(st.sampled_from(["Zero", " one", "ø", "a b", "x" * 100]))
            if not (root / name).exists():
                classes[0].rename(root / name)
                classes = sorted(p for p in root.iterdir() if p.is_dir())
                files = sorted(p for p in root.rglob("*") if p.is_file())
        elif op == "empty_root":
            shutil.rmtree(root)
            root.mkdir()
        files = sorted(p for p in root.rglob("*") if p.is_file())
        classes = sorted(p for p in root.iterdir() if p.is_dir())


# ============================================================================ COCO instances / results
def seed_instances(folder: Path, a: Assets) -> Path:
    shutil.copytree(a.scene, folder / "scene")
    return folder / "scene" / "instances.json"


def load_instances(path: Path, _: Assets) -> Any:
    from incremental.detection.coco import load_coco_detection

    return load_coco_detection(path)


def run_detector_update(path: Path, out: Path, a: Assets) -> list[str]:
    return ["update", "--model", str(a.detector), "--data", str(path), "--out", str(out), "--epochs", "1", "--quiet"]


def _feedback_inputs(a: Assets) -> dict[str, Any]:
    verified = json.loads((a.scene / "instances.json").read_text())
    return {"verified": verified, "names": ["circle", "square", "triangle"]}


def _no_candidates(image_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.zeros((0, 4)), torch.zeros(0), torch.zeros(0, dtype=torch.long)


def seed_results(folder: Path, a: Assets) -> Path:
    return Path(shutil.copy(a.scene / "pred.json", folder / "pred.json"))


def load_results(path: Path, a: Assets) -> Any:
    from incremental.detection.coco import check_results, load_json
    from incremental.detection.feedback import build_training_set

    predictions = load_json(path)
    check_results(predictions, str(path))
    given = _feedback_inputs(a)
    return build_training_set(given["verified"], predictions, given["names"], _no_candidates,
                              image_sizes=lambda entry: (64, 64), sources=("verified", str(path)))


def run_feedback_results(path: Path, out: Path, a: Assets) -> list[str]:
    return ["feedback", "--model", str(a.detector), "--images", str(a.scene / "images"), "--predictions", str(path),
            "--verified", str(a.scene / "instances.json"), "--out", str(out)]


def seed_verified(folder: Path, a: Assets) -> Path:
    return Path(shutil.copy(a.scene / "instances.json", folder / "verified.json"))


def load_verified(path: Path, a: Assets) -> Any:
    from incremental.detection.coco import check_instances, check_results, load_json
    from incremental.detection.feedback import build_training_set

    verified = load_json(path)
    check_instances(verified, str(path))
    predictions = load_json(a.scene / "pred.json")
    check_results(predictions, "pred.json")
    return build_training_set(verified, predictions, ["circle", "square", "triangle"], _no_candidates,
                              image_sizes=lambda entry: (64, 64), sources=(str(path), "pred.json"))


def run_feedback_verified(path: Path, out: Path, a: Assets) -> list[str]:
    return ["feedback", "--model", str(a.detector), "--images", str(a.scene / "images"), "--predictions",
            str(a.scene / "pred.json"), "--verified", str(path), "--out", str(out)]


# ============================================================================ COCO panoptic
@functools.lru_cache(maxsize=None)
def _panoptic_split() -> Path:
    from incremental.panoptic.shapes import SplitSpec, generate_split

    spec = SplitSpec(3, required=["cross"], n_required=(1, 2), others=["circle"], n_other=(0, 1), image_size=32)
    return generate_split(assets().root / "panoptic_data", "new", spec, seed=1).parent


def seed_panoptic(folder: Path, _: Assets) -> Path:
    shutil.copytree(_panoptic_split(), folder / "new")
    return folder / "new" / "panoptic.json"


def mutate_panoptic(data: Any, path: Path) -> None:
    if data.draw(st.integers(0, 5), label="png?") == 0:
        pngs = sorted(path.parent.rglob("*.png"))
        target = data.draw(st.sampled_from(pngs), label="png")
        if data.draw(st.booleans()):
            return mutate_bytes(data, target)
        from PIL import Image

        colours = np.array(data.draw(st.lists(st.integers(0, 255), min_size=3, max_size=12)) * 3, dtype=np.uint8)
        Image.fromarray(np.resize(colours, (8, 8, 3))).save(target)  # other size, unknown segment ids
        return
    mutate_json_file(data, path)


def load_panoptic(path: Path, _: Assets) -> Any:
    from incremental.panoptic.coco import load_coco_panoptic

    return load_coco_panoptic(path)


def run_panoptic_update(path: Path, out: Path, a: Assets) -> list[str]:
    return ["update", "--model", str(a.panoptic), "--data", str(path.parent), "--out", str(out), "--epochs", "1", "--quiet"]


# ============================================================================ IDX (MNIST format)
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
IDX_CONFIG = ("seed: 0\nscenario: {name: class_incremental, source: idx, n_experiences: 2}\n"
              "train: {epochs: 1, batch_size: 16}\nmodel: {name: mlp, hidden_size: 8}\n")


def _idx_bytes(array: np.ndarray) -> bytes:
    import struct

    code = {np.dtype(np.uint8): 0x08, np.dtype(np.int64): 0x0C}[array.dtype]
    if code == 0x0C:
        array = array.astype(">i4")
    return bytes([0, 0, code, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape) + array.tobytes()


@functools.lru_cache(maxsize=None)
def _idx_seed_files() -> dict[str, bytes]:
    """The first images of the real Fashion-MNIST files (generated ones where they are not installed),
    as IDX bytes: train as plain files, t10k gzipped, as people have them."""
    import gzip

    from incremental.sources import read_idx

    files = {}
    for split, n in (("train", 40), ("t10k", 20)):
        for kind in ("images-idx3", "labels-idx1"):
            source = FASHION_MNIST / f"{split}-{kind}-ubyte.gz"
            if source.is_file():
                array = read_idx(source)[:n]
            else:
                rng = np.random.default_rng(0)
                shape = (n, 28, 28) if kind.startswith("images") else (n,)
                array = rng.integers(0, 10 if len(shape) == 1 else 256, shape).astype(np.uint8)
            raw = _idx_bytes(array)
            files[f"{split}-{kind}-ubyte"] = raw if split == "train" else gzip.compress(raw, mtime=0)
    return {name + (".gz" if name.startswith("t10k") else ""): raw for name, raw in files.items()}


def seed_idx(folder: Path, _: Assets) -> Path:
    root = folder / "idx"
    root.mkdir()
    for name, raw in _idx_seed_files().items():
        (root / name).write_bytes(raw)
    return root


def mutate_idx(data: Any, root: Path) -> None:
    files = sorted(root.iterdir())
    target = data.draw(st.sampled_from(files), label="file")
    op = data.draw(st.sampled_from(["bytes", "header", "header", "dims", "delete", "swap"]), label="idx op")
    if op == "delete":
        target.unlink()
    elif op == "swap":
        other = data.draw(st.sampled_from(files), label="other")
        raw = other.read_bytes()
        other.write_bytes(target.read_bytes())
        target.write_bytes(raw)
    elif op == "bytes" or target.suffix == ".gz":
        mutate_bytes(data, target)
    else:
        raw = bytearray(target.read_bytes())
        if op == "header":  # magic, data type code or number of dimensions
            raw[data.draw(st.integers(0, 3), label="at")] = data.draw(st.integers(0, 255), label="byte")
        else:  # a dimension that promises another size
            ndim = raw[3]
            k = data.draw(st.integers(0, max(ndim - 1, 0)), label="dim")
            raw[4 + 4 * k: 8 + 4 * k] = data.draw(st.sampled_from([0, 1, 27, 29, 41, 2**31, 2**32 - 1])).to_bytes(4, "big")
        target.write_bytes(bytes(raw))


def load_idx_pair(root: Path, _: Assets) -> Any:
    from incremental.sources import load_idx

    return load_idx(root, "train"), load_idx(root, "test")


def run_idx(root: Path, out: Path, a: Assets) -> list[str]:
    return ["run", str(a.root / "idx_config.yaml"), "--out", str(out), "--quiet", "--set", f"scenario.root={root}"]


# ============================================================================ model packages
def seed_package(folder: Path, a: Assets) -> Path:
    return Path(shutil.copy(a.classifier, folder / "model.pt"))


PACKAGE_VALUES = st.one_of(
    NASTY,
    st.sampled_from(["nan", "inf", "empty", "shape", "int", "huge"]).map(lambda k: {
        "nan": torch.full((3,), float("nan")), "inf": torch.tensor([1.0, float("inf")]), "empty": torch.zeros(0),
        "shape": torch.zeros(2, 2), "int": torch.ones(3, dtype=torch.int64), "huge": torch.full((3,), 3e38)}[k]),
)


def mutate_package(data: Any, path: Path) -> None:
    if data.draw(st.integers(0, 3), label="bytes?") == 0:
        return mutate_bytes(data, path)
    payload = torch.load(path, weights_only=True)
    payload = mutate_tree(data, payload, PACKAGE_VALUES)
    torch.save(payload, path)


def load_package(path: Path, _: Assets) -> Any:
    from incremental.package import load_model
    from incremental.update_classifier import package_preprocessing

    package = load_model(path)
    package.build()
    if package.kind == "classifier":
        package_preprocessing(package)
    return package


def run_package_update(path: Path, out: Path, a: Assets) -> list[str]:
    return ["update", "--model", str(path), "--data", str(a.npz), "--out", str(out), "--epochs", "1", "--quiet"]


# ============================================================================ incremental package
USER_MODEL = "tests.test_package_command:TinyMLP"
USER_MODEL_KWARGS = {"num_classes": 3, "hidden": 8}


def package_argv(weights: Path, classes: Path, out: Path) -> list[str]:
    return ["package", "--architecture", USER_MODEL, "--kwargs", json.dumps(USER_MODEL_KWARGS), "--weights",
            str(weights), "--classes", str(classes), "--input-size", "8", "--out", str(out), "--quiet"]


def seed_weights(folder: Path, a: Assets) -> Path:
    return Path(shutil.copy(a.weights, folder / "weights.pth"))


def mutate_weights(data: Any, path: Path) -> None:
    """Damaged bytes, or a state dict edited: tensors of other shapes / NaN / inf, keys gone or wrapped
    in a checkpoint dict, values that are not tensors."""
    if data.draw(st.integers(0, 3), label="bytes?") == 0:
        return mutate_bytes(data, path)
    state = dict(torch.load(path, weights_only=True))
    if data.draw(st.booleans(), label="checkpoint?"):
        state = {data.draw(st.sampled_from(["state_dict", "model", "net", "optimizer"])): state, "epoch": 3}
    torch.save(mutate_tree(data, state, PACKAGE_VALUES), path)


def load_weights(path: Path, _: Assets) -> Any:
    from incremental.importing import fit_state_dict, instantiate, read_state_dict, resolve_module_class

    model = instantiate(resolve_module_class(USER_MODEL), USER_MODEL_KWARGS, USER_MODEL)
    return fit_state_dict(read_state_dict(path), model.state_dict(), str(path), USER_MODEL)


def run_package_weights(path: Path, out: Path, a: Assets) -> list[str]:
    return package_argv(path, a.classes, out)


def seed_classes(folder: Path, a: Assets) -> Path:
    return Path(shutil.copy(a.classes, folder / "classes.txt"))


def mutate_classes(data: Any, path: Path) -> None:
    kind = data.draw(st.sampled_from(["bytes", "lines", "json"]), label="classes edit")
    if kind == "bytes":
        return mutate_bytes(data, path)
    if kind == "lines":
        lines = path.read_text().splitlines()
        lines[data.draw(st.integers(0, len(lines) - 1))] = data.draw(st.one_of(st.text(max_size=8),
                                                                           st.sampled_from(["cat", "", " dog "])))
        path.write_text("\n".join(lines))
        return
    doc = mutate_tree(data, [{"id": i + 1, "name": n} for i, n in enumerate(["cat", "dog", "bird"])])
    json_path = path.with_suffix(".json")
    json_path.write_text(json.dumps(doc))
    path.write_bytes(json_path.read_bytes())  # the case's input stays the one seeded path
    json_path.unlink()


def load_classes(path: Path, _: Assets) -> Any:
    from incremental.importing import read_class_names

    names, _ = read_class_names(path)
    return names


def run_package_classes(path: Path, out: Path, a: Assets) -> list[str]:
    return package_argv(a.weights, path, out)


# ============================================================================ class-incremental scenario config
def seed_scenario_config(folder: Path, a: Assets) -> Path:
    root = seed_idx(folder, a)
    path = folder / "scenario.yaml"
    path.write_text(IDX_CONFIG.replace("n_experiences: 2}", f"n_experiences: 2, root: {json.dumps(str(root))},"
                                       " class_order: [0, 1, 2, 3, 4, 5, 6, 7, 8, 9], test_fraction: 0.25}"))
    return path


def load_scenario_config(path: Path, _: Assets) -> Any:
    """The config and then the scenario it names: sources read, class order resolved, experiences cut."""
    from incremental.cli import prepare_run
    from incremental.scenarios.class_incremental import build_benchmark

    _, cfg, _ = prepare_run(str(path), [])
    if getattr(cfg, "scenario", None) is not None and hasattr(cfg, "data") and cfg.scenario.name != "split_digits":
        return build_benchmark(cfg.scenario, cfg.data, cfg.seed)
    return cfg


# ============================================================================ incremental predict
def run_predict_images(path: Path, out: Path, a: Assets) -> list[str]:
    return ["predict", "--model", str(a.classifier), "--images", str(path), "--out", str(out), "--quiet"]


def run_predict_model(path: Path, out: Path, a: Assets) -> list[str]:
    return ["predict", "--model", str(path), "--images", str(a.npz), "--out", str(out), "--quiet"]


def load_predict_images(path: Path, a: Assets) -> Any:
    from incremental.commands.predict import _npz_x
    from incremental.package import load_model
    from incremental.preprocessing import Preprocessing, image_files

    prep = Preprocessing.of_package(load_model(a.classifier))
    if path.is_file():
        return prep.load_array(_npz_x(path), str(path))
    return prep.load_files(image_files(path))


# ============================================================================ the table
BOUNDARIES: list[Boundary] = [
    Boundary("config_file", seed_config, mutate_config, load_config, run_config, cli_when_loaded=False),
    Boundary("config_set", seed_overrides, mutate_overrides, load_overrides, run_overrides, cli_when_loaded=False),
    Boundary("npz", seed_npz, mutate_npz, load_classifier_data, run_classifier_update),
    Boundary("image_folder", seed_image_folder, mutate_image_folder, load_classifier_data, run_classifier_update),
    Boundary("coco_instances", seed_instances, mutate_json_file, load_instances, run_detector_update,
             cli_when_loaded=False),
    Boundary("coco_results", seed_results, mutate_json_file, load_results, run_feedback_results),
    Boundary("coco_verified", seed_verified, mutate_json_file, load_verified, run_feedback_verified),
    Boundary("coco_panoptic", seed_panoptic, mutate_panoptic, load_panoptic, run_panoptic_update,
             cli_when_loaded=False, slow_examples=1000),
    Boundary("model_package", seed_package, mutate_package, load_package, run_package_update),
    Boundary("idx", seed_idx, mutate_idx, load_idx_pair, run_idx, cli_when_loaded=False, slow_examples=1000),
    Boundary("package_weights", seed_weights, mutate_weights, load_weights, run_package_weights),
    Boundary("package_classes", seed_classes, mutate_classes, load_classes, run_package_classes),
    Boundary("scenario_config", seed_scenario_config, mutate_config, load_scenario_config, run_config,
             cli_when_loaded=False, slow_examples=1000),
    Boundary("predict_npz", seed_npz, mutate_npz, load_predict_images, run_predict_images),
    Boundary("predict_images", seed_image_folder, mutate_image_folder, load_predict_images, run_predict_images),
    Boundary("predict_model", seed_package, mutate_package, load_package, run_predict_model),
]
