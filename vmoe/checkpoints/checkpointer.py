"""Orbax checkpointing of the train state, with a content digest of every
array.

Saves are asynchronous (training continues while the previous state is
written) and atomic: orbax writes into a temporary directory
(`<step>.orbax-checkpoint-tmp-*`) and renames it when complete, so a process
killed mid-save leaves the previous checkpoint restorable. Restoring takes an
abstract target whose leaves carry the wanted shardings, so a checkpoint
written on one mesh restores onto another.

Each checkpoint carries, in the custom metadata of its step
(`<step>/_CHECKPOINT_METADATA`, written into the temporary directory before
the rename, so atomically with the arrays), a `StepInfo`:

  arrays       {path: (shape, dtype, digest)} of every array saved, the
               digest being `vmoe.checkpoints.digest` (multilinear, mesh
               independent);
  config       the run's resolved config (`vmoe.workdir` compares a resumed
               run with it; config.json is a readable copy);
  evaluations  the evaluations due at this step ('eval', 'fewshot'): a run
               resumed from the step runs those missing from metrics.jsonl
               before it continues, so a kill during an evaluation loses
               nothing;

plus a CRC-32 of that record. Every restore recomputes the digests of what it
read and compares: orbax stores zstd frames without a content checksum, so a
flipped bit in the data otherwise restores as a different value in silence.

A checkpoint that cannot be used is told apart in two ways: `check_structure`
compares the arrays listed by the checkpoint with the target (other parameter
names, shapes or dtypes: `IncompatibleCheckpointError`, the config does not
match the run) before any data is read; unreadable metadata or data
(truncated, overwritten, zeroed or deleted files) and a digest mismatch are
`CorruptCheckpointError`, and `set_aside` renames such a step to
`<step>.corrupt` so that orbax no longer lists it.

`newest_first` is the fallback every reader shares (the trainer's resume,
`read` for predict, the capacity sweep and `vmoe.analysis.load`): the newest
checkpoint that restores and verifies, past the corrupt ones; `read` also
takes the next one when a checkpoint vanishes while it is read (a training
run deleting old checkpoints) and creates nothing.

Failed saves and restores are one exception with one line; the tracebacks
orbax, asyncio and TensorStore print from their threads for them are kept off
stderr (`_install_quiet_filters`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import logging as logging_std
import os
import re
import sys
import zlib
from typing import Any, Callable, Iterator, Sequence

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from vmoe import workdir as workdir_lib
from vmoe.checkpoints import digest
from vmoe.checkpoints.source import CheckpointError

_ITEM = 'default'  # the item directory orbax writes for a single item
TMP_MARKER = '.orbax-checkpoint-tmp'
CORRUPT_SUFFIX = '.corrupt'
METADATA_FILE = '_CHECKPOINT_METADATA'  # orbax's per-step metadata
COMMIT_FILE = 'commit_success.txt'  # orbax's mark of a complete remote save
_KEY = 'vmoe'  # our record in orbax's custom metadata
_CRC_KEY = 'vmoe_crc32'
EVALUATIONS = ('eval', 'fewshot')
FILES_NAME = 'vmoe_files.json'  # CRC-32 of every file of a small checkpoint
# Checkpoints of up to this many array bytes also record and check a CRC-32
# of every file (a second read of each file, cheap at this size).
FILE_CHECK_BYTES = 256 << 20
_READ_BLOCK = 16 << 20


class CorruptCheckpointError(Exception):
  """A checkpoint step whose files cannot be read back (or read back other
  values than were saved)."""

  def __init__(self, step: int, reason: str):
    super().__init__(f'checkpoint {step}: {reason}')
    self.step = step
    self.reason = reason


class IncompatibleCheckpointError(ValueError):
  """The checkpoint holds a different model/optimizer state than the config."""


class CheckpointWriteError(OSError):
  """A checkpoint could not be written (e.g. the disk is full)."""


@dataclasses.dataclass(frozen=True)
class StepInfo:
  """What a checkpoint records besides its arrays (None / () for checkpoints
  written before this record existed).

  arrays: {path: (shape, dtype, digest as 16 hex digits)}.
  config: the resolved config of the run (JSON values).
  evaluations: the evaluations due at the step, of EVALUATIONS.
  files: whether the item directory holds FILES_NAME (small checkpoints).
  """
  arrays: dict[str, tuple[tuple[int, ...], str, str]] | None = None
  config: dict[str, Any] | None = None
  evaluations: tuple[str, ...] = ()
  files: bool = False


def first_line(e: BaseException) -> str:
  lines = [l.strip() for l in str(e).splitlines() if l.strip()]
  text = lines[0] if lines else ''
  if len(text) > 200:
    text = text[:200] + '...'
  return f'{type(e).__name__}: {text}' if text else type(e).__name__


def _data_error(e: BaseException) -> str:
  """One line on why reading failed: the innermost error of the chain, without
  TensorStore's specs and file URLs (the step directory is named anyway)."""
  chain = [e]
  while len(chain) < 10 and (chain[-1].__cause__ or chain[-1].__context__):
    chain.append(chain[-1].__cause__ or chain[-1].__context__)
  # Iteration plumbing (a StopIteration inside the JSON decoder) says nothing.
  e = [c for c in chain if not isinstance(c, StopIteration)][-1]
  text = ' '.join(str(e).split())
  text = re.sub(r'\s*\[tensorstore_spec=.*$', '', text)
  text = re.sub(r' in OCDBT database at [^:]*"[^"]*"', '', text)
  text = re.sub(r'\. See full TensorStore details:.*$', '', text)
  if len(text) > 200:
    text = text[:200] + '...'
  if not re.match(r'[A-Z_]+: ', text):  # TensorStore's codes say enough
    text = f'{type(e).__name__}: {text}' if text else type(e).__name__
  return text


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
  """Keeps orbax's warnings about a broken checkpoint off stderr."""
  verbosity = logging.get_verbosity()
  logging.set_verbosity(logging.FATAL)
  try:
    yield
  finally:
    logging.set_verbosity(verbosity)


class _DropFilter(logging_std.Filter):
  """Drops the log records a failed save or restore leaves behind: orbax's
  errors (re-raised to the caller, which reports them in one line) and
  asyncio's 'exception was never retrieved' for the reads abandoned when
  another one failed."""

  def filter(self, record):
    if record.levelno >= logging_std.ERROR and (
        f'{os.sep}orbax{os.sep}' in (record.pathname or '')):
      return False
    return 'exception was never retrieved' not in record.getMessage()


_quiet_filters_installed = False


def _install_quiet_filters() -> None:
  """Keeps the tracebacks of failed saves and restores off stderr.

  orbax writes and reads arrays concurrently; when one fails, the others
  fail on their own and are dropped unawaited, which Python and asyncio print
  as 'Exception ignored in <coroutine ...>' / 'Future exception was never
  retrieved' / 'RuntimeError: Event loop is closed' tracebacks whenever (and
  in whichever thread) they are collected, and orbax logs each failure of
  its background threads with a traceback. The failure itself reaches the
  caller as one exception. Installed before the first save or restore (not
  after a failure: the abandoned reads may be collected before that).
  """
  global _quiet_filters_installed
  if _quiet_filters_installed:
    return
  _quiet_filters_installed = True
  hook = sys.unraisablehook

  def drop_orbax_leftovers(unraisable):
    code = getattr(unraisable.object, 'cr_code', None)
    if code is not None and 'orbax' in code.co_filename:
      return
    # TensorStore callbacks of those reads and writes completing after orbax
    # closed its event loop.
    if (unraisable.exc_type is RuntimeError
        and str(unraisable.exc_value) == 'Event loop is closed'):
      return
    hook(unraisable)

  sys.unraisablehook = drop_orbax_leftovers
  drop = _DropFilter()
  logging_std.getLogger('asyncio').addFilter(drop)
  logging_std.getLogger('absl').addFilter(drop)
  for handler in logging_std.getLogger().handlers:  # absl's own handler
    handler.addFilter(drop)


def _key_name(entry) -> str:
  for attr in ('key', 'idx', 'name'):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def named_arrays(tree: Any) -> list[tuple[str, Any]]:
  """[('params/blocks/0/...', leaf)] of the array leaves of `tree`.

  Namedtuple fields, dict keys and sequence indices all become path parts,
  so a target pytree, orbax's stored metadata tree and a tree restored as
  saved name their arrays alike.
  """
  out = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if hasattr(leaf, 'shape') and hasattr(leaf, 'dtype'):
      out.append(('/'.join(_key_name(k) for k in path), leaf))
  return out


def tree_signature(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
  """{'params/blocks/0/...': (shape, dtype)} of the array leaves of `tree`."""
  return {path: (tuple(int(d) for d in leaf.shape), str(leaf.dtype))
          for path, leaf in named_arrays(tree)}


def structure_differences(stored: dict, wanted: dict, limit: int = 3
                          ) -> list[str]:
  """Readable differences between two `tree_signature`s (at most `limit`)."""
  out = []
  for path in sorted(set(stored) | set(wanted)):
    if path not in wanted:
      out.append(f'{path} is in the checkpoint, not in this config')
    elif path not in stored:
      out.append(f'{path} is missing from the checkpoint')
    elif stored[path] != wanted[path]:
      (s_shape, s_dtype), (w_shape, w_dtype) = stored[path], wanted[path]
      out.append(f'{path} is {s_dtype}{list(s_shape)} in the checkpoint, '
                 f'{w_dtype}{list(w_shape)} in this config')
  more = len(out) - limit
  return out[:limit] + ([f'{more} more'] if more > 0 else [])


# ------------------------------------------------------------ step records --


def _canonical(record: Any) -> bytes:
  return json.dumps(record, sort_keys=True, separators=(',', ':')).encode()


def array_bytes(tree: Any) -> int:
  return sum(int(leaf.size) * leaf.dtype.itemsize
             for _, leaf in named_arrays(tree))


def step_record(tree: Any, *, config: dict[str, Any] | None = None,
                evaluations: Sequence[str] = (), files: bool = False
                ) -> dict[str, Any]:
  """The custom metadata a checkpoint of `tree` is saved with (computing
  the digests is a collective with several processes)."""
  arrays = named_arrays(tree)
  totals = digest.sum_over_processes(
      digest.partial_digests(leaf for _, leaf in arrays))
  record = {
      'arrays': {path: [list(map(int, leaf.shape)), str(leaf.dtype),
                        digest.hex64(value)]
                 for (path, leaf), value in zip(arrays, totals)},
      'config': config,
      'evaluations': [e for e in EVALUATIONS if e in evaluations],
      'files': bool(files),
  }
  return {_KEY: record, _CRC_KEY: zlib.crc32(_canonical(record))}


def _file_crc(path: epath.Path) -> list[int]:
  """[size, CRC-32] of a file."""
  crc, size = 0, 0
  with path.open('rb') as f:
    while True:
      block = f.read(_READ_BLOCK)
      if not block:
        return [size, crc]
      crc = zlib.crc32(block, crc)
      size += len(block)


def file_crcs(directory: str) -> dict[str, list[int]]:
  """{relative path: [size, CRC-32]} of the files under `directory` but
  FILES_NAME and orbax's commit marks (written after it, never read)."""
  out = {}

  def walk(directory: epath.Path, prefix: str) -> None:
    for path in sorted(directory.iterdir()):
      if path.is_dir():
        walk(path, f'{prefix}{path.name}/')
      elif path.name not in (FILES_NAME, COMMIT_FILE):
        out[prefix + path.name] = _file_crc(path)

  walk(_path(directory), '')
  return out


class _Handler(ocp.StandardCheckpointHandler):
  """orbax's handler, and: once orbax has finalized the item directory
  (still under its temporary name, so atomically with the checkpoint), a
  CRC-32 of every file in it when `record_files` is set. The bytes no
  restore reads (orbax's per-process index, superseded by the merged one)
  are then checked too."""

  def __init__(self):
    super().__init__()
    self.record_files = False

  def finalize(self, directory: epath.Path) -> None:
    super().finalize(directory)
    if self.record_files and jax.process_index() == 0:
      files = file_crcs(str(directory))
      manifest = {'files': files, 'crc32': zlib.crc32(_canonical(files))}
      (_path(str(directory)) / FILES_NAME).write_text(json.dumps(manifest))


def verify_files(step: int, item_dir: str) -> None:
  """Compares the files of a checkpoint's item directory with its
  FILES_NAME; CorruptCheckpointError on any difference."""
  try:
    manifest = json.loads((_path(item_dir) / FILES_NAME).read_bytes())
    files = manifest['files']
    ok = manifest['crc32'] == zlib.crc32(_canonical(files))
  except FileNotFoundError:
    raise CorruptCheckpointError(step, f'{FILES_NAME} is missing') from None
  except Exception as e:  # pylint: disable=broad-except
    raise CorruptCheckpointError(
        step, f'{FILES_NAME} is unreadable ({first_line(e)})') from None
  if not ok:
    raise CorruptCheckpointError(step, f'{FILES_NAME} does not match its '
                                 'CRC-32')
  try:
    found = file_crcs(item_dir)
  except OSError as e:
    raise CorruptCheckpointError(step, _data_error(e)) from None
  for name in sorted(set(files) | set(found)):
    if name not in found:
      raise CorruptCheckpointError(step, f'{_ITEM}/{name} is missing')
    if name not in files:
      raise CorruptCheckpointError(step, f'{_ITEM}/{name} was not saved')
    if list(found[name]) != list(files[name]):
      raise CorruptCheckpointError(
          step, f'{_ITEM}/{name} differs from what was saved (size, CRC-32 '
          f'{found[name]}, saved {files[name]})')


def _path(directory: str) -> epath.Path:
  return epath.Path(directory)


def read_step_info(step_dir: str, step: int) -> StepInfo:
  """The `StepInfo` of the checkpoint in `step_dir`; CorruptCheckpointError
  when orbax's step metadata is missing or unreadable, or our record does
  not match its CRC."""
  path = _path(step_dir) / METADATA_FILE
  try:
    text = path.read_bytes()
  except FileNotFoundError:
    if not _path(step_dir).exists():
      raise CorruptCheckpointError(step, 'it no longer exists') from None
    raise CorruptCheckpointError(step, f'{METADATA_FILE} is missing') from None
  except Exception as e:  # pylint: disable=broad-except
    raise CorruptCheckpointError(
        step, f'{METADATA_FILE} cannot be read ({first_line(e)})') from None
  try:
    custom = json.loads(text).get('custom_metadata') or {}
  except (ValueError, AttributeError) as e:
    raise CorruptCheckpointError(
        step, f'{METADATA_FILE} is not valid JSON ({first_line(e)})') from None
  record = custom.get(_KEY) if isinstance(custom, dict) else None
  if record is None:
    return StepInfo()  # written before checkpoints carried digests
  if custom.get(_CRC_KEY) != zlib.crc32(_canonical(record)):
    raise CorruptCheckpointError(
        step, f'its record in {METADATA_FILE} does not match its CRC-32')
  try:
    arrays = {p: (tuple(shape), dtype, value)
              for p, (shape, dtype, value) in record['arrays'].items()}
    evaluations = tuple(record.get('evaluations') or ())
    config = record.get('config')
    files = bool(record.get('files', False))
  except (KeyError, TypeError, ValueError, AttributeError) as e:
    raise CorruptCheckpointError(
        step, f'its record in {METADATA_FILE} is malformed '
        f'({first_line(e)})') from None
  return StepInfo(arrays=arrays, config=config, evaluations=evaluations,
                  files=files)


def verify(step: int, info: StepInfo, tree: Any, *,
           local_failure: bool = False) -> None:
  """Recomputes the digests of `tree` (restored from `step`) and compares
  them with the checkpoint's; CorruptCheckpointError on a mismatch.

  With several processes this is a collective: every process calls it, one
  whose own restore failed with `local_failure` (it contributes nothing).
  """
  if info.arrays is None:
    return
  arrays = [] if local_failure else named_arrays(tree)
  if jax.process_count() > 1:
    # The same leaves, in the same order, on every process.
    names = sorted(info.arrays)
    by_name = dict(arrays)
    partials = digest.partial_digests(by_name[n] for n in names
                                      if n in by_name)
    if len(partials) != len(names):
      partials = [0] * len(names)
    totals = dict(zip(names, digest.sum_over_processes(partials)))
  else:
    totals = dict(zip([p for p, _ in arrays], digest.partial_digests(
        leaf for _, leaf in arrays)))
  if local_failure:
    return
  for path, leaf in arrays:
    if path not in info.arrays:
      raise CorruptCheckpointError(step, f'{path} is not in its manifest')
    shape, dtype, stored = info.arrays[path]
    if (tuple(leaf.shape), str(leaf.dtype)) != (tuple(shape), dtype):
      raise CorruptCheckpointError(
          step, f'{path} reads as {leaf.dtype}{list(leaf.shape)}, its '
          f'manifest says {dtype}{list(shape)}')
    read = digest.hex64(totals[path])
    if read != stored:
      raise CorruptCheckpointError(
          step, f'the content of {path} differs from what was saved '
          f'(digest {read}, saved {stored})')


# --------------------------------------------------------- directory level --


def is_remote(directory: str) -> bool:
  return '://' in str(directory)


def normal_directory(directory: str) -> str:
  """An absolute local path; URLs (gs://...) as they are."""
  directory = str(directory)
  if is_remote(directory):
    return directory
  return os.path.abspath(os.path.expanduser(directory))


def list_steps(directory: str) -> list[int]:
  """Steps of the complete checkpoints in `directory`, ascending; [] when it
  does not exist. Remote saves are complete once orbax wrote their commit
  file (local ones once renamed from their temporary name)."""
  root = _path(directory)
  try:
    names = [p.name for p in root.iterdir()]
  except (FileNotFoundError, NotADirectoryError):
    return []
  steps = []
  for name in names:
    if not name.isdigit():
      continue
    if is_remote(directory) and not (root / name / COMMIT_FILE).exists():
      continue
    steps.append(int(name))
  return sorted(steps)


def has_checkpoints(directory: str) -> bool:
  """Whether a checkpoint directory holds any step (a resumed run)."""
  try:
    return bool(list_steps(directory))
  except OSError:
    return False


def remove_stale_tmp(directory: str) -> list[str]:
  """Deletes the temporary directories of saves that were killed.

  Only safe while no other process saves into `directory` (the trainer holds
  the workdir lock). Returns the removed paths.
  """
  root = _path(directory)
  if not root.is_dir():
    return []
  removed = []
  for path in sorted(root.iterdir()):
    if TMP_MARKER in path.name:
      if path.is_dir():
        path.rmtree()
      else:
        path.unlink()
      removed.append(str(path))
  return removed


def stored_config(directory: str) -> tuple[int, dict[str, Any]] | None:
  """(step, config) recorded by the newest checkpoint of `directory` whose
  record is readable; None when no checkpoint records a config."""
  for step in reversed(list_steps(directory)):
    try:
      info = read_step_info(os.path.join(directory, str(step)), step)
    except CorruptCheckpointError:
      continue  # the restore sets it aside; an older one has the config
    if info.config is not None:
      return step, info.config
  return None


def run_config(workdir: str) -> tuple[dict[str, Any] | None, str]:
  """(config, where from) of the run in `workdir`: the config its newest
  readable checkpoint records, else its config.json (checkpoints from before
  configs were recorded); (None, '') when neither exists."""
  recorded = stored_config(os.path.join(workdir, 'checkpoints'))
  if recorded is not None:
    step, config = recorded
    return config, f'the config recorded by checkpoint {step}'
  config = workdir_lib.read_config(workdir)
  if config is None:
    return None, ''
  return config, os.path.join(workdir, workdir_lib.CONFIG_NAME)


def _restore_item(step_dir: str, abstract: Any | None) -> Any:
  """Reads the arrays of a checkpoint (into `abstract`'s shardings, or as
  saved)."""
  restorer = ocp.Checkpointer(ocp.StandardCheckpointHandler())
  args = ocp.args.StandardRestore(abstract)
  with _quiet():
    return restorer.restore(_path(step_dir) / _ITEM, args=args)


def _read(step: int, step_dir: str, abstract: Any | None,
          info: StepInfo) -> Any:
  """`_restore_item` (after `verify_files` for small checkpoints) with every
  failure as CorruptCheckpointError."""
  _install_quiet_filters()
  if info.files:
    verify_files(step, os.path.join(step_dir, _ITEM))
  try:
    return _restore_item(step_dir, abstract)
  except MemoryError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    reason = _data_error(e)
  gc.collect()  # finalise the abandoned reads now, while the filters hold
  raise CorruptCheckpointError(step, reason)


def newest_first(steps: Callable[[], Sequence[int]],
                 attempt: Callable[[int], Any], *,
                 agree: Callable[[bool], bool] = lambda ok: ok,
                 vanished: Callable[[int], bool] = lambda step: False,
                 ) -> tuple[int | None, Any, list[tuple[int, str]]]:
  """(step, value, failed): the newest step for which `attempt` succeeds.

  steps: lists the steps (called again after each failure, so that steps
    another process deleted or added meanwhile count).
  attempt: step -> value, or CorruptCheckpointError.
  agree: with several processes, whether every process succeeded (each
    calls it with its own outcome).
  vanished: whether a failed step was deleted meanwhile (not corruption:
    skipped without a report).
  failed: [(step, reason)], newest first, of the steps that did not restore.
  (None, None, failed) when none does.
  """
  tried: set[int] = set()
  failed = []
  while True:
    left = [s for s in steps() if s not in tried]
    if not left:
      return None, None, failed
    step = max(left)
    tried.add(step)
    value, reason = None, None
    try:
      value = attempt(step)
    except CorruptCheckpointError as e:
      reason = e.reason
    if agree(reason is None):
      return step, value, failed
    del value
    if reason is not None and vanished(step):
      continue
    failed.append((step, reason))


@dataclasses.dataclass
class Restored:
  """A checkpoint read by `read`: its step, arrays as saved and record."""
  directory: str
  step: int
  state: Any
  info: StepInfo


def read(directory: str, step: int | None = None, *,
         warn: Callable[[str], None] | None = None) -> Restored:
  """The newest checkpoint of `directory` (or `step`) that restores and
  verifies, with its arrays as saved, for readers of a workdir that another
  run may be writing (predict, the capacity sweep, `vmoe.analysis.load`).

  Creates and moves nothing. A corrupt checkpoint is skipped with a
  one-line `warn` (default: stderr); one that vanishes while it is read (a
  training run's `max_to_keep`) is skipped in silence. Raises CheckpointError
  (one line) when there is no checkpoint, `step` is not one, or none
  restores.
  """
  directory = normal_directory(directory)
  warn = warn or (lambda line: print(line, file=sys.stderr, flush=True))
  if not _path(directory).is_dir():
    raise CheckpointError(f'{directory} does not exist: no checkpoints there')
  kept = list_steps(directory)
  if not kept:
    raise CheckpointError(f'no checkpoint in {directory}')
  if step is not None and step not in kept:
    raise CheckpointError(f'step={step} is not a checkpoint of {directory} '
                          f'(kept: {kept})')

  def attempt(s: int) -> Restored:
    step_dir = os.path.join(directory, str(s))
    info = read_step_info(step_dir, s)
    state = _read(s, step_dir, None, info)
    verify(s, info, state)
    return Restored(directory, s, state, info)

  def vanished(s: int) -> bool:
    return not (_path(directory) / str(s)).exists()

  def steps() -> list[int]:
    listed = list_steps(directory)
    return [step] if step is not None and step in listed else (
        [] if step is not None else listed)

  found, restored, failed = newest_first(steps, attempt, vanished=vanished)
  for s, why in failed:
    if found is not None:
      warn(f'warning: skipped checkpoint {s} in {directory} ({why})')
  if found is not None:
    return restored
  if step is not None and not failed:
    raise CheckpointError(f'step={step} of {directory} was deleted while it '
                          'was read')
  if not failed:
    raise CheckpointError(f'no checkpoint in {directory} (the last one was '
                          'deleted while it was read)')
  s, why = failed[0]
  listed = ', '.join(str(x) for x, _ in sorted(failed))
  raise CheckpointError(f'no checkpoint in {directory} restores (steps '
                        f'{listed}; checkpoint {s}: {why})')


# ------------------------------------------------------------ the trainer's --


class Checkpointer:
  """Thin wrapper over `ocp.CheckpointManager` for a train-state pytree."""

  def __init__(self, directory: str, *, max_to_keep: int,
               async_save: bool = True):
    self.directory = normal_directory(directory)
    _install_quiet_filters()
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=True,
        enable_async_checkpointing=async_save)
    self._handler = _Handler()
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    registry.add(_ITEM, ocp.args.StandardSave, self._handler)
    registry.add(_ITEM, ocp.args.StandardRestore, self._handler)
    with _quiet():  # it warns about every step without _CHECKPOINT_METADATA
      self._manager = ocp.CheckpointManager(
          self.directory, options=options, handler_registry=registry)
    self._in_flight = None  # the step of an async save not known complete

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def step_path(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def info(self, step: int) -> StepInfo:
    return read_step_info(self.step_path(step), step)

  def save(self, step: int, state: Any, *,
           config: dict[str, Any] | None = None,
           evaluations: Sequence[str] = ()) -> None:
    """Starts an (async) save of `state` at `step` with its digests, the
    run's `config` and the `evaluations` due at the step; no-op if the step
    exists.

    Raises CheckpointWriteError naming the step that failed (an earlier
    async save, or this one).
    """
    if step in self._manager.all_steps():
      return
    self.wait()
    # Set for this save only: the previous one has finished (wait()).
    self._handler.record_files = array_bytes(state) <= FILE_CHECK_BYTES
    record = step_record(state, config=config, evaluations=evaluations,
                         files=self._handler.record_files)
    try:
      self._manager.save(step, args=ocp.args.StandardSave(state),
                         custom_metadata=record, force=True)
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointWriteError(
          f'cannot write checkpoint {step} to {self.directory}: '
          f'{_data_error(e)}') from None
    self._in_flight = step

  def check_structure(self, step: int, target: Any) -> StepInfo:
    """Compares the arrays of `step` with `target` before reading data;
    returns the step's record.

    Raises:
      CorruptCheckpointError: the metadata is missing or unreadable, or
        orbax's tree disagrees with the checkpoint's own list of arrays.
      IncompatibleCheckpointError: other parameter names, shapes or dtypes.
    """
    info = self.info(step)
    path = _path(self.step_path(step)) / _ITEM
    try:
      with _quiet():
        metadata = ocp.StandardCheckpointHandler().metadata(path)
      stored = tree_signature(getattr(metadata, 'tree', metadata))
    except Exception as e:  # pylint: disable=broad-except
      raise CorruptCheckpointError(
          step, f'unreadable metadata: {_data_error(e)}') from None
    if not stored:
      raise CorruptCheckpointError(step, 'the metadata lists no arrays')
    if info.arrays is not None:
      listed = {p: (tuple(shape), dtype)
                for p, (shape, dtype, _) in info.arrays.items()}
      if stored != listed:
        raise CorruptCheckpointError(
            step, 'orbax metadata disagrees with its list of arrays: '
            f'{"; ".join(structure_differences(stored, listed))}')
    differences = structure_differences(stored, tree_signature(target))
    if differences:
      raise IncompatibleCheckpointError(
          f'checkpoint {step} in {self.directory} holds another model or '
          f'optimizer than this config: {"; ".join(differences)}')
    return info

  def restore(self, step: int, target: Any,
              info: StepInfo | None = None) -> Any:
    """Restores `step` into the structure/shardings of `target` and verifies
    its digests (a collective with several processes: every process calls
    it).

    target: pytree of jax.ShapeDtypeStruct (with .sharding) or arrays.
    Raises CorruptCheckpointError when the data cannot be read or differs
    from what was saved.
    """
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    state, error = None, None
    try:
      info = info or self.info(step)
      state = _read(step, self.step_path(step), abstract, info)
    except CorruptCheckpointError as e:
      error = e
    if info is not None:
      try:
        verify(step, info, state, local_failure=error is not None)
      except CorruptCheckpointError as e:
        error = error or e
    if error is not None:
      raise error
    return state

  def restore_as_saved(self, step: int) -> Any:
    """Restores and verifies `step` as saved (arrays on the default
    device)."""
    info = self.info(step)
    state = _read(step, self.step_path(step), None, info)
    verify(step, info, state)
    return state

  def set_aside(self, step: int) -> str:
    """Renames step `step` to `<step>.corrupt[.N]`; returns the new path.

    The manager then no longer lists it (its name is not a step number), so
    neither a restore nor `max_to_keep` ever touches it again.
    """
    source = self.step_path(step)
    target = source + CORRUPT_SUFFIX
    n = 1
    # epath (orbax's paths): local directories and gs:// alike.
    while epath.Path(target).exists():
      n += 1
      target = f'{source}{CORRUPT_SUFFIX}.{n}'
    epath.Path(source).rename(target)
    return target

  def reload(self) -> None:
    """Re-reads the list of steps (after `set_aside` by any process)."""
    with _quiet():
      self._manager.reload()

  def wait(self) -> None:
    """Waits for the async save; CheckpointWriteError naming its step if it
    failed."""
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      step, self._in_flight = self._in_flight, None
      what = f'checkpoint {step}' if step is not None else 'a checkpoint'
      raise CheckpointWriteError(
          f'cannot write {what} to {self.directory}: {_data_error(e)}'
      ) from None
    self._in_flight = None

  def close(self) -> None:
    try:
      self.wait()
    finally:
      try:
        self._manager.close()
      except Exception:  # pylint: disable=broad-except
        pass  # the failed save was reported by wait()
