"""Orbax checkpointing of the train state.

Saves are asynchronous (training continues while the previous state is
written) and atomic: orbax writes into a temporary directory and renames it
when complete, so a process killed mid-save leaves the previous checkpoint
restorable. Restoring takes an abstract target whose leaves carry the wanted
shardings, so a checkpoint written on one mesh restores onto another.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """Thin wrapper over `ocp.CheckpointManager` for a train-state pytree."""

  def __init__(self, directory: str, *, max_to_keep: int,
               async_save: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=True,
        enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any) -> None:
    """Starts an (async) save of `state` at `step`; no-op if it exists."""
    if step in self._manager.all_steps():
      return
    self._manager.save(step, args=ocp.args.StandardSave(state), force=True)

  def restore(self, step: int, target: Any) -> Any:
    """Restores `step` into the structure/shardings of `target`.

    target: pytree of jax.ShapeDtypeStruct (with .sharding) or arrays.
    """
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    return self._manager.restore(step, args=ocp.args.StandardRestore(abstract))

  def restore_as_saved(self, step: int) -> Any:
    """Restores `step` as saved (numpy/jax arrays on the default device)."""
    return self._manager.restore(step, args=ocp.args.StandardRestore())

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
