"""Metrics output: a JSON-lines file and TensorBoard event files, written
through etils.epath (local directories and gs:// alike) without TensorFlow.

Each record of `<workdir>/metrics.jsonl` is one line
`{"step": int, "split": "train"|"eval"|"fewshot", "<name>": value, ...}`.
Keys starting with 'perf/' are wall-clock measurements (not deterministic).
Only process 0 writes. On resume, records after the restored step are dropped
so the file reads as one uninterrupted run, and so are lines that are not
JSON objects (a line cut short by a kill, damage), with one warning line;
the readers below skip such lines.

TensorBoard: `<workdir>/tensorboard/<split>/events.out.tfevents.*`, a new
file per run (TensorBoard reads every file of a directory). The file is a
sequence of TFRecord-framed records (little-endian length, its masked
CRC-32C, the data, the data's masked CRC-32C; tensorboardX's
`masked_crc32c`) holding tensorboardX's `Event` protocol buffers: the file
version first, then one Event per write whose Summary has the scalars as
simple values and the arrays (e.g. per-expert loads) as histograms
(HistogramProto, 30 buckets, non-finite values left out).
"""

from __future__ import annotations

import itertools
import json
import os
import socket
import struct
import sys
import time
from typing import Any, Mapping

import numpy as np
from etils import epath
from tensorboardX import record_writer
from tensorboardX import summary as tb_summary
from tensorboardX.proto import event_pb2
from tensorboardX.proto import summary_pb2

from vmoe import workdir as workdir_lib

METRICS_NAME = 'metrics.jsonl'
HISTOGRAM_BUCKETS = 30
# Object stores rewrite a whole file to append to it: at most this often
# (and at `flush()`, which the trainer calls before each checkpoint).
REMOTE_FLUSH_SECONDS = 30.0
_file_numbers = itertools.count()


def _to_python(value: Any) -> Any:
  arr = np.asarray(value)
  if arr.ndim == 0:
    return arr.item()
  return arr.tolist()


# ---------------------------------------------------------- metrics.jsonl --


def parse_records(data: bytes) -> tuple[list[tuple[bytes, dict[str, Any]]],
                                        int]:
  """([(line, record)], number of unreadable lines) of metrics.jsonl bytes:
  records are JSON objects with an integer 'step' and a 'split'."""
  out, bad = [], 0
  for line in data.split(b'\n'):
    if not line.strip():
      continue
    try:
      record = json.loads(line.decode('utf-8'))
    except ValueError:  # UnicodeDecodeError is a ValueError too
      bad += 1
      continue
    if (not isinstance(record, dict) or not isinstance(record.get('step'), int)
        or isinstance(record.get('step'), bool)
        or not isinstance(record.get('split'), str)):
      bad += 1
      continue
    out.append((line, record))
  return out, bad


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  """The records of `<workdir>/metrics.jsonl` ([] if absent)."""
  data = workdir_lib.read_bytes(os.path.join(workdir, METRICS_NAME))
  return [r for _, r in parse_records(data or b'')[0]]


def last_record(workdir: str, split: str,
                step: int | None = None) -> dict[str, Any] | None:
  """The last record of `split` (at `step` if given), None if there is none.

  Tolerates a missing file and unreadable lines.
  """
  try:
    records = read_metrics(workdir)
  except OSError:
    return None
  found = None
  for record in records:
    if record['split'] == split and (step is None or record['step'] == step):
      found = record
  return found


# ------------------------------------------------------------ TensorBoard --


def _framed(data: bytes) -> bytes:
  """One TFRecord: length, masked CRC-32C of the length, data, masked
  CRC-32C of the data (little-endian)."""
  header = struct.pack('<Q', len(data))
  return (header + struct.pack('<I', record_writer.masked_crc32c(header))
          + data + struct.pack('<I', record_writer.masked_crc32c(data)))


def summary_of(metrics: Mapping[str, Any]) -> summary_pb2.Summary:
  """Scalars as simple values, arrays as histograms of their finite values."""
  values = []
  for name, value in metrics.items():
    arr = np.asarray(value, np.float64)
    if arr.ndim == 0:
      values.append(summary_pb2.Summary.Value(tag=name,
                                              simple_value=float(arr)))
      continue
    finite = arr[np.isfinite(arr)]
    if finite.size:
      values.append(summary_pb2.Summary.Value(
          tag=name, histo=tb_summary.make_histogram(finite,
                                                    HISTOGRAM_BUCKETS)))
  return summary_pb2.Summary(value=values)


class EventFile:
  """One TensorBoard event file in `directory` (local or gs://)."""

  def __init__(self, directory: str):
    epath.Path(directory).mkdir(parents=True, exist_ok=True)
    name = (f'events.out.tfevents.{int(time.time()):010d}.'
            f'{socket.gethostname()}.{os.getpid()}.{next(_file_numbers)}')
    self.path = os.path.join(directory, name)
    self._file = workdir_lib.AppendFile(self.path, initial=b'')
    self._remote = workdir_lib.is_remote(directory)
    self._flushed = time.monotonic()
    self._add(event_pb2.Event(wall_time=time.time(),
                              file_version='brain.Event:2'))

  def _add(self, event: event_pb2.Event) -> None:
    due = (not self._remote
           or time.monotonic() - self._flushed > REMOTE_FLUSH_SECONDS)
    self._file.write(_framed(event.SerializeToString()), flush=due)
    if due:
      self._flushed = time.monotonic()

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    self._add(event_pb2.Event(wall_time=time.time(), step=int(step),
                              summary=summary_of(metrics)))

  def flush(self) -> None:
    self._file.flush()
    self._flushed = time.monotonic()

  def close(self) -> None:
    try:
      self.flush()
    finally:
      self._file.close()


# ----------------------------------------------------------------- writer --


class MetricWriter:
  """Appends records to metrics.jsonl and TensorBoard (process 0 only)."""

  def __init__(self, workdir: str, *, enabled: bool = True,
               resume_step: int = 0):
    self.enabled = enabled
    self.path = os.path.join(workdir, METRICS_NAME)
    self._tb: dict[str, EventFile] = {}
    self._tb_dir = os.path.join(workdir, 'tensorboard')
    self._file = None
    self._remote = workdir_lib.is_remote(workdir)
    self._flushed = time.monotonic()
    if enabled:
      self._file = workdir_lib.AppendFile(self.path,
                                          self._kept_after(resume_step))

  def _kept_after(self, step: int) -> bytes | None:
    """The file's content up to `step` (None: unchanged, or absent)."""
    data = workdir_lib.read_bytes(self.path)
    if data is None:
      return None
    records, bad = parse_records(data)
    if bad:
      print(f'warning: dropped {bad} unreadable line{"s" * (bad > 1)} of '
            f'{self.path} (not JSON objects with a step and a split)',
            file=sys.stderr, flush=True)
    kept = [line + b'\n' for line, r in records if r['step'] <= step]
    if not bad and len(kept) == len(records) and data.endswith(b'\n'):
      return None
    return b''.join(kept)

  def write(self, step: int, split: str, metrics: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    record = {'step': int(step), 'split': split}
    record.update({k: _to_python(v) for k, v in sorted(metrics.items())})
    due = (not self._remote
           or time.monotonic() - self._flushed > REMOTE_FLUSH_SECONDS)
    self._file.write((json.dumps(record) + '\n').encode(), flush=due)
    if due:
      self._flushed = time.monotonic()
    if split not in self._tb:
      self._tb[split] = EventFile(os.path.join(self._tb_dir, split))
    self._tb[split].write(step, metrics)

  def flush(self) -> None:
    if self._file is not None:
      self._file.flush()
      self._flushed = time.monotonic()
    for w in self._tb.values():
      w.flush()

  def close(self) -> None:
    try:
      if self._file is not None:
        self._file.flush()
        self._file.close()
    finally:
      self._file = None
      for w in self._tb.values():
        w.close()
      self._tb.clear()
