"""Experiment tracking: Avalanche metric names and values, the Tracker's bulk transfer, CSV rows against
the loop's iterations, TensorBoard files read back with tensorboard's reader, W&B offline, and the
one-line error for a logger whose extra is not installed."""
from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from incremental.cli import main
from incremental.config import ConfigError
from incremental.models import MLP
from incremental.plugins import Plugin
from incremental.tracking import LoggingConfig, Tracker, build_loggers, build_tracker, eval_metrics
from incremental.tracking import config as tracking_config
from incremental.tracking import names
from incremental.tracking.csv_logger import CSVLogger
from incremental.tracking.images import matrix_image
from incremental.trainer import Trainer
from tests.tracking_helpers import read_csv

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--set", "train.epochs=2", "--set", "scenario.n_experiences=3", "--set", "model.hidden_size=32", "--quiet"]


# ---------------------------------------------------------------------------------------------- names
def test_metric_names_are_avalanches():
    assert names.exp_metric("Top1_Acc_Exp", 3) == "Top1_Acc_Exp/eval_phase/test_stream/Exp003"
    assert names.ACC_STREAM == "Top1_Acc_Stream/eval_phase/test_stream"
    assert names.LOSS_MB == "Loss_MB/train_phase/train_stream"


def test_eval_metrics_hand_computed():
    # after step 1 of 3: R = [[0.9, 0.0, 0.0], [0.6, 0.8, 0.0]]
    results = {0: {"accuracy": 0.6, "loss": 1.0, "count": 100}, 1: {"accuracy": 0.8, "loss": 0.5, "count": 300},
               2: {"accuracy": 0.0, "loss": 4.0, "count": 100}}
    R = [[0.9, 0.0, 0.0], [0.6, 0.8, 0.0]]
    m = eval_metrics(results, R)
    assert m["Top1_Acc_Exp/eval_phase/test_stream/Exp001"] == 0.8
    # stream accuracy over samples: (60 + 240 + 0) / 500
    assert m[names.ACC_STREAM] == pytest.approx(0.6)
    assert m[names.LOSS_STREAM] == pytest.approx((100 + 150 + 400) / 500)
    # forgetting of experience 0: 0.9 - 0.6; the current experience (1) and future ones are not counted
    assert m["ExperienceForgetting/eval_phase/test_stream/Exp000"] == pytest.approx(0.3)
    assert "ExperienceForgetting/eval_phase/test_stream/Exp001" not in m
    assert m[names.FORGETTING_STREAM] == pytest.approx(0.3)
    assert m[names.BWT_STREAM] == pytest.approx(-0.3)
    first = eval_metrics({0: {"accuracy": 1.0}, 1: {"accuracy": 0.0}}, [[1.0, 0.0]])
    assert first[names.ACC_STREAM] == 0.5 and first[names.FORGETTING_STREAM] == 0.0
    assert math.copysign(1.0, first[names.BWT_STREAM]) == 1.0  # no "-0.0" in the logs


# ---------------------------------------------------------------------------------------------- the tracker in the loop
class LossRecorder(Plugin):
    """Test helper: the loop's loss per iteration, read the slow way (.item())."""

    def __init__(self) -> None:
        super().__init__()
        self.losses: list[float] = []
        self.sizes: list[int] = []

    def after_training_iteration(self, strategy, **kwargs):
        self.losses.append(strategy.loss.item())
        self.sizes.append(len(strategy.mb_y))


class TermsAndWeights(Plugin):
    """Exposes loss terms on the strategy and current weights, as the loop and dynamic weighting will."""

    names = ["a", "b"]

    def __init__(self) -> None:
        super().__init__()
        self.step = 0

    def before_backward(self, strategy, **kwargs):
        strategy.loss_terms = {"ce": strategy.loss.detach(), "double": 2 * strategy.loss.detach()}
        self.step += 1

    def current_weights(self):
        return torch.tensor([1.0, float(self.step)])


def train_tiny(digits_tiny, tracker: Tracker, *extra: Plugin, epochs: int = 2) -> Trainer:
    torch.manual_seed(0)
    model = MLP(64, 16, 10)
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.05), nn.CrossEntropyLoss(),
                      train_mb_size=64, train_epochs=epochs, plugins=[*extra, tracker], seed=0)
    R = []
    for i, exp in enumerate(digits_tiny.train_stream):
        trainer.train(exp)
        results = trainer.eval(digits_tiny.test_stream)
        R.append([results[j]["accuracy"] for j in range(len(digits_tiny.test_stream))])
        tracker.log_eval(i, results, R)
    tracker.close()
    return trainer


@pytest.mark.parametrize("flush_every", [1024, 5])
def test_csv_rows_match_the_loops_iterations(tmp_path, digits_tiny, flush_every):
    recorder, terms = LossRecorder(), TermsAndWeights()
    tracker = Tracker([CSVLogger(tmp_path / "logs")], flush_every=flush_every)
    trainer = train_tiny(digits_tiny, tracker, terms, recorder)
    rows = read_csv(tmp_path / "logs" / "iterations.csv")
    assert len(rows) == trainer.clock.train_iterations == len(recorder.losses)
    assert [int(r["iteration"]) for r in rows] == list(range(len(rows)))
    assert [float(r[names.LOSS_MB]) for r in rows] == pytest.approx(recorder.losses, rel=1e-6)
    assert [float(r["loss_terms/double"]) for r in rows] == pytest.approx([2 * v for v in recorder.losses], rel=1e-6)
    assert [float(r["loss_weights/b"]) for r in rows] == list(map(float, range(1, len(rows) + 1)))
    assert {r["experience"] for r in rows} == {"0", "1", "2"} and {r["epoch"] for r in rows} == {"0", "1"}
    epochs = read_csv(tmp_path / "logs" / "epochs.csv")
    assert len(epochs) == 3 * 2
    # Loss_Epoch: mean over the epoch's samples (minibatches weighted by size), as Avalanche's
    first = [(l, n) for r, l, n in zip(rows, recorder.losses, recorder.sizes) if r["experience"] == "0" and r["epoch"] == "0"]
    expected = sum(l * n for l, n in first) / sum(n for _, n in first)
    assert float(epochs[0][names.LOSS_EPOCH]) == pytest.approx(expected, rel=1e-6)
    assert float(epochs[0][names.TIME_EPOCH]) > 0
    evals = read_csv(tmp_path / "logs" / "eval.csv")
    acc = {(r["training_exp"], r["metric"]): float(r["value"]) for r in evals}
    assert ("2", "Top1_Acc_Exp/eval_phase/test_stream/Exp000") in acc and ("2", names.BWT_STREAM) in acc


def test_tracker_brings_values_to_the_host_once_per_flush(tmp_path, digits_tiny, monkeypatch):
    """One host transfer (``tolist``) per experience, over all of that experience's iterations."""
    transfers = []
    real_tolist = torch.Tensor.tolist

    def counting_tolist(self):
        out = real_tolist(self)
        transfers.append(len(out) if isinstance(out, list) else 1)
        return out

    tracker = Tracker([CSVLogger(tmp_path / "logs")])
    monkeypatch.setattr(torch.Tensor, "tolist", counting_tolist)
    trainer = train_tiny(digits_tiny, tracker, TermsAndWeights())
    monkeypatch.undo()
    # per iteration: the loss, two loss terms, two weights
    assert len(transfers) == 3 and sum(transfers) == 5 * trainer.clock.train_iterations


def test_csv_resume_drops_rows_of_unfinished_experiences(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "iterations.csv").write_text("iteration,experience,epoch,x\n0,0,0,1.0\n1,0,0,2.0\n2,1,0,3.0\n")
    (logs / "eval.csv").write_text("training_exp,iteration,metric,value\n0,2,m,0.5\n1,3,m,0.6\n")
    logger = CSVLogger(logs, experiences_done=1)
    logger.close()
    assert [r["iteration"] for r in read_csv(logs / "iterations.csv")] == ["0", "1"]
    assert [r["training_exp"] for r in read_csv(logs / "eval.csv")] == ["0"]
    (logs / "gradient_mixing.csv").write_text("iteration,experience,epoch,similarity\n2,1,0,0.5\n")
    CSVLogger(logs, experiences_done=1).close()
    assert read_csv(logs / "gradient_mixing.csv") == []  # plugin logs are trimmed too
    CSVLogger(logs).close()  # a fresh run starts empty files
    assert (logs / "iterations.csv").read_text() == "" and not (logs / "gradient_mixing.csv").exists()


def test_csv_header_grows_when_a_column_appears(tmp_path):
    from incremental.tracking.csv_logger import GrowingCSV

    f = GrowingCSV(tmp_path / "x.csv")
    f.append(["a", "b"], [[1, 2.5]])
    f.append(["a", "c", "b"], [[2, float("nan"), 3.5], [3, 7.0, 1.0]])
    f.close()
    # floats with 9 significant digits (a float32 round-trips): 1.0 is written "1"
    assert (tmp_path / "x.csv").read_text().splitlines() == ["a,b,c", "1,2.5,", "2,3.5,", "3,1,7"]


def test_csv_floats_round_trip_float32_values(tmp_path):
    from incremental.tracking.csv_logger import GrowingCSV

    values = torch.randn(200, generator=torch.Generator().manual_seed(0)).mul(1e3).tolist()  # float32 values
    f = GrowingCSV(tmp_path / "x.csv")
    f.append(["v"], [[v] for v in values])
    f.close()
    read = [float(line) for line in (tmp_path / "x.csv").read_text().splitlines()[1:]]
    assert torch.equal(torch.tensor(read, dtype=torch.float32), torch.tensor(values, dtype=torch.float32))


# ---------------------------------------------------------------------------------------------- TensorBoard
def test_tfrecord_framing_matches_tensorboards_writer():
    pytest.importorskip("tensorboard")
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c
    from tensorboard.summary.writer.record_writer import RecordWriter

    from incremental.tracking.tensorboard_logger import _checksum, tfrecords

    rng = np.random.default_rng(0)
    payloads = [rng.integers(0, 256, size=n, dtype=np.uint8).tobytes() for n in (0, 1, 7, 60, 300)]
    buf = io.BytesIO()
    writer = RecordWriter(buf)
    for p in payloads:
        writer.write(p)
    assert tfrecords(payloads, _checksum()) == tfrecords(payloads, masked_crc32c) == buf.getvalue()


def test_tensorboard_events_read_back(tmp_path, capsys):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    code = main(["run", str(ROOT / "configs/quickstart.yaml"), "--out", str(out), *TINY,
                 "--set", "logging.tensorboard=true"])
    assert code == 0
    acc = EventAccumulator(str(out / "tb"), size_guidance={"scalars": 0, "images": 0, "histograms": 0})
    acc.Reload()
    tags = acc.Tags()
    iterations = read_csv(out / "logs" / "iterations.csv")
    loss = acc.Scalars(names.LOSS_MB)
    assert [e.step for e in loss] == [int(r["iteration"]) for r in iterations]
    assert [e.value for e in loss] == pytest.approx([float(r[names.LOSS_MB]) for r in iterations], rel=1e-6)
    import json

    results = json.loads((out / "results.json").read_text())
    stream = acc.Scalars(names.ACC_STREAM)
    assert len(stream) == 3
    final = acc.Scalars("Top1_Acc_Exp/eval_phase/test_stream/Exp001")[-1].value
    assert final == pytest.approx(results["accuracy_matrix"][-1][1], abs=1e-6)
    assert len(acc.Images("accuracy_matrix")) == 3
    # gradient mixing (the quickstart's strategy) starts mixing at experience 1: one histogram per experience
    assert "gradient_mixing/similarity" in tags["histograms"]
    histograms = acc.Histograms("gradient_mixing/similarity")
    eval_steps = sorted({int(r["iteration"]) for r in read_csv(out / "logs" / "eval.csv")})  # end of each experience
    assert [h.step for h in histograms] == eval_steps[1:]
    mixing = read_csv(out / "logs" / "gradient_mixing.csv")  # one row per iteration that mixed
    assert {r["experience"] for r in mixing} == {"1", "2"}
    assert len(mixing) == sum(r["experience"] != "0" for r in iterations)
    per_exp = [r for r in mixing if r["experience"] == "2"]
    assert histograms[-1].histogram_value.num == len(per_exp)
    assert histograms[-1].histogram_value.min == pytest.approx(min(float(r["similarity"]) for r in per_exp))
    assert "gradient_mixing/similarity" in tags["scalars"]  # epoch means


def test_tensorboard_purge_step_hides_the_killed_runs_events(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from incremental.tracking.tensorboard_logger import EventFile

    first = EventFile(tmp_path)
    for step in range(10):
        first.scalars({"x": float(step)}, step)
    first.close()
    resumed = EventFile(tmp_path, purge_step=6)  # the checkpoint was taken after 6 iterations
    for step in range(6, 12):
        resumed.scalars({"x": 100.0 + step}, step)
    resumed.close()
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    events = acc.Scalars("x")
    assert [e.step for e in events] == list(range(12))
    assert [e.value for e in events][5:7] == [5.0, 106.0]


def test_matrix_image_grey_rows_until_trained():
    img = matrix_image([[1.0, 0.0, 0.5]], n_cols=3, cell=2)
    assert img.shape == (6, 6, 3) and img.dtype == np.uint8
    assert tuple(img[0, 0]) == (253, 231, 37)  # accuracy 1: viridis yellow
    assert tuple(img[0, 2]) == (68, 1, 84)  # accuracy 0: viridis purple
    assert tuple(img[5, 5]) == (128, 128, 128)  # row not trained yet


# ---------------------------------------------------------------------------------------------- W&B, extras
def test_wandb_offline_writes_its_run_folder(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    code = main(["run", str(ROOT / "configs/quickstart.yaml"), "--out", str(out), *TINY,
                 "--set", "logging.wandb={project: tracking-test, mode: offline, log_every_n_steps: 4}"])
    assert code == 0
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    (data,) = runs[0].glob("run-*.wandb")
    assert data.stat().st_size > 0
    assert data.name == f"run-{(out / 'wandb_run_id').read_text().strip()}.wandb"


@pytest.mark.parametrize("setting, extra", [("logging.tensorboard=true", "tensorboard"),
                                            ("logging.wandb={project: p, mode: offline}", "wandb")])
def test_missing_extra_is_a_one_line_error_before_anything_is_written(tmp_path, capsys, monkeypatch, setting, extra):
    monkeypatch.setattr(tracking_config, "is_installed", lambda module: False)
    out = tmp_path / "run"
    code = main(["run", str(ROOT / "configs/quickstart.yaml"), "--out", str(out), "--set", setting])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert err.startswith(f"error: logging.{extra}") and f"pip install 'incremental-adapt[{extra}]'" in err
    assert not out.exists()
    with pytest.raises(ConfigError, match=extra):
        build_loggers(LoggingConfig(tensorboard=True, wandb=None) if extra == "tensorboard"
                      else LoggingConfig(wandb=tracking_config.WandbConfig(mode="offline")), tmp_path)


def test_logging_off_adds_no_plugin(tmp_path, digits_tiny):
    model = MLP(64, 16, 10)
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.05))
    tracker = build_tracker(LoggingConfig(csv=False), tmp_path, trainer)
    assert tracker.loggers == [] and trainer.plugins == []
    assert not (tmp_path / "logs").exists()


def test_tracker_is_an_avalanche_plugin_too(tmp_path):
    """The same Tracker inside Avalanche's own Naive strategy: one CSV row per Avalanche iteration."""
    from avalanche.training import Naive

    from tests.avalanche_helpers import avalanche_split_digits, quiet_evaluator

    bench = avalanche_split_digits(2)
    torch.manual_seed(0)
    model = MLP(64, 16, 10)
    recorder = LossRecorder()
    tracker = Tracker([CSVLogger(tmp_path / "logs")])
    strategy = Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05), train_mb_size=128,
                     train_epochs=1, plugins=[recorder, tracker], evaluator=quiet_evaluator())
    for exp in bench.train_stream:
        strategy.train(exp)
    tracker.close()
    rows = read_csv(tmp_path / "logs" / "iterations.csv")
    assert len(rows) == strategy.clock.train_iterations == len(recorder.losses)
    assert [float(r[names.LOSS_MB]) for r in rows] == pytest.approx(recorder.losses, rel=1e-6)
    assert [r["experience"] for r in rows][-1] == "1"


def test_loss_terms_are_the_training_criterions_not_a_plugins_later_forward(tmp_path, digits_tiny):
    """A plugin that runs the criterion again after the backward (gradient mixing does, on the history
    minibatch) must not change the logged terms."""

    class Named(Plugin):
        def before_backward(self, strategy, **kwargs):
            strategy.loss_terms = {"ce": strategy.loss, "zero": torch.zeros(())}

        def after_backward(self, strategy, **kwargs):
            strategy.loss_terms = {"ce": torch.full((), 123.0), "zero": torch.full((), 456.0)}

    recorder = LossRecorder()
    train_tiny(digits_tiny, Tracker([CSVLogger(tmp_path / "logs")]), Named(), recorder)
    rows = read_csv(tmp_path / "logs" / "iterations.csv")
    assert [float(r["loss_terms/ce"]) for r in rows] == pytest.approx(recorder.losses, rel=1e-6)
    assert {float(r["loss_terms/zero"]) for r in rows} == {0.0}


def test_wandb_gets_its_steps_in_order(tmp_path, digits_tiny, monkeypatch):
    """W&B drops a step lower than one already logged: the logger holds iteration rows back and sends
    them, as window means, around the epoch summaries and evaluations."""
    wandb = pytest.importorskip("wandb")
    from incremental.tracking.config import WandbConfig
    from incremental.tracking.wandb_logger import WandbLogger

    class FakeRun:
        def __init__(self):
            self.logged = []

        def log(self, payload, step):
            self.logged.append((step, dict(payload)))

        def finish(self):
            pass

    run = FakeRun()
    monkeypatch.setattr(wandb, "init", lambda **kwargs: run)
    logger = WandbLogger(WandbConfig(mode="offline", log_every_n_steps=3), tmp_path)
    trainer = train_tiny(digits_tiny, Tracker([logger], flush_every=5), LossRecorder())
    steps = [step for step, _ in run.logged]
    assert steps == sorted(steps) and steps[-1] == trainer.clock.train_iterations
    windows = [(s, p) for s, p in run.logged if names.LOSS_MB in p]
    assert sum(1 for s, _ in windows) >= trainer.clock.train_iterations // 3
    assert sum(1 for _, p in run.logged if names.LOSS_EPOCH in p) == 3 * 2
    assert sum(1 for _, p in run.logged if names.ACC_STREAM in p) == 3


def test_scalar_events_are_the_bytes_protobuf_would_write():
    pytest.importorskip("tensorboard")
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.compat.proto.summary_pb2 import Summary

    from incremental.tracking.tensorboard_logger import ScalarEvents

    enc = ScalarEvents()
    long_tag = "Top1_Acc_Exp/eval_phase/test_stream/Exp003" * 4  # a tag longer than 127 bytes
    for values, step in [({"a": 1.5}, 0), ({"Loss_MB/train_phase/train_stream": 0.25, long_tag: 0.0}, 300),
                         ({"x": float("nan"), "y": -2.0}, 2**40)]:
        expected = Event(wall_time=1234.5, step=step, summary=Summary(
            value=[Summary.Value(tag=k, simple_value=v) for k, v in values.items() if v == v])).SerializeToString()
        assert enc.encode(values, step, 1234.5) == expected
    assert enc.encode({"x": float("nan")}, 1, 1.0) is None


def test_png_bytes_decode_to_the_same_pixels():
    from PIL import Image

    from incremental.tracking.tensorboard_logger import png_bytes

    rgb = matrix_image([[0.2, 0.9], [0.5, 1.0]], cell=3)
    decoded = np.asarray(Image.open(io.BytesIO(png_bytes(rgb))).convert("RGB"))
    assert decoded.shape == rgb.shape and (decoded == rgb).all()


def test_a_run_resumes_with_other_loggers(tmp_path, capsys):
    out = tmp_path / "run"
    env_kill = {"INCREMENTAL_KILL_AFTER_EXPERIENCE": "1"}
    import os
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "incremental", "run", str(ROOT / "configs/quickstart.yaml"), "--out", str(out), *TINY]
    killed = subprocess.run(cmd, env={**os.environ, **env_kill}, capture_output=True, text=True)
    assert killed.returncode != 0 and (out / "checkpoints" / "exp_001.pt").is_file()
    code = main(["run", str(ROOT / "configs/quickstart.yaml"), "--out", str(out), *TINY, "--resume",
                 "--set", "logging.csv=false"])
    assert code == 0, capsys.readouterr().err
    # the CSV rows of the first experience (before the kill) stay; nothing was appended after it
    assert {r["experience"] for r in read_csv(out / "logs" / "iterations.csv")} == {"0"}


def test_multitask_runs_log_a_metric_per_task(tmp_path):
    """A family whose evaluation is a metric per task (not an accuracy per experience) logs named values."""
    from incremental.cli import main as cli_main

    out = tmp_path / "mt"
    code = cli_main(["run", str(ROOT / "configs/synthfaces_multitask.yaml"), "--out", str(out), "--quiet",
                     "--set", "train.epochs=1", "--set", "scenario.n_train=96", "--set", "scenario.n_test=64",
                     "--set", "scenario.image_size=32"])
    assert code == 0
    metrics = {r["metric"] for r in read_csv(out / "logs" / "eval.csv")}
    assert metrics and all(m.split("/")[1:3] == ["eval_phase", "test_stream"] for m in metrics)
    assert not any(m.startswith("Top1_Acc_Exp") for m in metrics)
    assert len(read_csv(out / "logs" / "iterations.csv")) > 0
