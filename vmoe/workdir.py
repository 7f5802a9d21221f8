"""The workdir of a run: its lock, its stored config and what may change.

  <workdir>/lock          one run at a time (exclusive fcntl lock, held by the
                          chief process while it runs; the file names the holder)
  <workdir>/config.json   the config of the run, written once the run has
                          started (after validation and restore)

A second run on a locked workdir fails at once with one line naming the
holder. The lock is a `flock` on an open file, so a killed run can never leave
it stuck: the kernel drops it with the process. On resume the new config is
compared with `config.json`: only the fields of `RESUME_CHANGEABLE` may differ.
"""

from __future__ import annotations

import datetime
import errno
import json
import os
import shutil
import socket
import sys
from typing import Any

import ml_collections

LOCK_NAME = 'lock'
CONFIG_NAME = 'config.json'

# Fields (and whole sections, by prefix) that may change when a run resumes.
# Everything else defines the run (model, data and preprocessing, optimizer,
# schedule, seed, batch_size) and must equal the stored config.json.
RESUME_CHANGEABLE = (
    # How long, and how often to log / evaluate / save.
    'num_train_steps', 'log_every_steps', 'eval_every_steps',
    'checkpoint_every_steps', 'max_to_keep', 'dry_run',
    # Where the data lives and how it is read (not what it is).
    'dataset.data_dir', 'dataset.download', 'dataset.cache',
    'dataset.num_workers',
    # Evaluation only.
    'eval_batch_size', 'dataset.eval_split', 'model.moe.eval_capacity_factor',
    'fewshot',
    # Devices and implementations that compute the same function (a
    # checkpoint loads in the scanned or unscanned layout; micro-batches
    # change only the dropout masks).
    'mesh', 'partitioning', 'model.moe.dispatch', 'model.moe.kernels',
    'model.scan_layers', 'model.remat', 'grad_accum_steps',
    # Reporting.
    'profile_steps', 'cost',
    # Only read when a run starts from step 0 (not `init_from.freeze`: it
    # shapes the optimizer state of every step).
    'init_from.path', 'init_from.format', 'init_from.head',
    'init_from.resize_posemb', 'init_from.reinit', 'init_from.upcycle',
    'init_from.upcycle_noise',
)

# Kinds of the entries a workdir may hold: a dir, or a file.
_LAYOUT = {'checkpoints': 'dir', 'tensorboard': 'dir', CONFIG_NAME: 'file',
           'metrics.jsonl': 'file', LOCK_NAME: 'file'}


class WorkdirError(RuntimeError):
  """The workdir cannot be used; the message is one line naming it."""


class ConfigChangedError(WorkdirError):
  """The config differs from the stored one in fields that define the run."""


def is_remote(path: str) -> bool:
  return '://' in path


def prepare(workdir: str) -> None:
  """Creates `workdir` (local paths) and checks that a run can write there."""
  if is_remote(workdir):
    return
  shown = f'--workdir={workdir}'
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise WorkdirError(f'{shown} is a file, not a directory')
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise WorkdirError(f'{shown} cannot be created: {e.strerror}') from None
  if not os.access(workdir, os.W_OK | os.X_OK):
    raise WorkdirError(f'{shown} is not writable')
  for name, kind in _LAYOUT.items():
    path = os.path.join(workdir, name)
    if not os.path.lexists(path):
      continue
    if (kind == 'dir') != os.path.isdir(path):
      raise WorkdirError(f'{path} is a {"file" if kind == "dir" else "directory"}'
                         f'; a run expects a {kind} there (use another '
                         '--workdir)')
    if kind == 'dir' and not os.access(path, os.W_OK | os.X_OK):
      raise WorkdirError(f'{path} is not writable')


class Lock:
  """Exclusive lock of a workdir: `acquire()` or WorkdirError naming the holder.

  Kept until `release()` or the end of the process. Remote workdirs
  (gs://...) are not locked.
  """

  def __init__(self, workdir: str):
    self.workdir = workdir
    self.path = os.path.join(workdir, LOCK_NAME)
    self._file = None

  def acquire(self) -> None:
    import fcntl  # pylint: disable=g-import-not-at-top
    if is_remote(self.workdir) or self._file is not None:
      return
    try:
      f = open(self.path, 'a+')
    except OSError as e:
      raise WorkdirError(f'--workdir={self.workdir}: cannot create '
                         f'{self.path}: {e.strerror}') from None
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      f.seek(0)
      holder = f.read().strip() or 'a process that is starting'
      f.close()
      raise WorkdirError(
          f'--workdir={self.workdir} is in use by another run ({holder}); '
          'wait for it to end or use another --workdir') from None
    except OSError as e:
      if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
        f.close()
        raise WorkdirError(f'--workdir={self.workdir}: cannot lock '
                           f'{self.path}: {e.strerror}') from None
      print(f'warning: --workdir={self.workdir} is on a filesystem without '
            'locks; make sure no other run uses it', file=sys.stderr)
    started = datetime.datetime.now().astimezone().isoformat(timespec='seconds')
    try:
      f.seek(0)
      f.truncate()
      f.write(f'pid {os.getpid()} on {socket.gethostname()}, started '
              f'{started}\n')
      f.flush()
      os.fsync(f.fileno())
    except OSError as e:
      f.close()
      raise WorkdirError(f'--workdir={self.workdir}: cannot write '
                         f'{self.path}: {e.strerror}') from None
    self._file = f

  def release(self) -> None:
    # The file stays: deleting it would let a waiting run lock a file that a
    # third run then no longer sees.
    if self._file is not None:
      self._file.close()
      self._file = None


def check_free_space(workdir: str, checkpoint_bytes: int) -> None:
  """Room for at least one more checkpoint (plus 16 MiB of logs)."""
  if is_remote(workdir):
    return
  need = checkpoint_bytes + (16 << 20)
  free = shutil.disk_usage(workdir).free
  if free < need:
    raise WorkdirError(
        f'--workdir={workdir} has {free / 2**20:.1f} MiB free; a checkpoint of '
        f'this model needs {checkpoint_bytes / 2**20:.1f} MiB (+16 MiB for '
        'logs): free some space or use another --workdir')


def config_json(config: ml_collections.ConfigDict) -> str:
  return config.to_json_best_effort(indent=2, sort_keys=True)


def write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Writes config.json atomically (a kill leaves the old or the new file)."""
  path = os.path.join(workdir, CONFIG_NAME)
  with open(path + '.tmp', 'w') as f:
    f.write(config_json(config))
  os.replace(path + '.tmp', path)


def read_config(workdir: str) -> dict[str, Any] | None:
  """The stored config.json as a dict, None if absent."""
  path = os.path.join(workdir, CONFIG_NAME)
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      stored = json.load(f)
  except (OSError, ValueError) as e:
    raise WorkdirError(f'{path} cannot be read ({type(e).__name__}: {e}); '
                       'restore it or use another --workdir') from None
  if not isinstance(stored, dict):
    raise WorkdirError(f'{path} does not hold a config; restore it or use '
                       'another --workdir')
  return stored


def _tuples(x: Any) -> Any:
  """JSON lists back to the tuples the config had (configs use no lists)."""
  if isinstance(x, dict):
    return {k: _tuples(v) for k, v in x.items()}
  if isinstance(x, list):
    return tuple(_tuples(v) for v in x)
  return x


def stored_config(workdir: str) -> ml_collections.ConfigDict | None:
  """The run's resolved config from config.json (tuples restored), None if
  absent; WorkdirError (one line) if unreadable."""
  stored = read_config(workdir)
  return None if stored is None else ml_collections.ConfigDict(
      _tuples(stored))


def _changeable(path: str) -> bool:
  return any(path == p or path.startswith(p + '.') for p in RESUME_CHANGEABLE)


def default_values() -> dict[str, Any]:
  """Defaults of every field (vmoe.recipes.common + MoE options), as JSON
  values.

  A field missing from an older config.json had its default value then.
  """
  from vmoe.recipes import common  # pylint: disable=g-import-not-at-top
  from vmoe.nn import moe  # pylint: disable=g-import-not-at-top
  defaults = json.loads(config_json(common.get_base_config()))
  defaults['model']['moe'] = json.loads(config_json(moe.default_moe_config()))
  return defaults


_UNKNOWN = object()


def _normal(value: Any) -> Any:
  return json.loads(json.dumps(value))


def config_changes(stored: dict[str, Any], current: dict[str, Any],
                   defaults: dict[str, Any] | None = None
                   ) -> list[tuple[str, Any, Any]]:
  """(field, stored value, current value) of each change that is not allowed.

  Fields missing from `stored` count as their value in `defaults` (and as
  unchanged when no default is known); fields only in `stored` (no longer
  defined by the code) are ignored.
  """
  out = []

  def walk(old, new, default, path):
    if isinstance(old, dict) and isinstance(new, dict):
      for key in sorted(new):
        sub = f'{path}.{key}' if path else key
        if _changeable(sub):
          continue
        sub_default = (default.get(key, _UNKNOWN) if isinstance(default, dict)
                       else _UNKNOWN)
        if key in old:
          walk(old[key], new[key], sub_default, sub)
        elif sub_default is not _UNKNOWN:
          walk(sub_default, new[key], sub_default, sub)
    elif _normal(old) != _normal(new):
      out.append((path, old, new))

  walk(stored, current, defaults or {}, '')
  return out


def _short(value: Any, limit: int = 60) -> str:
  text = repr(value)
  return text if len(text) <= limit else text[:limit - 3] + '...'


def check_resume_config(config: ml_collections.ConfigDict,
                        workdir: str) -> None:
  """Raises ConfigChangedError if `config` changes the run in `workdir`."""
  stored = read_config(workdir)
  if stored is None:
    return
  current = json.loads(config_json(config))
  try:
    defaults = default_values()
  except ImportError:
    defaults = None
  changes = config_changes(stored, current, defaults)
  if not changes:
    return
  shown = ', '.join(f'config.{path}={_short(new)} (was {_short(old)})'
                    for path, old, new in changes[:3])
  more = f' and {len(changes) - 3} more' if len(changes) > 3 else ''
  raise ConfigChangedError(
      f'{shown}{more}: the run in --workdir={workdir} was trained with '
      f'other values ({CONFIG_NAME}); on resume only '
      'vmoe.workdir.RESUME_CHANGEABLE may change (steps, frequencies, '
      'data_dir, evaluation, mesh); use another --workdir for a new run')
