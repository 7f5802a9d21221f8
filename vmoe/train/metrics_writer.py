"""Metrics output: TensorBoard event files and a JSON-lines file.

Each record of `<workdir>/metrics.jsonl` is one line
`{"step": int, "split": "train"|"eval", "<name>": value, ...}`. Keys starting
with 'perf/' are wall-clock measurements (not deterministic). Only process 0
writes. On resume, records after the restored step are dropped so the file
reads as one uninterrupted run.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import numpy as np


def _to_python(value: Any) -> Any:
  arr = np.asarray(value)
  if arr.ndim == 0:
    return arr.item()
  return arr.tolist()


class MetricWriter:

  def __init__(self, workdir: str, *, enabled: bool = True,
               resume_step: int = 0):
    self.enabled = enabled
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self._tb = {}
    self._tb_dir = os.path.join(workdir, 'tensorboard')
    if enabled:
      os.makedirs(workdir, exist_ok=True)
      self._truncate_after(resume_step)

  def _truncate_after(self, step: int) -> None:
    if not os.path.exists(self.path):
      return
    with open(self.path) as f:
      lines = [l for l in f if l.strip()]
    kept = []
    for line in lines:
      try:
        if json.loads(line)['step'] <= step:
          kept.append(line)
      except (ValueError, KeyError):
        pass  # a line cut short by a kill mid-write
    tmp = self.path + '.tmp'
    with open(tmp, 'w') as f:
      f.writelines(kept)
    os.replace(tmp, self.path)

  def _tb_writer(self, split: str):
    if split not in self._tb:
      import tensorflow as tf  # pylint: disable=g-import-not-at-top
      self._tb[split] = tf.summary.create_file_writer(
          os.path.join(self._tb_dir, split))
    return self._tb[split]

  def write(self, step: int, split: str, metrics: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    record = {'step': int(step), 'split': split}
    record.update({k: _to_python(v) for k, v in sorted(metrics.items())})
    with open(self.path, 'a') as f:
      f.write(json.dumps(record) + '\n')
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    with self._tb_writer(split).as_default():
      for name, value in metrics.items():
        arr = np.asarray(value)
        if arr.ndim == 0:
          tf.summary.scalar(name, arr.item(), step=step)
        else:
          tf.summary.histogram(name, arr, step=step)

  def flush(self) -> None:
    for w in self._tb.values():
      w.flush()

  def close(self) -> None:
    for w in self._tb.values():
      w.close()
    self._tb.clear()


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  """Reads back `<workdir>/metrics.jsonl`."""
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(l) for l in f if l.strip()]


def last_record(workdir: str, split: str,
                step: int | None = None) -> dict[str, Any] | None:
  """The last record of `split` (at `step` if given), None if there is none.

  Tolerates a missing file and lines cut short by a kill.
  """
  path = os.path.join(workdir, 'metrics.jsonl')
  found = None
  try:
    with open(path) as f:
      for line in f:
        try:
          record = json.loads(line)
        except ValueError:
          continue
        if (isinstance(record, dict) and record.get('split') == split
            and (step is None or record.get('step') == step)):
          found = record
  except OSError:
    return None
  return found
