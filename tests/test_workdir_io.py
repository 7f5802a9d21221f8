"""Workdir files through etils.epath: an object store (a gs:// bucket that is
an in-memory fsspec filesystem here), TensorBoard event files read back by
TensorBoard, the workdir lock under deletion, damaged metrics.jsonl lines."""

import errno
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from etils.epath import backend as epath_backend
from etils.epath import gpath
from fsspec.implementations import memory

from tests.helpers import tiny_digits_config
from vmoe import workdir as workdir_lib
from vmoe.checkpoints import checkpointer as checkpoint_lib
from vmoe.train import metrics_writer

REPO = pathlib.Path(__file__).resolve().parents[1]


class _MemoryBucket(memory.MemoryFileSystem):
  """gs:// as a private in-memory filesystem (no network, no local file)."""
  protocol = ('gs', 'gcs')
  store: dict = {}
  pseudo_dirs = ['']

  @classmethod
  def _strip_protocol(cls, path):
    for prefix in ('gs://', 'gcs://'):
      if path.startswith(prefix):
        path = path[len(prefix):]
    return memory.MemoryFileSystem._strip_protocol(path)


@pytest.fixture
def bucket(monkeypatch, tmp_path):
  """gs:// served by `_MemoryBucket`; the current directory an empty one."""
  monkeypatch.setattr(_MemoryBucket, 'store', {})
  monkeypatch.setattr(_MemoryBucket, 'pseudo_dirs', [''])
  for name in ('gs', 'gcs'):
    monkeypatch.setitem(sys.modules['fsspec.registry']._registry, name,  # pylint: disable=protected-access
                        _MemoryBucket)
  # With TensorFlow installed epath would take tf.io.gfile for gs://.
  monkeypatch.setattr(gpath, '_is_tf_installed', lambda: False)
  epath_backend.fsspec_backend._get_filesystem.cache_clear()  # pylint: disable=protected-access
  local = tmp_path / 'cwd'
  local.mkdir()
  monkeypatch.chdir(local)
  yield _MemoryBucket
  epath_backend.fsspec_backend._get_filesystem.cache_clear()  # pylint: disable=protected-access


def test_an_object_store_workdir_creates_nothing_locally(bucket, capsys):
  workdir = 'gs://bucket/run'
  assert not workdir_lib.prepare(workdir)
  lock = workdir_lib.Lock(workdir)
  lock.acquire()
  assert 'is on an object store, which has no locks' in capsys.readouterr().err
  lock.announce()
  lock.check('saving step 2')
  assert not checkpoint_lib.has_checkpoints(f'{workdir}/checkpoints')

  config = tiny_digits_config('/nonexistent')
  workdir_lib.write_config(config, workdir)
  assert workdir_lib.read_config(workdir)['seed'] == config.seed
  writer = metrics_writer.MetricWriter(workdir)
  writer.write(2, 'train', {'loss': 2.5, 'load': np.array([1.0, 3.0])})
  writer.write(2, 'eval', {'loss': 2.0, 'accuracy': 0.25})
  writer.write(4, 'train', {'loss': 1.5, 'load': np.array([2.0, 2.0])})
  writer.close()
  # A resume at step 2 drops the later record, as on a local disk.
  metrics_writer.MetricWriter(workdir, resume_step=2).close()
  assert metrics_writer.read_metrics(workdir) == [
      {'step': 2, 'split': 'train', 'load': [1.0, 3.0], 'loss': 2.5},
      {'step': 2, 'split': 'eval', 'accuracy': 0.25, 'loss': 2.0}]
  assert metrics_writer.last_record(workdir, 'eval', step=2)['loss'] == 2.0

  names = sorted(bucket.store)
  assert '/bucket/run/config.json' in names
  assert '/bucket/run/metrics.jsonl' in names
  for split in ('train', 'eval'):
    assert any(n.startswith(f'/bucket/run/tensorboard/{split}/events.out.'
                            'tfevents.') for n in names), names
  assert os.listdir('.') == []  # no ./gs:/bucket/... either


def test_tensorboard_reads_the_event_files(tmp_path):
  event_accumulator = pytest.importorskip(
      'tensorboard.backend.event_processing.event_accumulator')
  writer = metrics_writer.MetricWriter(str(tmp_path))
  loads = np.array([0.0, 1.0, 1.0, 2.0, np.nan, np.inf])
  writer.write(3, 'train', {'loss': 1.25, 'expert_load': loads})
  writer.write(5, 'train', {'loss': 0.75, 'expert_load': loads[:4] * 2})
  writer.close()
  (directory,) = (tmp_path / 'tensorboard').iterdir()
  acc = event_accumulator.EventAccumulator(
      str(directory), size_guidance={event_accumulator.HISTOGRAMS: 0})
  acc.Reload()
  assert [(e.step, e.value) for e in acc.Scalars('loss')] == [(3, 1.25),
                                                              (5, 0.75)]
  first, second = acc.Histograms('expert_load')
  # The finite values only: 4 of them, in [0, 2] and then [0, 4].
  assert first.step == 3 and first.histogram_value.num == 4
  assert (first.histogram_value.min, first.histogram_value.max) == (0, 2)
  assert first.histogram_value.sum == 4
  assert second.histogram_value.max == 4


def test_deleting_the_lock_file_unlocks_nothing(tmp_path):
  workdir = tmp_path / 'work'
  workdir.mkdir()
  holder = workdir_lib.Lock(str(workdir))
  holder.acquire()
  holder.announce()
  try:
    (workdir / workdir_lib.LOCK_NAME).unlink()
    second = workdir_lib.Lock(str(workdir))
    with pytest.raises(workdir_lib.WorkdirError, match='is in use by another'):
      second.acquire()
    holder.check('saving step 4')
    # A workdir moved away and made anew: the run stops before its next save.
    workdir.rename(tmp_path / 'moved')
    workdir.mkdir()
    with pytest.raises(workdir_lib.WorkdirError,
                       match='the workdir was deleted or replaced .* stopped '
                       'before saving step 4$'):
      holder.check('saving step 4')
  finally:
    holder.release()


def test_lock_file_fallback_notices_a_deleted_lock_file(tmp_path,
                                                        monkeypatch):
  """Where directories cannot be flock-ed, the lock file is locked and
  checked at every save."""
  import fcntl  # pylint: disable=g-import-not-at-top
  import stat  # pylint: disable=g-import-not-at-top
  real_flock = fcntl.flock

  def no_directory_locks(fd, op):
    if stat.S_ISDIR(os.fstat(fd).st_mode):
      raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
    return real_flock(fd, op)

  monkeypatch.setattr(fcntl, 'flock', no_directory_locks)
  holder = workdir_lib.Lock(str(tmp_path))
  holder.acquire()
  try:
    with pytest.raises(workdir_lib.WorkdirError, match='is in use'):
      workdir_lib.Lock(str(tmp_path)).acquire()
    holder.check('saving step 2')
    (tmp_path / workdir_lib.LOCK_NAME).unlink()
    with pytest.raises(workdir_lib.WorkdirError,
                       match='its lock file .* was deleted or replaced'):
      holder.check('saving step 2')
  finally:
    holder.release()


def test_unreadable_metrics_lines_are_dropped_with_one_warning(tmp_path,
                                                               capsys):
  path = pathlib.Path(tmp_path) / metrics_writer.METRICS_NAME
  good = [{'step': 2, 'split': 'train', 'loss': 1.0},
          {'step': 4, 'split': 'eval', 'loss': 0.5}]
  path.write_bytes(
      json.dumps(good[0]).encode() + b'\n'
      + b'\xff\xfe not utf-8\n[1, 2]\n"text"\n{"step": true, "split": "x"}\n'
      + b'{"split": "train"}\n' + json.dumps(good[1]).encode() + b'\n'
      + b'{"step": 6, "spl')  # cut short by a kill
  assert metrics_writer.read_metrics(str(tmp_path)) == good
  metrics_writer.MetricWriter(str(tmp_path), resume_step=4).close()
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith('warning: dropped 6 unreadable '
                                             'lines of '), err
  assert metrics_writer.read_metrics(str(tmp_path)) == good
  assert path.read_bytes().count(b'\n') == 2


def test_training_and_its_files_import_no_tensorflow(tmp_path):
  """The trainer, its metrics (TensorBoard included) and the readers of a
  workdir run on hosts without TensorFlow: importing them and writing
  metrics loads none of it, where it is installed too."""
  code = (
      'import sys\n'
      'import main\n'
      'from vmoe import analysis, predict, workdir\n'
      'from vmoe.evaluate import capacity_sweep\n'
      'from vmoe.train import metrics_writer, trainer\n'
      f'w = metrics_writer.MetricWriter({str(tmp_path)!r})\n'
      "w.write(1, 'train', {'loss': 1.0, 'load': [1.0, 2.0]})\n"
      'w.close()\n'
      "print(sorted(m for m in sys.modules if m.split('.')[0] in "
      "('tensorflow', 'tensorflow_datasets')))\n")
  proc = subprocess.run([sys.executable, '-c', code], cwd=REPO,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.strip().splitlines()[-1] == '[]'
  assert list((tmp_path / 'tensorboard' / 'train').iterdir())
