"""Reader of this project's orbax checkpoints (`vmoe.checkpoints.checkpointer`)
for `init_from` and inference.

Accepts a training workdir (its latest checkpoint), its `checkpoints/`
directory (latest step) or one `checkpoints/<step>` directory. Parameter
names are already ours, in the unscanned layout (`layout.py`).
"""

from __future__ import annotations

import os

import jax
import ml_collections
import numpy as np

from vmoe import workdir as workdir_lib
from vmoe.checkpoints import checkpointer as checkpoint_lib
from vmoe.checkpoints import layout
from vmoe.checkpoints import mapping
from vmoe.checkpoints.source import CheckpointError, Source, fix_dtype

FORMAT = 'ours'


def locate(path: str) -> tuple[str, int]:
  """(checkpoints directory, step) that `path` designates."""
  path = os.path.abspath(os.path.expanduser(path))
  if os.path.isdir(os.path.join(path, 'checkpoints')):
    path = os.path.join(path, 'checkpoints')
  base = os.path.basename(path)
  if base.isdigit() and os.path.isdir(path):
    return os.path.dirname(path), int(base)
  steps = ([int(d) for d in os.listdir(path) if d.isdigit()
            and os.path.isdir(os.path.join(path, d))]
           if os.path.isdir(path) else [])
  if not steps:
    raise CheckpointError(f'{path!r} holds no checkpoint of ours (a workdir, '
                          'its checkpoints/ or a checkpoints/<step> directory)')
  return path, max(steps)


def is_ours(path: str) -> bool:
  try:
    locate(path)
    return True
  except CheckpointError:
    return False


def read_flat(path: str) -> dict[str, np.ndarray]:
  directory, step = locate(path)
  ckpt = checkpoint_lib.Checkpointer(directory, max_to_keep=1_000_000,
                                     async_save=False)
  try:
    state = ckpt.restore_as_saved(step)
  except (ValueError, KeyError, FileNotFoundError) as e:
    raise CheckpointError(f'cannot restore {directory}/{step}: '
                          f'{str(e).splitlines()[0]}') from None
  finally:
    ckpt.close()
  params = state['params'] if 'params' in state else state
  # A scanned run's stacked parameters come out one block at a time.
  return layout.to_canonical_flat(mapping.flatten(
      jax.tree.map(lambda x: fix_dtype(np.asarray(x)), params)))


def read(path: str) -> Source:
  directory, step = locate(path)
  params = read_flat(os.path.join(directory, str(step)))
  return Source(FORMAT, f'{directory}/{step}', params, {})


def workdir_config(path: str) -> ml_collections.ConfigDict | None:
  """The resolved config a training run wrote next to its checkpoints."""
  directory, _ = locate(path)
  return workdir_lib.stored_config(os.path.dirname(directory))
