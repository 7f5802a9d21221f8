"""Reader of google-research/vmoe checkpoints (no vmoe dependency).

vmoe writes a checkpoint PREFIX as one index file PREFIX.index and N data
shards PREFIX.data-0000i-of-0000N, all msgpack (vmoe/checkpoints/
serialization.py, the format of the gs://vmoe_checkpoints releases):

  index: {'shard_count': N, 'index': tree of IndexInfo, 'version': '20220622'
          (absent in checkpoints written before that date: same layout)}
    IndexInfo = (ShapedArray(shape, dtype), [SliceNd of each chunk],
                 [shard holding each chunk])
  shard: {'__msgpack_array_chunk_a87ca2__': True,
          '<leaf number>': [[[flat sub-chunks], SliceNd], ...]}

Leaves are numbered in the order `jax.tree_util.tree_flatten` visits the
saved tree; for the nested dicts of parameters that is sorted key order.
Custom msgpack extension types (vmoe's `_MsgpackExtType`): 1 ndarray (Flax's
(shape, dtype name, bytes) encoding), 2 complex, 3 numpy scalar,
4 ShapedArray, 5 Slice, 6 SliceNd, 8 IndexInfo. The released checkpoints
hold the model parameters (optionally under 'params' or 'target').
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import msgpack
import numpy as np

from vmoe.checkpoints import mapping
from vmoe.checkpoints.source import CheckpointError, Source, fix_dtype

FORMAT = 'vmoe'
_CHUNKS_KEY = '__msgpack_array_chunk_a87ca2__'
_FLAX_CHUNKED_KEY = '__msgpack_chunked_array__'


@dataclasses.dataclass(frozen=True)
class _ShapedArray:
  shape: tuple[int, ...]
  dtype: np.dtype


@dataclasses.dataclass(frozen=True)
class _IndexInfo:
  global_shape: _ShapedArray
  global_slices: tuple[tuple[slice, ...], ...]
  shards: tuple[int, ...]


def _dtype(name) -> np.dtype:
  name = name.decode() if isinstance(name, bytes) else name
  if name == 'bfloat16':
    import ml_dtypes  # pylint: disable=g-import-not-at-top
    return np.dtype(ml_dtypes.bfloat16)
  return np.dtype(name)


def _ndarray(data: bytes) -> np.ndarray:
  shape, dtype_name, buffer = msgpack.unpackb(data, raw=True)
  return np.frombuffer(buffer, dtype=_dtype(dtype_name)).reshape(shape)


def _slice(data: bytes) -> slice:
  return slice(*msgpack.unpackb(data, raw=True))


def _slice_nd(data: bytes) -> tuple[slice, ...]:
  return tuple(_slice(s) for s in msgpack.unpackb(data, raw=True))


def _shaped_array(data: bytes) -> _ShapedArray:
  shape, dtype_name, _, _ = msgpack.unpackb(data, raw=True)
  return _ShapedArray(tuple(shape), _dtype(dtype_name))


def _index_info(data: bytes) -> _IndexInfo:
  shape, slices, shards = msgpack.unpackb(data, raw=True)
  return _IndexInfo(_shaped_array(shape), tuple(_slice_nd(s) for s in slices),
                    tuple(shards))


_EXT = {1: _ndarray, 3: lambda d: _ndarray(d)[()], 4: _shaped_array,
        5: _slice, 6: _slice_nd, 8: _index_info,
        2: lambda d: complex(*msgpack.unpackb(d))}


def _ext_hook(code: int, data: bytes) -> Any:
  if code not in _EXT:
    raise CheckpointError(f'unknown msgpack extension type {code} in a vmoe '
                          'checkpoint')
  return _EXT[code](data)


def _object_hook(obj: dict) -> Any:
  if obj.get(_FLAX_CHUNKED_KEY):  # flax.serialization's split large arrays
    chunks = [obj['chunks'][k] for k in sorted(obj['chunks'], key=int)]
    return np.concatenate([c.ravel() for c in chunks]).reshape(obj['shape'])
  return obj


def _unpack(path: str) -> Any:
  try:
    with open(path, 'rb') as f:
      return msgpack.unpackb(f.read(), ext_hook=_ext_hook,
                             object_hook=_object_hook, raw=False,
                             strict_map_key=False)
  except (msgpack.UnpackException, ValueError, TypeError) as e:
    if isinstance(e, CheckpointError):
      raise
    raise CheckpointError(f'{path!r} is not a vmoe checkpoint file '
                          f'({type(e).__name__}: {e})') from None


def prefix_of(path: str) -> str:
  """Accepts the prefix, its '.index' file or a data shard."""
  if path.endswith('.index'):
    return path[:-len('.index')]
  head, sep, _ = path.rpartition('.data-')
  return head if sep else path


def is_vmoe(path: str) -> bool:
  return os.path.isfile(prefix_of(path) + '.index')


def _leaves(tree: Any, prefix: str = '') -> list[tuple[str, Any]]:
  """(name, leaf) in jax.tree_util.tree_flatten order (dict keys sorted)."""
  if isinstance(tree, dict):
    out = []
    for k in sorted(tree):
      out += _leaves(tree[k], f'{prefix}{k}/')
    return out
  if isinstance(tree, (list, tuple)):
    out = []
    for i, v in enumerate(tree):
      out += _leaves(v, f'{prefix}{i}/')
    return out
  return [] if tree is None else [(prefix[:-1], tree)]


def read_flat(path: str) -> dict[str, np.ndarray]:
  """All arrays of the checkpoint, keyed by '/'-joined name."""
  prefix = prefix_of(path)
  if not os.path.isfile(prefix + '.index'):
    raise CheckpointError(f'vmoe checkpoint {prefix!r}: {prefix}.index does '
                          'not exist')
  index = _unpack(prefix + '.index')
  if not isinstance(index, dict) or 'index' not in index:
    raise CheckpointError(f'{prefix}.index is not a vmoe checkpoint index')
  leaves = _leaves(index['index'])
  arrays = [np.zeros(info.global_shape.shape, info.global_shape.dtype)
            for _, info in leaves]
  filled = [0] * len(leaves)
  count = int(index['shard_count'])
  for shard in range(count):
    shard_path = f'{prefix}.data-{shard:05d}-of-{count:05d}'
    if not os.path.isfile(shard_path):
      raise CheckpointError(f'vmoe checkpoint {prefix!r}: data shard '
                            f'{shard_path} is missing')
    contents = _unpack(shard_path)
    for key, chunks in contents.items():
      if key == _CHUNKS_KEY:
        continue
      i = int(key)
      for subchunks, global_slice in chunks:
        shape = tuple(s.stop - s.start for s in global_slice)
        data = np.concatenate([np.asarray(c).ravel() for c in subchunks])
        arrays[i][global_slice] = data.reshape(shape)
        filled[i] += data.size
  for (name, info), n in zip(leaves, filled):
    if n != int(np.prod(info.global_shape.shape, dtype=np.int64)):
      raise CheckpointError(f'vmoe checkpoint {prefix!r}: {name} is '
                            'incomplete in the data shards')
  return {name: fix_dtype(a) for (name, _), a in zip(leaves, arrays)}


def read(path: str) -> Source:
  flat = mapping.unwrap(read_flat(path), ('params/', 'target/',
                                            'optimizer/target/'))
  return mapping.from_reference(flat, fmt=FORMAT, path=prefix_of(path))
