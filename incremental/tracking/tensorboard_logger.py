"""TensorBoard event files in ``DIR/tb/`` (``tensorboard --logdir DIR/tb``; extra ``tensorboard``).

- every iteration: the loss, loss terms and loss weights (Avalanche's ``Loss_MB/train_phase/train_stream``);
- every epoch: ``Loss_Epoch``, ``Time_Epoch``, the epoch mean of every plugin statistic;
- every experience: a histogram of the gradient-mixing similarity over its iterations (TensorBoard's
  Histograms / Distributions tabs show it drift from experience to experience);
- every experience: Avalanche's eval metrics (``Top1_Acc_Stream/eval_phase/test_stream``, per-experience
  accuracy, loss, forgetting, BWT) and the accuracy matrix as an image.

Why not ``torch.utils.tensorboard.SummaryWriter``: it hands every event to a writer thread through a
queue, and on a loop as fast as the quickstart's the thread hand-offs (GIL switches) cost more than
the training: +44% of train time, measured, against a few percent here. This writer builds the same
events (scalar events encoded directly, see :class:`ScalarEvents`; images as PNG, see :func:`png_bytes`),
frames them as TFRecords and appends them
in one write per flush, in the calling thread. All scalars of one step go into one event (one
``add_scalar`` each costs 6x more). The records' CRC32C checksums come from the ``crc32c`` package when it
is installed (see :func:`_checksum`).
"""
from __future__ import annotations

import os
import socket
import struct
import time
import zlib
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from .images import matrix_image
from .tracker import IterationLog, Logger


def _checksum() -> Callable[[bytes], int]:
    """TFRecord's masked CRC32C: the ``crc32c`` package (C, installed by the ``tensorboard`` extra) when
    present, else tensorboard's own pure-Python loop (about 0.2 us per byte: with it, TensorBoard
    logging costs the quickstart about 5% more train time; with ``crc32c`` it is negligible)."""
    try:
        from crc32c import crc32c
    except ImportError:
        from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c

        return masked_crc32c

    def masked(data: bytes) -> int:
        crc = crc32c(data)
        return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF

    return masked


def tfrecords(payloads: Sequence[bytes], checksum: Callable[[bytes], int]) -> bytes:
    """Frame payloads as TFRecords: length (u64), masked CRC of the length, payload, masked CRC of the payload."""
    parts = []
    for payload in payloads:
        header = struct.pack("<Q", len(payload))
        parts += [header, struct.pack("<I", checksum(header)), payload, struct.pack("<I", checksum(payload))]
    return b"".join(parts)


_FLOAT, _DOUBLE = struct.Struct("<f"), struct.Struct("<d")


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def png_bytes(rgb: np.ndarray) -> bytes:
    """An (H, W, 3) uint8 array as a PNG file (8-bit RGB, no filtering, fast zlib level): a few small
    images per run do not need PIL's slower default compression."""
    height, width, _ = rgb.shape
    raw = np.concatenate([np.zeros((height, 1), np.uint8), np.ascontiguousarray(rgb, np.uint8).reshape(height, -1)], 1)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw.tobytes(), 1))
            + chunk(b"IEND", b""))


class ScalarEvents:
    """Serialized scalar events, written directly in protobuf's wire format.

    ``Event{wall_time: 1 (double), step: 2 (varint, omitted when 0), summary: 5 {value: 1 {tag: 1,
    simple_value: 2 (float)}...}}`` (tensorboard's event.proto and summary.proto, proto3). The bytes equal
    ``Event(...).SerializeToString()`` (tested); building them from cached per-tag prefixes costs a
    fraction of building protobuf objects, which matters at one event per training iteration.
    """

    def __init__(self) -> None:
        self._prefix: dict[str, bytes] = {}

    def _value_prefix(self, tag: str) -> bytes:
        prefix = self._prefix.get(tag)
        if prefix is None:
            name = tag.encode()
            body = b"\x0a" + _varint(len(name)) + name + b"\x15"
            prefix = self._prefix[tag] = b"\x0a" + _varint(len(body) + 4) + body
        return prefix

    def encode(self, values: Mapping[str, float], step: int, wall_time: float) -> bytes | None:
        return self.encode_row(list(values), list(values.values()), step, wall_time)

    def encode_row(self, tags: Sequence[str], values: Sequence[float], step: int, wall_time: float) -> bytes | None:
        """One event of ``tags[i] = values[i]`` (NaN values left out)."""
        prefix = self._value_prefix
        summary = b"".join([prefix(t) + _FLOAT.pack(v) for t, v in zip(tags, values) if v == v])
        if not summary:
            return None
        head = b"\x09" + _DOUBLE.pack(wall_time) + (b"\x10" + _varint(int(step)) if step else b"")
        return head + b"\x2a" + _varint(len(summary)) + summary


class EventFile:
    """An append-only TensorBoard event file; ``purge_step`` marks a restart (TensorBoard then drops the
    killed run's events from that step on, as ``SummaryWriter(purge_step=...)`` does)."""

    def __init__(self, log_dir: str | Path, purge_step: int | None = None) -> None:
        from tensorboard.compat.proto.event_pb2 import Event, SessionLog
        from tensorboard.compat.proto.summary_pb2 import Summary

        self.Event, self.Summary = Event, Summary
        log_dir = Path(log_dir)
        log_dir.mkdir(parents=True, exist_ok=True)
        name = f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}.0"
        self.path = log_dir / name
        self._file = open(self.path, "ab")
        self._checksum = _checksum()
        self._scalars = ScalarEvents()
        self._pending = [Event(wall_time=time.time(), file_version="brain.Event:2").SerializeToString()]
        if purge_step is not None:
            self._pending.append(Event(wall_time=time.time(), step=int(purge_step),
                                       session_log=SessionLog(status=SessionLog.START)).SerializeToString())
        self.flush()

    def histogram(self, tag: str, values: np.ndarray, step: int, bins: int = 30) -> None:
        """A histogram event (TensorBoard's Histograms and Distributions tabs) of ``values``."""
        from tensorboard.compat.proto.summary_pb2 import HistogramProto

        lo, hi = float(values.min()), float(values.max())
        if hi <= lo:
            lo, hi = lo - 0.5, hi + 0.5
        index = np.minimum(((values - lo) * (bins / (hi - lo))).astype(np.int64), bins - 1)
        counts = np.bincount(index, minlength=bins)
        proto = HistogramProto(min=float(values.min()), max=float(values.max()), num=float(values.size),
                               sum=float(values.sum()), sum_squares=float(values @ values),
                               bucket_limit=(lo + (hi - lo) * np.arange(1, bins + 1) / bins).tolist(),
                               bucket=counts.astype(np.float64).tolist())
        self.add(self.Summary(value=[self.Summary.Value(tag=tag, histo=proto)]), step)

    def image(self, tag: str, rgb: np.ndarray, step: int) -> None:
        """An (H, W, 3) uint8 image event, PNG-encoded by :func:`png_bytes`."""
        height, width, _ = rgb.shape
        image = self.Summary.Image(height=height, width=width, colorspace=3, encoded_image_string=png_bytes(rgb))
        self.add(self.Summary(value=[self.Summary.Value(tag=tag, image=image)]), step)

    def add(self, summary: Any, step: int, wall_time: float | None = None) -> None:
        event = self.Event(wall_time=wall_time or time.time(), step=int(step), summary=summary)
        self._pending.append(event.SerializeToString())

    def scalars(self, values: Mapping[str, float], step: int, wall_time: float | None = None) -> None:
        event = self._scalars.encode(values, step, wall_time or time.time())
        if event is not None:
            self._pending.append(event)

    def scalar_rows(self, tags: Sequence[str], columns: Sequence[Sequence[float]], steps: Sequence[int]) -> None:
        """One event per step of a block of rows (``columns[i][row]`` is tag i's value at ``steps[row]``)."""
        now, encode, pending = time.time(), self._scalars.encode_row, self._pending
        for step, values in zip(steps, zip(*columns)):
            event = encode(tags, values, step, now)
            if event is not None:
                pending.append(event)

    def flush(self) -> None:
        if self._pending:
            self._file.write(tfrecords(self._pending, self._checksum))
            self._file.flush()
        self._pending = []

    def close(self) -> None:
        self.flush()
        self._file.close()


class TensorBoardLogger(Logger):
    """``purge_step``: on resume, the first iteration the resumed run logs again."""

    def __init__(self, log_dir: str | Path, purge_step: int | None = None, n_experiences: int | None = None) -> None:
        self.events = EventFile(log_dir, purge_step)
        self.n_experiences = n_experiences

    def log_iterations(self, log: IterationLog) -> None:
        keys = [k for k in log.values if k not in log.detail]
        if keys:
            self.events.scalar_rows(keys, [log.values[k] for k in keys], log.iteration)

    def log_epoch(self, iteration: int, experience: int, epoch: int, values: Mapping[str, float]) -> None:
        self.events.scalars(values, iteration)

    def log_histograms(self, iteration: int, experience: int, distributions: Mapping[str, Sequence[float]]) -> None:
        for key, data in distributions.items():
            if data:
                self.events.histogram(key, np.asarray(data, dtype=np.float64), iteration)

    def log_eval(self, iteration: int, experience: int, values: Mapping[str, float],
                 accuracy_matrix: Sequence[Sequence[float]] | None) -> None:
        self.events.scalars(values, iteration)
        if accuracy_matrix:
            self.events.image("accuracy_matrix", matrix_image(accuracy_matrix, self.n_experiences), iteration)
        self.events.flush()

    def flush(self) -> None:
        self.events.flush()

    def close(self) -> None:
        self.events.close()
