"""Device meshes and shardings built from `config.mesh`.

`config.mesh` maps mesh axis names to sizes (-1: all remaining devices), in the
fixed order of `MESH_AXES`. The global batch is split over every mesh axis (data
x expert); parameters are replicated unless a rule shards them.
"""

from __future__ import annotations

import math

import jax
import ml_collections
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ('data', 'expert')


def mesh_shape(config: ml_collections.ConfigDict,
               num_devices: int) -> dict[str, int]:
  """Resolves -1 in `config.mesh`; raises ValueError naming the bad field."""
  sizes = {}
  for name in config.mesh:
    if name not in MESH_AXES:
      raise ValueError(f'config.mesh.{name} is not a mesh axis; use {MESH_AXES}')
  for name in MESH_AXES:
    size = config.mesh.get(name, 1)
    if not isinstance(size, int) or (size < 1 and size != -1):
      raise ValueError(f'config.mesh.{name}={size!r} must be a positive '
                       'integer or -1 (all remaining devices)')
    sizes[name] = size
  free = [n for n, s in sizes.items() if s == -1]
  if len(free) > 1:
    raise ValueError(f'config.mesh has -1 for several axes {free}; at most one')
  fixed = math.prod(s for s in sizes.values() if s != -1)
  if free:
    if num_devices % fixed:
      raise ValueError(f'config.mesh={dict(config.mesh)} fixed axes (product '
                       f'{fixed}) do not divide the {num_devices} devices')
    sizes[free[0]] = num_devices // fixed
  elif fixed != num_devices:
    raise ValueError(f'config.mesh={dict(config.mesh)} has {fixed} devices but '
                     f'{num_devices} are available')
  return sizes


def validate_mesh_config(config: ml_collections.ConfigDict,
                         num_devices: int | None = None) -> None:
  num_devices = num_devices or jax.device_count()
  sizes = mesh_shape(config, num_devices)
  for name in ('batch_size', 'eval_batch_size'):
    value = config[name]
    if value % num_devices or value % jax.process_count():
      raise ValueError(f'config.{name}={value} is not divisible by the '
                       f'{num_devices} devices of mesh {sizes} '
                       f'({jax.process_count()} processes)')


def create_mesh(config: ml_collections.ConfigDict) -> Mesh:
  sizes = mesh_shape(config, jax.device_count())
  return jax.make_mesh(tuple(sizes[n] for n in MESH_AXES), MESH_AXES,
                       axis_types=(AxisType.Auto,) * len(MESH_AXES))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over all mesh axes."""
  return NamedSharding(mesh, P(mesh.axis_names))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def state_shardings(mesh: Mesh, abstract_state) -> dict:
  """Sharding of every leaf of the train state (replicated)."""
  return jax.tree.map(lambda _: replicated(mesh), abstract_state)


def global_batch(local_batch: dict[str, np.ndarray],
                 sharding: NamedSharding) -> dict[str, jax.Array]:
  """Per-process numpy batch -> global jax.Arrays sharded along the batch."""
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, x),
      local_batch)
