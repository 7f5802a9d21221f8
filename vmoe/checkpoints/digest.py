"""Content digests of arrays: what a checkpoint records of every array it
saves, and checks when the array is read back.

The digest of an array is a 64-bit multilinear hash of its elements (the
MULTILINEAR family of Lemire & Kaser, "Strongly universal string hashing is
fast", The Computer Journal 2014):

    D(x) = sum_i K_i * w_i   (mod 2^64)

  w_i  element i as an unsigned integer of its own width (the bits of a
       float32 / int32, the 16 bits of a bfloat16, ...; an 8-byte element is
       two 32-bit words), so w_i < 2^32;
  K_i  an odd 64-bit key of the element's position: the product (mod 2^64)
       of one key per axis, `axis_keys(a, j)` for index j along axis a,
       itself low(a, j mod 2^15) * high(a, j div 2^15) with low and high
       splitmix64 of the axis and the index part, lowest bit set.

Why this hash:

  * a change confined to one element always changes D: K_i is odd and the
    change of w_i is non-zero and smaller than 2^32 in magnitude, so their
    product is not a multiple of 2^64. Changes of several elements cancel
    only if the keys happen to satisfy one linear relation, which for these
    pseudo-random keys is about as likely as 2^-32 (bit flips of equal
    position in two words) or less;
  * D is linear in the elements: a process sums over the shards it holds
    (with the global indices of their elements) and the partial digests of
    all processes add up to the digest of the whole array, whatever the mesh.
    A checkpoint written on one mesh is verified on another, and no host
    ever gathers a whole array;
  * it is a dot product of words with keys: numpy computes it at about the
    speed of reading the array (`bench/checkpoint_digest.py`).

The keys are fixed (a checkpoint verifies in any process, any version); D is
a check against corruption, not against an adversary.

`block_digest` is the computation; `reference_digest` (pure Python integers,
element by element) defines it for the tests.
"""

from __future__ import annotations

import concurrent.futures
import os
from typing import Any, Iterable, Sequence

import numpy as np

MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_LOW_SEED = 0xD1B54A32D192ED03  # separate key streams per axis and part
_HIGH_SEED = 0x8CB92BA72F3D8DD7
LOW_BITS = 15  # an index j = high * 2^15 + low along an axis
# Words widened to 64 bits at a time (~256 KiB: in cache).
_CHUNK_ELEMENTS = 1 << LOW_BITS


def _splitmix64(x: np.ndarray) -> np.ndarray:
  """splitmix64's output function on uint64 (wrapping arithmetic)."""
  z = x + np.uint64(_GOLDEN)
  z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
  z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  return z ^ (z >> np.uint64(31))


def _odd_keys(seed: int, axis: int, start: int, size: int) -> np.ndarray:
  index = np.arange(start, start + size, dtype=np.uint64)
  stream = np.uint64(((axis + 1) * seed) & MASK64)
  return _splitmix64(index + stream) | np.uint64(1)


_low_tables: dict[int, np.ndarray] = {}


def _low_table(axis: int) -> np.ndarray:
  """uint64 [2^15]: the low-part keys of `axis` (computed once)."""
  if axis not in _low_tables:
    _low_tables[axis] = _odd_keys(_LOW_SEED, axis, 0, 1 << LOW_BITS)
  return _low_tables[axis]


def axis_keys(axis: int, start: int, size: int) -> np.ndarray:
  """uint64 [size]: the odd keys of indices start..start+size-1 of `axis`,
  low[j mod 2^15] * high[j div 2^15] (mod 2^64): two small tables instead
  of one key per index of a long axis."""
  index = np.arange(start, start + size, dtype=np.uint64)
  low = _low_table(axis)[index & np.uint64((1 << LOW_BITS) - 1)]
  first = start >> LOW_BITS
  high = _odd_keys(_HIGH_SEED, axis, first,
                   ((start + size - 1) >> LOW_BITS) - first + 1)
  return low * high[(index >> np.uint64(LOW_BITS)) - np.uint64(first)]


def words(block: np.ndarray) -> np.ndarray:
  """The elements of `block` as unsigned integers of their width (uint8,
  uint16, uint32); elements of 8 or more bytes become a trailing axis of
  32-bit words."""
  block = np.asarray(block)
  if not block.flags.c_contiguous:
    block = np.ascontiguousarray(block)
  size = block.dtype.itemsize
  if size in (1, 2, 4):
    return block.view(np.dtype(f'uint{8 * size}'))
  if size % 4 == 0:
    return block.view(np.uint32).reshape(block.shape + (size // 4,))
  raise TypeError(f'no content digest for dtype {block.dtype}')


def block_digest(block: np.ndarray, offsets: Sequence[int] = ()) -> int:
  """Partial digest of the elements of `block`, a block of a larger array
  whose first element has index `offsets` there (default: the whole array).

  The digest of an array is the sum (mod 2^64) of the partial digests of
  blocks that cover each element once.
  """
  w = words(block)
  offsets = tuple(int(o) for o in offsets) or (0,) * np.ndim(block)
  offsets += (0,) * (w.ndim - len(offsets))  # the word axis of wide types
  if w.ndim == 0:
    w, offsets = w.reshape(1), (0,)
  if w.size == 0:
    return 0
  axis, last, origin = w.ndim - 1, w.shape[-1], offsets[-1]
  rows = w.reshape(-1, last)
  low = _low_table(axis)
  # Segments of the last axis within one high part: [begin, end) here.
  segments = []
  begin = 0
  while begin < last:
    j = origin + begin
    end = min(last, begin + (1 << LOW_BITS) - (j & ((1 << LOW_BITS) - 1)))
    segments.append((begin, end, j & ((1 << LOW_BITS) - 1),
                     _odd_keys(_HIGH_SEED, axis, j >> LOW_BITS, 1)[0]))
    begin = end
  partial = np.zeros(rows.shape[0], np.uint64)
  cols = min(last, _CHUNK_ELEMENTS)
  step = max(1, _CHUNK_ELEMENTS // cols)
  wide = np.empty((min(step, rows.shape[0]), cols), np.uint64)
  dots = np.empty(wide.shape[0], np.uint64)
  for start in range(0, rows.shape[0], step):
    n = min(step, rows.shape[0] - start)
    for begin, end, low_start, high in segments:
      part = wide[:n, :end - begin]
      np.copyto(part, rows[start:start + n, begin:end])  # widen
      np.dot(part, low[low_start:low_start + end - begin], out=dots[:n])
      dots[:n] *= high  # wraps mod 2^64, as every product and sum here
      partial[start:start + n] += dots[:n]
  reduced = partial.reshape(w.shape[:-1])
  for a in reversed(range(w.ndim - 1)):
    reduced = np.dot(reduced, axis_keys(a, offsets[a], w.shape[a]))
  return int(reduced)


def reference_digest(array: np.ndarray) -> int:
  """The definition, element by element in Python integers (slow; tests)."""
  w = words(array)
  if w.ndim == 0:
    w = w.reshape(1)
  keys = [[int(k) for k in axis_keys(a, 0, n)] for a, n in enumerate(w.shape)]
  total = 0
  for index in np.ndindex(*w.shape):
    key = 1
    for a, i in enumerate(index):
      key = key * keys[a][i] & MASK64
    total = (total + key * int(w[index])) & MASK64
  return total


def _blocks(leaf: Any) -> list[tuple[Any, tuple[int, ...]]]:
  """(block, offsets) of the elements of `leaf` this process holds once:
  the addressable shards of a jax.Array with replica id 0, or the whole of
  a numpy array / scalar."""
  shards = getattr(leaf, 'addressable_shards', None)
  if shards is None:
    return [(leaf, ())]
  out = []
  for shard in shards:
    if shard.replica_id != 0:
      continue
    offsets = tuple(s.start or 0 for s in shard.index)
    out.append((shard.data, offsets))
  return out


def _host(block: Any) -> np.ndarray:
  import jax  # pylint: disable=g-import-not-at-top
  if isinstance(block, jax.Array) and jax.dtypes.issubdtype(
      block.dtype, jax.dtypes.prng_key):
    block = jax.random.key_data(block)
  return np.asarray(block)


def partial_digests(leaves: Iterable[Any], *, threads: int | None = None
                    ) -> list[int]:
  """Per leaf, the partial digest of the elements this process holds (all of
  them in a single process); summed over processes: the leaves' digests."""
  tasks = []  # (leaf index, block, offsets)
  count = 0
  for i, leaf in enumerate(leaves):
    count += 1
    tasks.extend((i, b, o) for b, o in _blocks(leaf))
  threads = threads or min(8, os.cpu_count() or 1)
  run = lambda t: block_digest(_host(t[1]), t[2])
  if threads > 1 and len(tasks) > 1:
    # numpy releases the GIL in the widening copies and the dot products.
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
      values = list(pool.map(run, tasks))
  else:
    values = [run(t) for t in tasks]
  out = [0] * count
  for (i, _, _), value in zip(tasks, values):
    out[i] = (out[i] + value) & MASK64
  return out


def sum_over_processes(partials: Sequence[int]) -> list[int]:
  """The digests from every process's `partial_digests` (a collective: all
  processes call it together; the identity with one process)."""
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_count() == 1:
    return list(partials)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  # 64-bit values as two 32-bit halves (jax arrays are 32-bit by default).
  halves = np.array([[p >> 32, p & 0xFFFFFFFF] for p in partials],
                    np.uint32).reshape(-1, 2)
  gathered = np.asarray(multihost_utils.process_allgather(halves))
  totals = []
  for j in range(len(partials)):
    total = 0
    for proc in gathered:
      total += (int(proc[j, 0]) << 32) | int(proc[j, 1])
    totals.append(total & MASK64)
  return totals


def hex64(value: int) -> str:
  return f'{value & MASK64:016x}'
