"""Orbax checkpointing of the train state.

Saves are asynchronous (training continues while the previous state is
written) and atomic: orbax writes into a temporary directory
(`<step>.orbax-checkpoint-tmp-*`) and renames it when complete, so a process
killed mid-save leaves the previous checkpoint restorable. Restoring takes an
abstract target whose leaves carry the wanted shardings, so a checkpoint
written on one mesh restores onto another.

A checkpoint that cannot be used is told apart in two ways:
`check_structure` compares the tree stored in its metadata with the target
(other parameter names, shapes or dtypes: `IncompatibleCheckpointError`, the
config does not match the run) before any data is read; unreadable metadata
or data (truncated, overwritten, zeroed or deleted files) is
`CorruptCheckpointError`, and `set_aside` renames such a step to
`<step>.corrupt` so that orbax no longer lists it.
"""

from __future__ import annotations

import contextlib
import gc
import logging as logging_std
import os
import re
import shutil
import sys
from typing import Any, Iterator

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

_ITEM = 'default'  # the item directory orbax writes for a single item
TMP_MARKER = '.orbax-checkpoint-tmp'
CORRUPT_SUFFIX = '.corrupt'


class CorruptCheckpointError(Exception):
  """A checkpoint step whose files cannot be read back."""

  def __init__(self, step: int, reason: str):
    super().__init__(f'checkpoint {step}: {reason}')
    self.step = step
    self.reason = reason


class IncompatibleCheckpointError(ValueError):
  """The checkpoint holds a different model/optimizer state than the config."""


class CheckpointWriteError(OSError):
  """A checkpoint could not be written (e.g. the disk is full)."""


def _first_line(e: BaseException) -> str:
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


class _AbandonedReadsFilter(logging_std.Filter):
  """Drops asyncio's 'exception was never retrieved' records."""

  def filter(self, record):
    return 'exception was never retrieved' not in record.getMessage()


_silenced_abandoned_reads = False


def _silence_abandoned_reads() -> None:
  """Keeps the array reads a failed restore left behind off stderr.

  orbax reads the arrays concurrently; when one read fails, the others fail
  on their own and are dropped unawaited, which Python and asyncio print as
  'Exception ignored in <coroutine ...>' / 'Future exception was never
  retrieved' tracebacks whenever (and in whichever thread) they are
  collected. The failure is reported once, by the caller; from the first
  failed restore on, exactly those two kinds of report are dropped.
  """
  global _silenced_abandoned_reads
  if _silenced_abandoned_reads:
    return
  _silenced_abandoned_reads = True
  hook = sys.unraisablehook

  def drop_orbax_reads(unraisable):
    code = getattr(unraisable.object, 'cr_code', None)
    if code is not None and 'orbax' in code.co_filename:
      return
    # Their TensorStore reads completing after orbax closed its event loop.
    if (unraisable.exc_type is RuntimeError
        and str(unraisable.exc_value) == 'Event loop is closed'):
      return
    hook(unraisable)

  sys.unraisablehook = drop_orbax_reads
  logging_std.getLogger('asyncio').addFilter(_AbandonedReadsFilter())


def _key_name(entry) -> str:
  for attr in ('key', 'idx', 'name'):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def tree_signature(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
  """{'params/blocks/0/...': (shape, dtype)} of the array leaves of `tree`.

  Namedtuple fields, dict keys and sequence indices all become path parts,
  so a target pytree and orbax's stored metadata tree compare equal.
  """
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if not hasattr(leaf, 'shape') or not hasattr(leaf, 'dtype'):
      continue
    out['/'.join(_key_name(k) for k in path)] = (
        tuple(int(d) for d in leaf.shape), str(leaf.dtype))
  return out


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


def has_checkpoints(directory: str) -> bool:
  """Whether a local checkpoint directory holds any step (a resumed run);
  False for URLs, where the run's own restore finds out."""
  if '://' in directory or not os.path.isdir(directory):
    return False
  try:
    return any(name.isdigit() for name in os.listdir(directory))
  except OSError:
    return False


def remove_stale_tmp(directory: str) -> list[str]:
  """Deletes the temporary directories of saves that were killed.

  Only safe while no other process saves into `directory` (the trainer holds
  the workdir lock). Returns the removed paths.
  """
  if not os.path.isdir(directory):
    return []
  removed = []
  for name in sorted(os.listdir(directory)):
    path = os.path.join(directory, name)
    if TMP_MARKER in name:
      if os.path.isdir(path):
        shutil.rmtree(path)
      else:
        os.remove(path)
      removed.append(path)
  return removed


class Checkpointer:
  """Thin wrapper over `ocp.CheckpointManager` for a train-state pytree."""

  def __init__(self, directory: str, *, max_to_keep: int,
               async_save: bool = True):
    # gs://... and other URLs stay as they are (abspath would make them local).
    self.directory = (directory if '://' in directory
                      else os.path.abspath(directory))
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=True,
        enable_async_checkpointing=async_save)
    with _quiet():  # it warns about every step without _CHECKPOINT_METADATA
      self._manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def step_path(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def save(self, step: int, state: Any) -> None:
    """Starts an (async) save of `state` at `step`; no-op if it exists.

    Raises CheckpointWriteError (also for an earlier async save that failed).
    """
    if step in self._manager.all_steps():
      return
    try:
      self._manager.save(step, args=ocp.args.StandardSave(state), force=True)
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointWriteError(
          f'cannot write checkpoint {step} to {self.directory}: '
          f'{_first_line(e)}') from None

  def check_structure(self, step: int, target: Any) -> None:
    """Compares the stored tree of `step` with `target` before reading data.

    Raises:
      CorruptCheckpointError: the metadata is missing or unreadable.
      IncompatibleCheckpointError: other parameter names, shapes or dtypes.
    """
    path = epath.Path(self.step_path(step)) / _ITEM
    try:
      with _quiet():
        metadata = ocp.StandardCheckpointHandler().metadata(path)
      stored = tree_signature(getattr(metadata, 'tree', metadata))
    except Exception as e:  # pylint: disable=broad-except
      raise CorruptCheckpointError(
          step, f'unreadable metadata: {_data_error(e)}') from None
    if not stored:
      raise CorruptCheckpointError(step, 'the metadata lists no arrays')
    differences = structure_differences(stored, tree_signature(target))
    if differences:
      raise IncompatibleCheckpointError(
          f'checkpoint {step} in {self.directory} holds another model or '
          f'optimizer than this config: {"; ".join(differences)}')

  def restore(self, step: int, target: Any) -> Any:
    """Restores `step` into the structure/shardings of `target`.

    target: pytree of jax.ShapeDtypeStruct (with .sharding) or arrays.
    Raises CorruptCheckpointError when the data cannot be read.
    """
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    try:
      with _quiet():
        return self._manager.restore(
            step, args=ocp.args.StandardRestore(abstract))
    except MemoryError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      reason = _data_error(e)
    _silence_abandoned_reads()
    gc.collect()  # finalise them now, while the filters are in place
    raise CorruptCheckpointError(step, reason)

  def restore_as_saved(self, step: int) -> Any:
    """Restores `step` as saved (numpy/jax arrays on the default device)."""
    return self._manager.restore(step, args=ocp.args.StandardRestore())

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
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointWriteError(
          f'cannot write a checkpoint to {self.directory}: '
          f'{_first_line(e)}') from None

  def close(self) -> None:
    try:
      self.wait()
    finally:
      self._manager.close()
