"""Device meshes, logical-axis partitioning rules and shardings from the config.

`config.mesh` maps mesh axis names to sizes (-1: all remaining devices), in the
fixed order of `MESH_AXES`, over all devices of all processes. The global batch
is split over every mesh axis (data x expert).

Parameters carry `logical_axes` metadata (one name per array axis, see
`vmoe.nn.layers.param`). `config.partitioning` (optional) maps them to mesh
axes, in the style of flax's logical partitioning:

  partitioning.rules: sequence of (logical_name, mesh_axis | None); logical
    names without a rule are replicated. Default: (('expert', 'expert'),), so
    expert weights [e, ...] are split over the 'expert' axis (expert
    parallelism) and everything else is replicated.
  partitioning.overrides: sequence of (path_regex, spec) applied before the
    rules, first match wins; spec is a tuple of mesh axes / None per array
    axis (() = replicated). Default: (('(^|/)router/', ()),): router
    parameters share the logical name 'expert' with the expert weights but
    are small and read by every device for its own tokens, so they stay
    replicated.
  partitioning.fsdp_min_size: FSDP-style override, 0 = off. A parameter with
    at least this many elements (and whose path matches `fsdp_regex`) gets its
    largest still-unsharded axis that the 'data' axis size divides sharded over
    'data'. Optimizer-state leaves follow their parameter.
  partitioning.fsdp_regex: regex on the '/'-joined parameter path (default
    '.*').

Everything in here runs before the first step; errors are ConfigErrors with one
line naming the config field.
"""

from __future__ import annotations

import collections
import functools
import math
import re
from typing import Any, Callable, Iterable, Sequence

import jax
import ml_collections
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from vmoe.config import ConfigError, is_int

MESH_AXES = ('data', 'expert')
# Mesh axes the batch (and MoE groups) is split over, outermost first.
BATCH_AXES = MESH_AXES
DEFAULT_RULES = (('expert', 'expert'),)
DEFAULT_OVERRIDES = ((r'(^|/)router/', ()),)


# ----------------------------------------------------------------------------
# Mesh.
# ----------------------------------------------------------------------------


def mesh_shape(config: ml_collections.ConfigDict,
               num_devices: int) -> dict[str, int]:
  """Resolves -1 in `config.mesh`; raises ConfigError naming the bad field."""
  sizes = {}
  for name in config.mesh:
    if name not in MESH_AXES:
      raise ConfigError(f'config.mesh.{name} is not a mesh axis; use '
                        f'{MESH_AXES}')
  for name in MESH_AXES:
    size = config.mesh.get(name, 1)
    if not is_int(size) or (size < 1 and size != -1):
      raise ConfigError(f'config.mesh.{name}={size!r} must be a positive '
                        'integer or -1 (all remaining devices)')
    sizes[name] = size
  free = [n for n, s in sizes.items() if s == -1]
  if len(free) > 1:
    raise ConfigError(f'config.mesh has -1 for several axes {free}; at '
                      'most one')
  fixed = math.prod(s for s in sizes.values() if s != -1)
  if free:
    if num_devices % fixed:
      raise ConfigError(f'config.mesh={dict(config.mesh)} fixed axes (product '
                        f'{fixed}) do not divide the {num_devices} devices')
    sizes[free[0]] = num_devices // fixed
  elif fixed != num_devices:
    raise ConfigError(f'config.mesh={dict(config.mesh)} has {fixed} devices '
                      f'but {num_devices} are available')
  return sizes


def partitioning_rules(config: ml_collections.ConfigDict
                       ) -> dict[str, str | None]:
  """`config.partitioning.rules` as {logical_name: mesh_axis | None}."""
  part = config.get('partitioning') or {}
  rules = part.get('rules', DEFAULT_RULES)
  if rules is None:
    rules = DEFAULT_RULES
  out = {}
  for rule in rules:
    if (not isinstance(rule, (tuple, list)) or len(rule) != 2
        or not isinstance(rule[0], str)):
      raise ConfigError(f'config.partitioning.rules entry {rule!r} must be a '
                        '(logical_name, mesh_axis or None) pair')
    name, axis = rule
    if axis is not None and axis not in MESH_AXES:
      raise ConfigError(f'config.partitioning.rules maps {name!r} to {axis!r}, '
                        f'not a mesh axis of {MESH_AXES} (or None)')
    out[name] = axis
  return out


def partitioning_overrides(config: ml_collections.ConfigDict
                           ) -> tuple[tuple[str, tuple], ...]:
  """`config.partitioning.overrides` as ((regex, spec tuple), ...)."""
  part = config.get('partitioning') or {}
  overrides = part.get('overrides', DEFAULT_OVERRIDES)
  if overrides is None:
    overrides = DEFAULT_OVERRIDES
  out = []
  for entry in overrides:
    ok = isinstance(entry, (tuple, list)) and len(entry) == 2
    if ok:
      regex, spec = entry
      spec = tuple(spec or ())
      ok = isinstance(regex, str) and all(
          a is None or a in MESH_AXES for a in spec)
    if not ok:
      raise ConfigError(f'config.partitioning.overrides entry {entry!r} must '
                        f'be (path_regex, spec) with spec a tuple of {MESH_AXES} '
                        'or None')
    _check_regex(regex, 'config.partitioning.overrides regex ')
    out.append((regex, spec))
  return tuple(out)


def _check_regex(regex: str, field: str) -> None:
  """Raises a one-line ConfigError naming the field (`field` is its prefix in
  the message, e.g. 'config.partitioning.fsdp_regex=') if `regex` does not
  compile."""
  try:
    re.compile(regex)
  except re.error as e:
    raise ConfigError(f'{field}{regex!r} is not a valid regex ({e})') from None


def fsdp_options(config) -> tuple[int, str]:
  part = config.get('partitioning') or {}
  min_size = part.get('fsdp_min_size', 0) or 0
  regex = part.get('fsdp_regex', '.*') or '.*'
  if not is_int(min_size) or min_size < 0:
    raise ConfigError(f'config.partitioning.fsdp_min_size={min_size!r} must be '
                      'an integer >= 0 (0 = off)')
  _check_regex(regex, 'config.partitioning.fsdp_regex=')
  return min_size, regex


def create_mesh(config: ml_collections.ConfigDict,
                devices: Sequence[jax.Device] | None = None) -> Mesh:
  """The (data, expert) mesh over all global devices (or `devices`)."""
  num = len(devices) if devices is not None else jax.device_count()
  sizes = mesh_shape(config, num)
  return jax.make_mesh(tuple(sizes[n] for n in MESH_AXES), MESH_AXES,
                       axis_types=(AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over all mesh axes."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def with_mesh(fn: Callable, mesh: Mesh) -> Callable:
  """`fn` traced with `mesh` as the context mesh.

  Layers that place their own collectives (the expert-parallel MoE layer,
  `vmoe.nn.moe`) read the mesh with `jax.sharding.get_abstract_mesh()`.
  """

  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return fn(*args, **kwargs)

  return wrapped


def context_batch_axes() -> tuple[tuple[str, ...], dict[str, int]] | None:
  """(batch mesh axes, axis sizes) of the context mesh; None if 1 device.

  Called at trace time by layers that run per-device code with `shard_map`.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty:
    return None
  sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
  if not all(a in sizes for a in BATCH_AXES) or math.prod(sizes.values()) == 1:
    return None
  return BATCH_AXES, sizes


# ----------------------------------------------------------------------------
# Parameter and train-state shardings.
# ----------------------------------------------------------------------------


def _key_name(k) -> Any:
  for attr in ('key', 'name', 'idx'):
    if hasattr(k, attr):
      return getattr(k, attr)
  return str(k)


def _path_str(path: Iterable[Any]) -> str:
  return '/'.join(str(p) for p in path)


def param_spec(path: tuple, shape: tuple[int, ...],
               logical_axes: Sequence[str | None] | None,
               rules: dict[str, str | None], mesh_sizes: dict[str, int],
               fsdp_min_size: int = 0, fsdp_regex: str = '.*',
               overrides: Sequence[tuple[str, tuple]] = ()) -> P:
  """PartitionSpec of one parameter from its logical axes and the rules.

  The first override whose regex matches the '/'-joined path gives the spec
  as is. Otherwise each logical axis maps through `rules`; a mesh axis is used
  at most once per parameter (first axis wins), and an axis whose size the
  mesh axis does not divide stays replicated; then the FSDP rule may shard
  one more axis over 'data'.
  """
  name = _path_str(path)
  for regex, spec in overrides:
    if re.search(regex, name):
      return P(*spec)
  logical_axes = tuple(logical_axes or (None,) * len(shape))
  spec: list[str | None] = []
  used = set()
  for logical, dim in zip(logical_axes, shape):
    axis = rules.get(logical) if logical is not None else None
    if (axis is None or axis in used or mesh_sizes.get(axis, 1) == 1
        or dim % mesh_sizes[axis]):
      spec.append(None)
    else:
      spec.append(axis)
      used.add(axis)
  data = mesh_sizes.get('data', 1)
  if (fsdp_min_size and data > 1 and 'data' not in used
      and math.prod(shape) >= fsdp_min_size
      and re.search(fsdp_regex, name)):
    free = [i for i, (a, dim) in enumerate(zip(spec, shape))
            if a is None and dim % data == 0]
    if free:
      best = max(free, key=lambda i: (shape[i], -i))
      spec[best] = 'data'
  while spec and spec[-1] is None:
    spec.pop()
  return P(*spec)


def param_specs(abstract_model, config: ml_collections.ConfigDict,
                mesh_sizes: dict[str, int]) -> dict:
  """Pure dict (as `nnx.to_pure_dict`) of PartitionSpecs of every nnx.Param."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  rules = partitioning_rules(config)
  overrides = partitioning_overrides(config)
  min_size, regex = fsdp_options(config)
  state = nnx.state(abstract_model, nnx.Param)
  flat = {}
  for path, var in nnx.to_flat_state(state):
    axes = var.get_metadata().get('logical_axes')
    flat[path] = param_spec(path, tuple(var.shape), axes, rules, mesh_sizes,
                            min_size, regex, overrides)
  specs = nnx.to_pure_dict(state)
  for path, spec in flat.items():
    node = specs
    for k in path[:-1]:
      node = node[k]
    node[path[-1]] = spec
  return specs


def state_shardings(mesh: Mesh, abstract_state, params_spec: dict | None = None
                    ) -> Any:
  """Sharding of every leaf of the train state.

  `abstract_state['params']` follows `params_spec` (a pure dict of
  PartitionSpecs, replicated if None); an optimizer-state leaf whose key path
  ends with a parameter's path and has its shape (Adam's mu/nu, momentum)
  follows that parameter; all other leaves (counts, step) are replicated.
  """
  if params_spec is None:
    return jax.tree.map(lambda _: replicated(mesh), abstract_state)
  by_path = {}
  for path, spec in jax.tree_util.tree_flatten_with_path(
      params_spec, is_leaf=lambda x: isinstance(x, P))[0]:
    by_path[tuple(_key_name(k) for k in path)] = spec
  lengths = sorted({len(p) for p in by_path}, reverse=True)

  def leaf_sharding(path, leaf):
    names = tuple(_key_name(k) for k in path)
    for n in lengths:
      spec = by_path.get(names[-n:]) if len(names) >= n else None
      if spec is not None and len(spec) <= len(getattr(leaf, 'shape', ())):
        return NamedSharding(mesh, spec)
    return replicated(mesh)

  return jax.tree_util.tree_map_with_path(leaf_sharding, abstract_state)


# ----------------------------------------------------------------------------
# Summary.
# ----------------------------------------------------------------------------


def _bytes_per_device(shape, dtype, spec: P, mesh_sizes: dict[str, int]) -> int:
  shards = 1
  for entry in spec:
    for axis in (entry if isinstance(entry, tuple) else (entry,)):
      if axis is not None:
        shards *= mesh_sizes[axis]
  return math.prod(shape) * np.dtype(dtype).itemsize // shards


def sharding_summary(abstract_state, state_sharding, mesh: Mesh,
                     top: int = 6) -> str:
  """A short table: parameters grouped by spec, the largest ones, totals.

  Bytes are per device; 'train state' adds the optimizer state.
  """
  sizes = dict(zip(mesh.axis_names, mesh.devices.shape))
  rows = []
  for (path, leaf), sh in zip(
      jax.tree_util.tree_flatten_with_path(abstract_state['params'])[0],
      jax.tree.leaves(state_sharding['params'])):
    name = _path_str(_key_name(k) for k in path)
    rows.append((name, tuple(leaf.shape), sh.spec,
                 _bytes_per_device(leaf.shape, leaf.dtype, sh.spec, sizes),
                 math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize))
  total_state = sum(
      _bytes_per_device(leaf.shape, leaf.dtype, sh.spec, sizes)
      for leaf, sh in zip(jax.tree.leaves(abstract_state),
                          jax.tree.leaves(state_sharding)))
  groups = collections.defaultdict(lambda: [0, 0, 0])
  for _, _, spec, per_dev, full in rows:
    g = groups[str(spec)]
    g[0] += 1
    g[1] += per_dev
    g[2] += full
  mb = lambda b: f'{b / 2**20:9.2f} MiB'
  lines = [f'sharding: mesh {sizes} over {mesh.devices.size} devices '
           f'({jax.process_count()} processes)',
           f'  {"spec":<34} {"params":>6} {"per device":>13} {"full":>13}']
  for spec, (count, per_dev, full) in sorted(groups.items(),
                                              key=lambda kv: -kv[1][2]):
    lines.append(f'  {spec:<34} {count:>6} {mb(per_dev)} {mb(full)}')
  lines.append(f'  largest {min(top, len(rows))} parameters:')
  for name, shape, spec, per_dev, _ in sorted(rows, key=lambda r: -r[4])[:top]:
    lines.append(f'    {name:<40} {str(shape):<18} {str(spec):<28} '
                 f'{mb(per_dev)}')
  lines.append(f'  per device: params {mb(sum(r[3] for r in rows))}, '
               f'train state {mb(total_state)}')
  return '\n'.join(lines)


# ----------------------------------------------------------------------------
# Data.
# ----------------------------------------------------------------------------


def pad_batch(local_batch: dict[str, np.ndarray],
              multiple: int) -> dict[str, np.ndarray]:
  """Pads the leading axis with zero rows up to a multiple of `multiple`.

  For eval batches, whose 'mask' is then 0 on the padding.
  """
  def pad(x):
    extra = -len(x) % multiple
    if not extra:
      return x
    return np.concatenate([x, np.zeros((extra, *x.shape[1:]), x.dtype)])
  return jax.tree.map(pad, local_batch)


def global_batch(local_batch: dict[str, np.ndarray],
                 sharding: NamedSharding) -> dict[str, jax.Array]:
  """Per-process numpy batch -> global jax.Arrays sharded along the batch.

  Each process passes only its own rows (batch_size / process_count); the
  mesh places the devices of one process on a contiguous block of the batch.
  """
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, x),
      local_batch)
