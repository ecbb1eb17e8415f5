"""SynthFaces generator, UTKFace and CSV loaders, task specs."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from incremental.multitask.loaders import load_csv_multitask, load_utkface, parse_utkface_name, split_samples
from incremental.multitask.synthfaces import (
    SYNTHFACES_TASKS,
    TASK_NAMES,
    attractiveness_score,
    drop_labels,
    image_quality,
    make_synthfaces,
    synthfaces_tasks,
)
from incremental.multitask.tasks import TaskSpec, fit_output_scaling, fully_labelled, label_present


@pytest.fixture(scope="module")
def faces():
    return make_synthfaces(64, 0)


def test_synthfaces_shapes_and_ranges(faces):
    assert faces.x.shape == (64, 3, 64, 64) and faces.x.dtype == torch.float32
    assert 0.0 <= float(faces.x.min()) and float(faces.x.max()) <= 1.0
    assert set(faces.y) == set(TASK_NAMES) and len(TASK_NAMES) == 9
    assert faces.y["landmarks"].shape == (64, 10) and faces.y["pose"].shape == (64, 3)
    for name in ("smile", "gender", "mask", "glasses"):
        assert set(faces.y[name].unique().tolist()) <= {0.0, 1.0}
    assert float(faces.y["age"].min()) >= 10 and float(faces.y["age"].max()) <= 80
    assert 1.0 <= float(faces.y["attractiveness"].min()) and float(faces.y["attractiveness"].max()) <= 10.0
    assert 0.0 <= float(faces.y["quality"].min()) and float(faces.y["quality"].max()) <= 1.0
    # landmarks inside the image; the eyes (points 0 and 1) left of / right of each other
    assert float(faces.y["landmarks"].min()) > 0 and float(faces.y["landmarks"].max()) < 64


def test_synthfaces_deterministic_and_seed_dependent(faces):
    again = make_synthfaces(64, 0)
    assert torch.equal(again.x, faces.x)
    assert all(torch.equal(again.y[k], faces.y[k]) for k in faces.y)
    assert not torch.equal(make_synthfaces(64, 1).x, faces.x)


def test_loss_scales_differ_by_orders_of_magnitude(faces):
    # the variance of a label is the MSE of predicting its mean: pose (degrees^2) vs quality ([0,1]^2)
    pose_var = float(faces.y["pose"].var(dim=0).mean())
    quality_var = float(faces.y["quality"].var())
    assert pose_var / quality_var > 1000


def test_attractiveness_and_quality_are_fixed_functions():
    # smiling 27-year-old, proportion 1.27, eye size 1.2, no glasses:
    # 2.8 + 2.2*1 + 2.0*exp(0) + 1.5*1 + 1.2*1 - 0 = 9.7
    attrs = {"age": np.array([27.0]), "aspect": np.array([1.27]), "eye_size": np.array([1.2]),
             "smile": np.array([1.0]), "glasses": np.array([0.0])}
    assert attractiveness_score(attrs)[0] == pytest.approx(9.7)
    # half the maximum blur, no noise: 1 - 0.5*0.5 - 0 = 0.75
    assert image_quality({"blur": np.array([0.8]), "noise": np.array([0.0])})[0] == pytest.approx(0.75)


def test_missing_fraction_is_exact_and_uses_the_task_marker():
    s = make_synthfaces(40, 3, missing_fraction={"age": 0.5, "pose": 0.25})
    assert int((s.y["age"] == -1).sum()) == 20
    pose_missing = (s.y["pose"] == -999).all(dim=1)
    assert int(pose_missing.sum()) == 10  # pose marker is -999: -1 degree is a real pose
    assert int((~label_present(s.y["landmarks"], -1.0)).sum()) == 0
    with pytest.raises(ValueError, match="unknown tasks"):
        make_synthfaces(4, 0, markers={"hair": -5})


def test_same_images_whatever_the_missing_fraction():
    full, partial = make_synthfaces(16, 5), make_synthfaces(16, 5, missing_fraction=0.5)
    assert torch.equal(full.x, partial.x)


def test_drop_labels_rejects_bad_fraction():
    with pytest.raises(ValueError, match="task 'a'"):
        drop_labels({"a": torch.zeros(4)}, 1.5, {"a": -1}, np.random.default_rng(0))


def test_markers_override_in_specs():
    specs = {t.name: t for t in synthfaces_tasks({"age": -5.0})}
    assert specs["age"].marker == -5.0 and specs["pose"].marker == -999.0
    assert [t.name for t in SYNTHFACES_TASKS] == list(TASK_NAMES)


def test_label_present_any_marker_value_means_missing():
    # a half-annotated landmark row (one coordinate -1) is missing; nan markers match nan
    pts = torch.tensor([[1.0, 2.0, 3.0, 4.0], [1.0, -1.0, 3.0, 4.0], [-1.0, -1.0, -1.0, -1.0]])
    assert label_present(pts, -1.0).tolist() == [True, False, False]
    assert label_present(torch.tensor([0.5, float("nan")]), float("nan")).tolist() == [True, False]


def test_fully_labelled_and_output_scaling():
    specs = [TaskSpec("a", "regression"), TaskSpec("b", "binary")]
    y = {"a": torch.tensor([2.0, -1.0, 4.0, 6.0]), "b": torch.tensor([1.0, 0.0, -1.0, 0.0])}
    assert fully_labelled(y, specs).tolist() == [True, False, False, True]
    scaled = fit_output_scaling(specs, y)
    # labelled a values 2, 4, 6: mean 4, sample std 2; the binary spec is untouched
    assert scaled[0].offset == (4.0,) and scaled[0].scale == pytest.approx((2.0,))
    assert scaled[1].offset == ()


def test_task_spec_validation_names_the_task():
    with pytest.raises(ValueError, match="task 'x': points need an even dim"):
        TaskSpec("x", "points", dim=3)
    with pytest.raises(ValueError, match="task 'y': kind must be one of"):
        TaskSpec("y", "ranking")


# ------------------------------------------------------------------ UTKFace
def _write_jpg(path, color=(200, 100, 50)):
    from PIL import Image

    Image.new("RGB", (24, 20), color).save(path)


def test_parse_utkface_names():
    assert parse_utkface_name("26_1_2_20170116174525125.jpg.chip.jpg") == ({"age": 26, "gender": 1, "race": 2}, "")
    assert parse_utkface_name("3_0_4_20161219140623097.jpg")[0] == {"age": 3, "gender": 0, "race": 4}
    for bad in ("39_1_20170116174525125.jpg.chip.jpg", "26_3_2_2017.jpg.chip.jpg", "26_1_7_2017.jpg.chip.jpg",
                "readme.txt", "a_1_2_3.jpg.chip.jpg"):
        labels, why = parse_utkface_name(bad)
        assert labels is None and bad in why


def test_load_utkface_skips_and_counts_bad_files(tmp_path):
    _write_jpg(tmp_path / "26_1_2_20170116174525125.jpg.chip.jpg", (255, 0, 0))
    _write_jpg(tmp_path / "70_0_0_20170116174525126.jpg.chip.jpg")
    _write_jpg(tmp_path / "39_1_20170116174525125.jpg.chip.jpg")  # the real data set has such names
    (tmp_path / "5_0_1_20170116174525127.jpg.chip.jpg").write_bytes(b"not a jpeg")
    samples, report = load_utkface(tmp_path, image_size=32)
    assert len(samples) == 2 and samples.x.shape == (2, 3, 32, 32)
    assert report.found == 4 and report.loaded == 2 and report.skipped == 2
    assert any("39_1_2017" in r for r in report.reasons) and any("unreadable" in r for r in report.reasons)
    assert samples.y["age"].tolist() == [26.0, 70.0] and samples.y["race"].dtype == torch.long
    assert samples.x[0, 0].mean() > 0.95 and samples.x[0, 1].mean() < 0.05  # red image, resized
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_utkface(tmp_path / "nope")


# ------------------------------------------------------------------ CSV
CSV_TASKS = [TaskSpec("age", "regression", loss="l1"), TaskSpec("smile", "binary"),
             TaskSpec("pts", "points", dim=4), TaskSpec("kind", "multiclass", dim=3)]


def test_csv_loader_missing_cells_and_bad_rows(tmp_path):
    for i in range(4):
        _write_jpg(tmp_path / f"img{i}.jpg")
    (tmp_path / "labels.csv").write_text(
        "path,age,smile,pts,kind\n"
        "img0.jpg,30,1,1 2 3 4,2\n"
        "img1.jpg,,-1,-1 -1 -1 -1,\n"      # everything missing but the image: kept, all markers
        "img2.jpg,40,yes,1 2 3 4,0\n"       # bad binary cell: skipped
        "img3.jpg,50,0,1;2;3,1\n"           # 3 values for 4: skipped
        "missing.jpg,20,0,1 2 3 4,1\n"      # no image: skipped
    )
    samples, report = load_csv_multitask(tmp_path / "labels.csv", CSV_TASKS, image_size=32)
    assert len(samples) == 2 and report.skipped == 3
    assert report.reasons[0].startswith("labels.csv line 4: column 'smile'")
    assert samples.y["age"].tolist() == [30.0, -1.0]
    assert samples.y["pts"][1].tolist() == [-1.0] * 4 and samples.y["kind"].tolist() == [2, -1]


def test_csv_loader_missing_column_is_an_error(tmp_path):
    (tmp_path / "l.csv").write_text("path,age\nimg0.jpg,3\n")
    with pytest.raises(ValueError, match="no column 'smile'"):
        load_csv_multitask(tmp_path / "l.csv", CSV_TASKS[:2])


def test_split_samples_is_seeded(faces):
    a_train, a_test = split_samples(faces, 0.25, seed=1)
    b_train, b_test = split_samples(faces, 0.25, seed=1)
    assert len(a_test) == 16 and len(a_train) == 48 and torch.equal(a_test.x, b_test.x)
    assert not math.isclose(float(split_samples(faces, 0.25, seed=2)[1].x.sum()), float(a_test.x.sum()))
