"""Data sources: each loads a tiny fixture written here; each bad input is one error naming the path."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from incremental.datasets import DataError
from incremental.sources import (
    ArraySource, decode_image, images_from_array, load_idx, load_image_folder, load_npz, load_torchvision, read_idx,
)
from tests.data_fixtures import class_images, write_idx, write_idx_folder, write_image_folder


@pytest.mark.parametrize("compress", [True, False])
def test_idx_files_load_gzip_or_not(tmp_path, compress):
    root = write_idx_folder(tmp_path / "idx", n_per_class=5, n_classes=4, compress=compress)
    train = load_idx(root, "train")
    x, y = class_images(5, 4, seed=0)
    assert train.x.shape == (20, 1, 8, 8) and train.x.dtype == torch.uint8
    assert torch.equal(train.x[:, 0], torch.from_numpy(x)) and train.targets.tolist() == y.tolist()
    assert train.class_names == ["0", "1", "2", "3"]
    assert len(load_idx(root, "test")) == 20


def test_idx_float_data_and_header_checks(tmp_path):
    path = write_idx(tmp_path / "f-idx", np.arange(6, dtype=np.float32).reshape(2, 3), compress=False)
    assert read_idx(path).tolist() == [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x01\x02\x08\x01" + (3).to_bytes(4, "big") + b"abc")
    with pytest.raises(DataError, match="bad: not an IDX file"):
        read_idx(bad)
    short = tmp_path / "short"
    short.write_bytes(bytes([0, 0, 8, 1]) + (5).to_bytes(4, "big") + b"ab")
    with pytest.raises(DataError, match=r"short: IDX header promises \[5\]"):
        read_idx(short)
    with pytest.raises(DataError, match="no train-images-idx3-ubyte"):
        load_idx(tmp_path, "train")


def test_npz_with_and_without_class_names(tmp_path):
    x, y = class_images(3, 2)
    np.savez(tmp_path / "a.npz", x=x, y=y, class_names=np.array(["no", "yes"]))
    np.savez(tmp_path / "b.npz", x=x.reshape(6, -1).astype(np.float32) / 255, y=y)
    a, b = load_npz(tmp_path / "a.npz"), load_npz(tmp_path / "b.npz")
    assert a.x.shape == (6, 1, 8, 8) and a.class_names == ["no", "yes"] and a.is_image
    assert b.x.shape == (6, 64) and b.x.dtype == torch.float32 and b.class_names == ["0", "1"] and not b.is_image


def test_npz_bad_inputs_name_the_file_and_the_value(tmp_path):
    x, y = class_images(2, 2)
    np.savez(tmp_path / "outside.npz", x=x, y=np.array([0, 1, 2, 0]), class_names=np.array(["a", "b"]))
    with pytest.raises(DataError, match=r"outside.npz: y holds index 2, outside class_names"):
        load_npz(tmp_path / "outside.npz")
    nan = x.astype(np.float32)
    nan[3, 1, 1] = np.nan
    np.savez(tmp_path / "nan.npz", x=nan, y=y)
    with pytest.raises(DataError, match="nan.npz: sample 3 holds NaN"):
        load_npz(tmp_path / "nan.npz")
    np.savez(tmp_path / "noy.npz", x=x)
    with pytest.raises(DataError, match="noy.npz: missing array 'y'"):
        load_npz(tmp_path / "noy.npz")


def test_channels_last_arrays_become_channels_first():
    assert images_from_array(np.zeros((2, 5, 6, 3), np.uint8), "a").shape == (2, 3, 5, 6)
    assert images_from_array(np.zeros((2, 3, 5, 6), np.uint8), "a").shape == (2, 3, 5, 6)
    with pytest.raises(DataError, match="a: x must hold numbers"):
        images_from_array(np.array([["x"]]), "a")


def test_array_source_refuses_labels_outside_its_classes():
    with pytest.raises(DataError, match="src: label 3 is outside the declared classes 0..1"):
        ArraySource(torch.zeros(2, 4), torch.tensor([0, 3]), ["a", "b"], "src")


def test_image_folder_is_listed_not_decoded_and_decodes_per_sample(tmp_path):
    root = write_image_folder(tmp_path / "imgs", n_per_class=4, n_classes=3)
    source = load_image_folder(root)
    assert source.class_names == ["cat", "dog", "fox"] and len(source) == 12 and source.channels == 1
    x, label = source[5]
    assert x.shape == (1, 8, 8) and x.dtype == torch.uint8 and label == 1
    rgb = load_image_folder(root, channels=3, size=(4, 6))
    assert rgb[0][0].shape == (3, 4, 6)


def test_image_folder_errors(tmp_path):
    with pytest.raises(DataError, match="missing: image folder does not exist"):
        load_image_folder(tmp_path / "missing")
    root = write_image_folder(tmp_path / "imgs", n_per_class=2, n_classes=2)
    (root / "emu").mkdir()
    with pytest.raises(DataError, match="emu: class folder holds no image"):
        load_image_folder(root)
    shutil.rmtree(root / "emu")
    (root / "cat" / "broken.png").write_bytes(b"not a png at all")
    with pytest.raises(DataError, match="broken.png: cannot be read as an image"):
        load_image_folder(root)
    (root / "cat" / "broken.png").unlink()
    from PIL import Image

    Image.fromarray(np.zeros((9, 8), np.uint8), mode="L").save(root / "dog" / "zz_big.png")
    source = load_image_folder(root)
    with pytest.raises(DataError, match=r"zz_big.png: image is 8x9, the data set's images are 8x8"):
        source[len(source) - 1]
    with pytest.raises(DataError, match="is not one of the training classes"):
        load_image_folder(root, class_names=["cat"])


def test_decode_errors_name_the_file(tmp_path):
    path = tmp_path / "x.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(DataError, match="x.png: cannot be read as an image"):
        decode_image(str(path), 1, (8, 8), False)


def test_torchvision_source_reads_a_local_copy_and_names_the_root_when_missing(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    write_idx_folder(raw, n_per_class=3, n_classes=10, compress=False)
    source = load_torchvision("MNIST", tmp_path, "train", download=False)
    assert source.x.shape == (30, 1, 8, 8) and source.class_names[0].startswith("0")
    with pytest.raises(DataError, match=r"FashionMNIST not found under .*scenario.download: true"):
        load_torchvision("FashionMNIST", tmp_path, "train", download=False)
    with pytest.raises(DataError, match="unknown torchvision data set 'ImageNet'"):
        load_torchvision("ImageNet", tmp_path, "train", download=False)
