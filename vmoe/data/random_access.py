"""The pipeline of random-access sources (arrays, folder, synthetic), in numpy.

A random-access source only says how many records a split has and how to
read record i (an encoded image or a uint8 array, and its label). This
module turns that into the batches of `vmoe.data.pipeline`, the same for
every such source:

  training stream of process p (n records in its share, b local batch):
    position q = 0, 1, 2, ...   ->  epoch e = q // n, i = q % n
    record = permutation_e[i]   (permutation_e: a full shuffle of the share,
                                 seeded by (seed, p, e))
    example = augment(decode(record)), random draws seeded by (seed, p, q)
    batch t = positions [t*b, (t+1)*b), then mixup seeded by (seed, p, t)

so every batch is a pure function of (config, p, process count, t):
`train_iterator(start_step=t)` starts at batch t exactly, with nothing read
or decoded for the batches before it. Every epoch is a full shuffle
(`config.dataset.shuffle_buffer` asks for no more). Sources that decode images
(folder) run the per-example work in grain's thread pool
(`config.dataset.num_workers` threads); the others run it inline. Both give
the same batches.

Shares: process p of P reads records [p*n // P, (p+1)*n // P) of a split
(contiguous, like `tfds.split_for_jax_process`); evaluation pads every
process to the same number of batches with masked examples.

Splits: a name, optionally sliced like TFDS: 'train[:90%]', 'train[1000:]',
'test[10%:20%]' (percentages round to the closest record).
"""

from __future__ import annotations

import math
import re
import threading
from typing import Any, Iterator, Sequence

import numpy as np

from vmoe.data import base
from vmoe.data import np_ops
from vmoe.data.base import Batch, DataError

_SPLIT = re.compile(r'^([\w\-]+)(?:\[((?:-?\d+%?)?):((?:-?\d+%?)?)\])?$')


def parse_split(split: str, field: str) -> tuple[str, str | None, str | None]:
  """'train[:90%]' -> ('train', None, '90%'); DataError naming `field`."""
  m = _SPLIT.match(split) if isinstance(split, str) else None
  if not m:
    raise DataError(f'{field}={split!r} is not a split name, optionally '
                    "sliced (e.g. 'train', 'train[:90%]', 'train[1000:]')")
  name, start, stop = m.groups()
  return name, start or None, stop or None


def _bound(value: str | None, n: int, default: int) -> int:
  if value is None:
    return default
  if value.endswith('%'):
    index = round(n * int(value[:-1]) / 100)
  else:
    index = int(value)
  if index < 0:
    index += n
  return min(max(index, 0), n)


def slice_range(split: str, n: int, field: str) -> range:
  """The record indices of `split` in a split of n records."""
  _, start, stop = parse_split(split, field)
  return range(_bound(start, n, 0), _bound(stop, n, n))


def process_share(n: int, process_index: int, process_count: int) -> range:
  return range(process_index * n // process_count,
               (process_index + 1) * n // process_count)


class Records:
  """The records of one split: `len()` and `read(i) -> (image, label)`,
  image = encoded bytes or a uint8 [h, w, c] array, label an int."""

  def __len__(self) -> int:
    raise NotImplementedError

  def read(self, index: int) -> tuple[Any, int]:
    raise NotImplementedError

  def describe(self, index: int) -> str:
    """How an error names record `index` (a file for file records)."""
    return f'example {index}'


class _Subset(Records):
  """Records `indices` of `records` (a slice or a process share)."""

  def __init__(self, records: Records, indices: range):
    self.records, self.indices = records, indices

  def __len__(self):
    return len(self.indices)

  def read(self, index):
    return self.records.read(self.indices[index])

  def describe(self, index):
    return self.records.describe(self.indices[index])


class RandomAccessSource(base.Source):
  """A source whose splits are `Records`. Subclasses implement `split_names`,
  `split_records`, `num_classes` (and `label_names`, `check_source`), and set
  DECODES_IMAGES when records are encoded files (then grain's threads do the
  per-example work)."""

  DECODES_IMAGES = False
  # Any shuffle_buffer is accepted: every epoch is a full shuffle, at least
  # as random as any buffer (ImageNet recipes set one for TFDS).
  FIELDS = ('shuffle_buffer',)

  def split_names(self) -> list[str]:
    """The splits the data has."""
    raise NotImplementedError

  def split_records(self, split: str, pp=None) -> Records:
    """All records of the split called `split` (one of `split_names`; no
    slicing); pp: config.preprocess of the reader, None when only counting
    (generated records take their shape from it)."""
    raise NotImplementedError

  def check_source(self, config) -> None:
    """Source-specific checks (files, fields) before training."""

  # -- the Source interface ---------------------------------------------------

  def records(self, split: str, field: str = 'split', pp=None) -> Records:
    name, _, _ = parse_split(split, field)
    names = self.split_names()
    if name not in names:
      raise DataError(f'{field}={split!r} is not a split of '
                      f'config.dataset.name={self.dataset_cfg.get("name")!r} '
                      f'(splits: {", ".join(sorted(names))})')
    whole = self.split_records(name, pp)
    return _Subset(whole, slice_range(split, len(whole), field))

  def num_examples(self, split: str) -> int:
    return len(self.records(split))

  def check(self, config, *, process_count: int) -> None:
    base.check_preprocess(config.preprocess)
    try:
      np_ops.check_supported(config.preprocess)
    except ValueError as e:
      raise DataError(str(e)) from None
    base.local_batch(config.batch_size, process_count, 'config.batch_size')
    base.local_batch(config.eval_batch_size, process_count,
                     'config.eval_batch_size')
    self.check_source(config)
    k = self.num_classes()
    dcfg = config.dataset
    for field, split in (('config.dataset.train_split', dcfg.train_split),
                         ('config.dataset.eval_split', dcfg.eval_split)):
      records = self.records(split, field, config.preprocess)
      if len(records) == 0:
        raise DataError(f'{field}={split!r} has no examples')
      _, label = records.read(0)
      if not 0 <= int(label) < k:
        raise DataError(f'{field}={split!r}: label {label} of the first '
                        f'example is not in [0, {k})')
    n = self.num_examples(dcfg.train_split)
    for index in range(process_count):
      if not len(process_share(n, index, process_count)):
        raise DataError(
            f'config.dataset.train_split={dcfg.train_split!r} has no examples '
            f'for process {index} of {process_count}')

  def train_iterator(self, config, *, start_step: int, process_index: int,
                     process_count: int) -> Iterator[Batch]:
    b = base.stream_batch(config, 'batch_size', process_index,
                          process_count, start_step)
    pp = config.preprocess
    records = self.records(config.dataset.train_split,
                           'config.dataset.train_split', pp)
    share = _Subset(records, process_share(len(records), process_index,
                                           process_count))
    if not len(share):
      raise ValueError(f'config.dataset.train_split has no examples for '
                       f'process {process_index}/{process_count}')
    stream = _TrainStream(share, pp, seed=int(config.seed),
                          process_index=process_index, k=self.num_classes(),
                          field='config.dataset.train_split')
    alpha = float(pp.get('mixup_alpha', 0.0))

    def finish(step: int, examples: Sequence[tuple[np.ndarray, int]]
               ) -> Batch:
      batch = _stack(examples, self.num_classes())
      if alpha > 0:
        batch = np_ops.mixup(batch, np_ops.example_rng(
            config.seed, base.MIXUP, process_index, step), alpha)
      return batch

    return _run(stream.example, finish, start=start_step * b, batch=b,
                first_step=start_step,
                threads=self._threads(config) if self.DECODES_IMAGES else 0)

  def num_eval_batches(self, config, *, process_count: int) -> int:
    b = base.local_batch(config.eval_batch_size, process_count,
                         'config.eval_batch_size')
    n = self.num_examples(config.dataset.eval_split)
    largest = max(len(process_share(n, i, process_count))
                  for i in range(process_count))
    return max(1, math.ceil(largest / b))

  def eval_iterator(self, config, *, process_index: int,
                    process_count: int) -> Iterator[Batch]:
    b = base.stream_batch(config, 'eval_batch_size', process_index,
                          process_count)
    pp = config.preprocess
    records = self.records(config.dataset.eval_split,
                           'config.dataset.eval_split', pp)
    share = _Subset(records, process_share(len(records), process_index,
                                           process_count))
    steps = self.num_eval_batches(config, process_count=process_count)
    field = 'config.dataset.eval_split'
    s, c = pp.image_size, pp.num_channels

    def example(index: int):
      if index >= len(share):  # padding: masked, never counted
        return np.zeros((s, s, c), np.float32), 0, 0.0
      image, label = _decoded(share, index, c, field)
      image = np_ops.eval_image(image, pp)
      return np_ops.normalise(image, pp.value_range), label, 1.0

    def finish(step: int, examples) -> Batch:
      del step
      images, labels, masks = zip(*examples)
      return {'image': np.stack(images), 'label': np.asarray(labels, np.int32),
              'mask': np.asarray(masks, np.float32)}

    return _run(example, finish, start=0, batch=b, first_step=0,
                num_batches=steps,
                threads=self._threads(config) if self.DECODES_IMAGES else 0)

  def _threads(self, config) -> int:
    return int(config.dataset.get('num_workers', 0) or 8)


def _decoded(records: Records, index: int, num_channels: int,
             field: str) -> tuple[np.ndarray, int]:
  """(uint8 [h, w, C] image, label) of record `index`; a record that cannot
  be read or decoded is a one-line DataError naming it."""
  try:
    image, label = records.read(index)
    return np_ops.decode(image, num_channels), int(label)
  except DataError:
    raise
  except (OSError, ValueError) as e:  # PIL's errors are OSErrors
    raise DataError(f'{field}: cannot read {records.describe(index)}: '
                    f'{type(e).__name__}: {e}') from None


class _TrainStream:
  """position -> (augmented float32 image [S, S, C], label)."""

  def __init__(self, records: Records, pp, *, seed: int, process_index: int,
               k: int, field: str):
    self.records, self.pp, self.seed = records, pp, seed
    self.process_index, self.k, self.field = process_index, k, field
    self._lock = threading.Lock()
    self._epoch, self._perm = None, None

  def permutation(self, epoch: int) -> np.ndarray:
    with self._lock:  # grain's threads share the current epoch's shuffle
      if self._epoch != epoch:
        rng = np_ops.example_rng(self.seed, base.SHUFFLE,
                                 self.process_index, epoch)
        self._epoch, self._perm = epoch, rng.permutation(len(self.records))
      return self._perm

  def example(self, position: int) -> tuple[np.ndarray, int]:
    epoch, i = divmod(position, len(self.records))
    pp = self.pp
    image, label = _decoded(self.records, int(self.permutation(epoch)[i]),
                            pp.num_channels, self.field)
    rng = np_ops.example_rng(self.seed, base.AUGMENT, self.process_index,
                             position)
    image = np_ops.train_image(image, rng, pp)
    return np_ops.normalise(image, pp.value_range), label


def _stack(examples, k: int) -> Batch:
  images, labels = zip(*examples)
  return {'image': np.stack(images),
          'labels': np.eye(k, dtype=np.float32)[np.asarray(labels)]}


def _run(example, finish, *, start: int, batch: int, first_step: int,
         threads: int, num_batches: int | None = None) -> Iterator[Batch]:
  """Batches finish(t, [example(q) for q in batch t's positions]) for
  t = first_step, first_step + 1, ... (num_batches of them, or forever);
  batch t holds positions start + (t - first_step) * batch + [0, batch)."""
  stop = None if num_batches is None else start + num_batches * batch
  if threads:
    grain = base.require('grain', 'grain', 'reading image files (config.'
                         "dataset.source='folder')")
    # Threads work per example (decoding dominates), in order; batches are
    # assembled from the prefetched examples.
    ds = grain.MapDataset.range(start, stop if stop is not None else 2**62)
    options = grain.ReadOptions(num_threads=threads,
                                prefetch_buffer_size=max(batch, 4 * threads))
    it = ds.map(example).to_iter_dataset(options)
    it = it.batch(batch, drop_remainder=True, batch_fn=list)
    it = it.map_with_index(lambda t, examples: finish(first_step + t,
                                                      examples))
    return _errors_on_read(iter(it))
  return _inline(example, finish, start, batch, first_step, stop)


def _inline(example, finish, start, batch, first_step, stop):
  step, position = first_step, start
  while stop is None or position < stop:
    yield finish(step, [example(q) for q in range(position,
                                                  position + batch)])
    step, position = step + 1, position + batch


def _errors_on_read(iterator: Iterator[Batch]) -> Iterator[Batch]:
  """grain wraps errors raised in its threads: give back the DataError."""
  while True:
    try:
      batch = next(iterator)
    except StopIteration:
      return
    except Exception as e:  # pylint: disable=broad-except
      cause = e
      while cause is not None and not isinstance(cause, DataError):
        cause = cause.__cause__ or cause.__context__
      if cause is None:
        raise
      raise cause from None
    yield batch
