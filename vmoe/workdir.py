"""The workdir of a run: its lock, its stored config, its files and what may
change on resume.

  <workdir>/lock          names the run that holds the workdir (the lock is a
                          flock of the directory itself, held by the chief
                          process while it runs)
  <workdir>/config.json   a readable copy of the config each checkpoint
                          records, written with the run's first checkpoint

Every byte goes through etils.epath (or orbax, for the checkpoints), so a
workdir may be a local directory or a bucket (gs://...); `AppendFile` writes
the files that grow. A second run on a locked workdir fails at once with one
line naming the holder; a killed run never leaves the lock stuck (the kernel
drops it with the process); object stores have no locks, which the run says
in its first lines. On resume the new config is compared with the one the
newest checkpoint records (config.json for older checkpoints): only the
fields of `RESUME_CHANGEABLE` may differ.
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
from etils import epath

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

# flock errors of filesystems that cannot lock this kind of file.
_NO_LOCK_ERRORS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EBADF,
                   errno.EINVAL)

# Kinds of the entries a workdir may hold: a dir, or a file.
_LAYOUT = {'checkpoints': 'dir', 'tensorboard': 'dir', CONFIG_NAME: 'file',
           'metrics.jsonl': 'file', LOCK_NAME: 'file'}


class WorkdirError(RuntimeError):
  """The workdir cannot be used; the message is one line naming it."""


class ConfigChangedError(WorkdirError):
  """The config differs from the stored one in fields that define the run."""


def is_remote(path: str) -> bool:
  return '://' in path


def prepare(workdir: str) -> bool:
  """Creates `workdir` (local paths) and checks that a run can write there;
  returns whether it created the directory."""
  if is_remote(workdir):
    return False
  shown = f'--workdir={workdir}'
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise WorkdirError(f'{shown} is a file, not a directory')
  created = not os.path.exists(workdir)
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
  return created


def remove_if_empty(workdir: str) -> None:
  """Removes a local workdir this run created when nothing was written
  (a run that failed its checks leaves nothing behind)."""
  try:
    os.rmdir(workdir)
  except OSError:
    pass


class Lock:
  """Exclusive lock of a workdir: `acquire()` or WorkdirError naming the holder.

  The lock is a `flock` on the workdir directory itself, so deleting or
  replacing a file in it cannot unlock it; the kernel drops it with the
  process, so a killed run never leaves it stuck. `<workdir>/lock` only
  names the holder for the error of a second run (written by `announce()`
  once the run has passed its checks, so that a run failing earlier leaves
  no file behind). Where directories cannot be locked (NFS emulates flock
  with POSIX locks, which need a file open for writing) the lock file itself
  is locked instead, and `check()` at every save stops the run if the file
  was deleted or replaced. Object stores (gs://...) have no locks: `acquire`
  says so on stderr.

  Kept until `release()` or the end of the process.
  """

  def __init__(self, workdir: str):
    self.workdir = workdir
    self.path = os.path.join(workdir, LOCK_NAME)
    self._fd = None  # the locked directory or lock file
    self._locked = None  # 'directory' | 'file' | None (no lock possible)
    self._identity = None  # (st_dev, st_ino) of what was locked

  def _holder(self) -> str:
    try:
      with open(self.path) as f:
        return f.read().strip() or 'a process that is starting'
    except (OSError, UnicodeDecodeError):
      return 'a process that is starting'

  def _busy(self) -> WorkdirError:
    return WorkdirError(
        f'--workdir={self.workdir} is in use by another run '
        f'({self._holder()}); wait for it to end or use another --workdir')

  def acquire(self) -> None:
    import fcntl  # pylint: disable=g-import-not-at-top
    if self._fd is not None or self._locked is not None:
      return
    if is_remote(self.workdir):
      print(f'warning: --workdir={self.workdir} is on an object store, which '
            'has no locks: make sure no other run uses this workdir',
            file=sys.stderr, flush=True)
      self._locked = 'none'
      return
    try:
      fd = os.open(self.workdir, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as e:
      raise WorkdirError(f'--workdir={self.workdir} cannot be opened: '
                         f'{e.strerror}') from None
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      self._take(fd, 'directory')
    except BlockingIOError:
      os.close(fd)
      raise self._busy() from None
    except OSError as e:
      os.close(fd)
      if e.errno not in _NO_LOCK_ERRORS:
        raise WorkdirError(f'--workdir={self.workdir} cannot be locked: '
                           f'{e.strerror}') from None
      self._lock_file()
    if os.path.exists(self.path):
      self.announce()  # replace a finished run's name at once

  def _take(self, fd: int, kind: str) -> None:
    st = os.fstat(fd)
    self._fd, self._locked, self._identity = fd, kind, (st.st_dev, st.st_ino)

  def _lock_file(self) -> None:
    """The fallback: lock `<workdir>/lock` itself."""
    import fcntl  # pylint: disable=g-import-not-at-top
    try:
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
      raise WorkdirError(f'--workdir={self.workdir}: cannot create '
                         f'{self.path}: {e.strerror}') from None
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      os.close(fd)
      raise self._busy() from None
    except OSError as e:
      if e.errno not in _NO_LOCK_ERRORS:
        os.close(fd)
        raise WorkdirError(f'--workdir={self.workdir}: cannot lock '
                           f'{self.path}: {e.strerror}') from None
      os.close(fd)
      print(f'warning: --workdir={self.workdir} is on a filesystem without '
            'locks; make sure no other run uses it', file=sys.stderr,
            flush=True)
      self._locked = 'none'
      return
    self._take(fd, 'file')

  def announce(self) -> None:
    """Writes who holds the lock into `<workdir>/lock`."""
    if self._locked in (None, 'none'):
      return
    started = datetime.datetime.now().astimezone().isoformat(
        timespec='seconds')
    text = f'pid {os.getpid()} on {socket.gethostname()}, started {started}\n'
    try:
      if self._locked == 'file':  # rewrite the locked file in place
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, text.encode(), 0)
        os.fsync(self._fd)
      else:
        with open(self.path, 'w') as f:
          f.write(text)
    except OSError as e:
      raise WorkdirError(f'--workdir={self.workdir}: cannot write '
                         f'{self.path}: {e.strerror}') from None

  def check(self, before: str) -> None:
    """WorkdirError unless this run still holds the lock it took (the locked
    directory or lock file was not deleted or replaced); `before` names what
    the run stops before, e.g. 'saving step 40'."""
    if self._locked not in ('directory', 'file'):
      return
    target = self.workdir if self._locked == 'directory' else self.path
    try:
      st = os.stat(target)
      same = (st.st_dev, st.st_ino) == self._identity
    except OSError:
      same = False
    if not same:
      what = ('the workdir' if self._locked == 'directory'
              else f'its lock file {self.path}')
      raise WorkdirError(
          f'--workdir={self.workdir}: {what} was deleted or replaced while '
          f'this run held the lock (another run may be writing there); '
          f'stopped before {before}')

  def release(self) -> None:
    # The lock file stays: deleting it would let a waiting run lock a file
    # that a third run then no longer sees (the fallback's case).
    if self._fd is not None:
      os.close(self._fd)
      self._fd = None
    self._locked = None


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


def _epath(path: str) -> epath.Path:
  return epath.Path(path)


def read_bytes(path: str) -> bytes | None:
  """The content of a workdir file (local or gs://...), None if absent."""
  try:
    return _epath(path).read_bytes()
  except FileNotFoundError:
    return None


def write_atomic(path: str, data: bytes) -> None:
  """Writes a workdir file so that a kill leaves the old or the new content:
  a local file through a temporary file and a rename; an object on a store
  (gs://...) in one upload, which is atomic there."""
  target = _epath(path)
  if is_remote(path):
    target.write_bytes(data)
    return
  tmp = _epath(path + '.tmp')
  tmp.write_bytes(data)
  tmp.replace(target)


class AppendFile:
  """A workdir file written by appending (metrics.jsonl, TensorBoard event
  files), through epath.

  Local files are opened for appending and flushed after every write.
  Object stores (gs://...) cannot append: the content is kept in memory and
  the whole object is uploaded again at every `flush()`, as TensorBoard's
  own writers do there. `initial` replaces the file's content first.
  """

  def __init__(self, path: str, initial: bytes | None = None):
    self.path = path
    self._remote = is_remote(path)
    self._data = bytearray()
    self._file = None
    if self._remote:
      self._data += (initial if initial is not None
                     else read_bytes(path) or b'')
      if initial is not None:
        self.flush()
      return
    if initial is not None:
      write_atomic(path, initial)
    self._file = _epath(path).open('ab')

  def write(self, data: bytes, flush: bool = True) -> None:
    if self._remote:
      self._data += data
    else:
      self._file.write(data)
    if flush:
      self.flush()

  def flush(self) -> None:
    if self._remote:
      _epath(self.path).write_bytes(bytes(self._data))
    elif self._file is not None:
      self._file.flush()

  def close(self) -> None:
    if self._file is not None:
      try:
        self._file.close()
      finally:
        self._file = None


def write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Writes config.json atomically (a kill leaves the old or the new file):
  a readable copy of the config each checkpoint records."""
  write_atomic(os.path.join(workdir, CONFIG_NAME),
               config_json(config).encode())


def read_config(workdir: str) -> dict[str, Any] | None:
  """The stored config.json as a dict, None if absent."""
  path = os.path.join(workdir, CONFIG_NAME)
  try:
    data = read_bytes(path)
    if data is None:
      return None
    stored = json.loads(data)
  except (OSError, ValueError) as e:
    raise WorkdirError(f'{path} cannot be read ({type(e).__name__}: {e}); '
                       'restore it or use another --workdir') from None
  if not isinstance(stored, dict):
    raise WorkdirError(f'{path} does not hold a config; restore it or use '
                       'another --workdir')
  return stored


def as_config(stored: dict[str, Any]) -> ml_collections.ConfigDict:
  """A stored config (JSON values) as the ConfigDict it was (tuples back)."""
  return ml_collections.ConfigDict(_tuples(stored))


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
  return None if stored is None else as_config(stored)


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


def config_differences(config: ml_collections.ConfigDict,
                       stored: dict[str, Any]) -> str | None:
  """The changes of `config` from the `stored` config of a run that
  RESUME_CHANGEABLE does not allow, shown in one line; None if none."""
  current = json.loads(config_json(config))
  try:
    defaults = default_values()
  except ImportError:
    defaults = None
  changes = config_changes(stored, current, defaults)
  if not changes:
    return None
  shown = ', '.join(f'config.{path}={_short(new)} (was {_short(old)})'
                    for path, old, new in changes[:3])
  more = f' and {len(changes) - 3} more' if len(changes) > 3 else ''
  return shown + more


def check_resume_config(config: ml_collections.ConfigDict, workdir: str,
                        stored: dict[str, Any] | None = None,
                        source: str = CONFIG_NAME) -> None:
  """Raises ConfigChangedError if `config` changes the run in `workdir`.

  stored: the run's config, as recorded by `source` (its newest checkpoint);
  default: the workdir's config.json.
  """
  if stored is None:
    stored, source = read_config(workdir), CONFIG_NAME
  if stored is None:
    return
  changes = config_differences(config, stored)
  if changes is None:
    return
  raise ConfigChangedError(
      f'{changes}: the run in --workdir={workdir} was trained with '
      f'other values ({source}); on resume only '
      'vmoe.workdir.RESUME_CHANGEABLE may change (steps, frequencies, '
      'data_dir, evaluation, mesh); use another --workdir for a new run')
