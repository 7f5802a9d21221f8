"""Reader of this project's orbax checkpoints (`vmoe.checkpoints.checkpointer`)
for `init_from` and inference.

Accepts a training workdir or its `checkpoints/` directory (the newest
checkpoint that restores and verifies: corrupt ones are skipped with a
warning, ones deleted meanwhile by a running training in silence) or one
`checkpoints/<step>` directory (that step). Parameter names are already
ours, in the unscanned layout (`layout.py`: a scanned run's stacked
parameters come out one block at a time). Reading creates nothing.
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


def locate(path: str) -> tuple[str, int | None]:
  """(checkpoints directory, step) that `path` designates; step None: the
  newest that restores."""
  path = os.path.abspath(os.path.expanduser(path))
  if os.path.isdir(os.path.join(path, 'checkpoints')):
    path = os.path.join(path, 'checkpoints')
  base = os.path.basename(path)
  if base.isdigit() and os.path.isdir(path):
    return os.path.dirname(path), int(base)
  if not checkpoint_lib.list_steps(path):
    raise CheckpointError(f'{path!r} holds no checkpoint of ours (a workdir, '
                          'its checkpoints/ or a checkpoints/<step> directory)')
  return path, None


def is_ours(path: str) -> bool:
  try:
    locate(path)
    return True
  except CheckpointError:
    return False


def read(path: str) -> Source:
  directory, step = locate(path)
  restored = checkpoint_lib.read(directory, step)
  state = restored.state
  params = state['params'] if 'params' in state else state
  # A scanned run's stacked parameters come out one block at a time.
  flat = layout.to_canonical_flat(mapping.flatten(
      jax.tree.map(lambda x: fix_dtype(np.asarray(x)), params)))
  return Source(FORMAT, f'{directory}/{restored.step}', flat, {},
                config=restored.info.config)


def read_flat(path: str) -> dict[str, np.ndarray]:
  """The flat parameters of the checkpoint `path` designates (`read`)."""
  return read(path).params


def recorded_config(path: str) -> tuple[dict | None, str]:
  """(config, where from) of the run whose checkpoints `path` designates
  (`checkpointer.run_config`)."""
  directory, _ = locate(path)
  return checkpoint_lib.run_config(os.path.dirname(directory))


def workdir_config(path: str) -> ml_collections.ConfigDict | None:
  """The resolved config of the run whose checkpoints `path` designates
  (`recorded_config`), None if unknown."""
  config, _ = recorded_config(path)
  return None if config is None else workdir_lib.as_config(config)
