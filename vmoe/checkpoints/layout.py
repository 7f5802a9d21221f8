"""Checkpoints across the scanned and unscanned layouts (`model.scan_layers`).

A run with `model.scan_layers=True` stores stacked parameters
('stacks/{n}/unit/{j}/...' [reps, ...], `vmoe.nn.scan`), one without stores
'blocks/{i}/...'. Both hold the same function, and every reader converts:

  * our checkpoints read for `init_from` and inference come out unscanned
    (`ours.read_flat`), whatever layout they were saved in;
  * `import_params` and `init_from` fill a scanned model from unscanned
    parameters;
  * `convert_state` turns a train state restored in the other layout (a run
    resumed after `model.scan_layers` changed) into the run's, on its
    devices.

The conversion is by name and works on any tree holding parameters (the
optimizer's moments included), whatever the prefix.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vmoe.nn import scan


def _name(entry) -> str:
  for attr in ('key', 'idx', 'name'):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def flatten(tree: Any) -> tuple[dict[str, Any], Any]:
  """({'/'-joined path: leaf}, treedef) of a pytree."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
  return {'/'.join(_name(k) for k in path): leaf
          for path, leaf in leaves}, treedef


def unflatten_as(tree: Any, flat: dict[str, Any]) -> Any:
  """`tree`'s structure with the leaves of `flat` (by path)."""
  names, treedef = flatten(tree)
  missing = [n for n in names if n not in flat]
  if missing:
    raise ValueError(f'{missing[0]} is missing after the layout conversion')
  return jax.tree_util.tree_unflatten(treedef, [flat[n] for n in names])


def is_scanned(tree: Any) -> bool:
  return scan.is_scanned(flatten(tree)[0])


def _stack_host(leaves):
  return np.stack([np.asarray(x) for x in leaves])


def to_canonical_flat(flat: dict[str, Any]) -> dict[str, Any]:
  """A flat dict of host arrays in the unscanned layout."""
  if not scan.is_scanned(flat):
    return flat
  return scan.to_canonical(flat, scan.infer_layout(flat),
                           lambda a, t: np.asarray(a)[t])


def canonical_shapes(flat: dict[str, Any]) -> dict[str, Any]:
  """{name: ShapeDtypeStruct} of a flat dict of arrays (or anything with a
  shape and dtype), in the unscanned layout."""
  shapes = {n: jax.ShapeDtypeStruct(np.shape(v), np.dtype(v.dtype))
            for n, v in flat.items()}
  if not scan.is_scanned(shapes):
    return shapes
  return scan.to_canonical(
      shapes, scan.infer_layout(shapes),
      lambda a, t: jax.ShapeDtypeStruct(a.shape[1:], a.dtype))


def to_layout_flat(flat: dict[str, Any], like: dict[str, Any]
                   ) -> dict[str, Any]:
  """Unscanned flat host arrays in the layout of the flat dict `like`."""
  if not scan.is_scanned(like):
    return flat
  return scan.from_canonical(flat, scan.infer_layout(like), _stack_host)


def convert_state(restored: Any, abstract_state: Any) -> Any:
  """A restored train state (any layout) in the layout, structure and
  shardings of `abstract_state` (ShapeDtypeStructs with shardings); the
  conversion runs jitted on the devices."""
  source = scan.infer_layout(flatten(restored)[0])
  target = scan.infer_layout(flatten(abstract_state)[0])
  shardings = jax.tree.map(lambda a: a.sharding, abstract_state)

  def convert(state):
    flat = flatten(state)[0]
    if source != target:
      flat = scan.from_canonical(
          scan.to_canonical(flat, source, lambda a, t: a[t]), target,
          jnp.stack)
    return unflatten_as(abstract_state, flat)

  return jax.jit(convert, out_shardings=shardings)(restored)
