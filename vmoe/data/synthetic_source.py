"""The synthetic source: fixed random images and labels of any shape.

  config.dataset.source = 'synthetic'
  config.dataset.num_classes = 10          # K
  config.dataset.num_examples = (2048, 512)  # (train, eval) examples

Images have the preprocessing's shape (preprocess.image_size, num_channels)
and are generated, not stored: example i of a split is its class's
prototype (uint8 noise seeded by the class) plus per-example noise seeded by
(split, i), with label i % K. The classes are learnable, so a short run's
loss falls, and the data costs no I/O or decoding: for benchmarks and
accelerator smoke runs. Splits are 'train' and 'test' (sliced like TFDS).
"""

from __future__ import annotations

import functools

import numpy as np

from vmoe.config import is_int
from vmoe.data import random_access
from vmoe.data.base import DataError

SPLITS = ('train', 'test')
# Per-example noise around the class prototype (in pixel units).
NOISE_STD = 48.0


class _SyntheticRecords(random_access.Records):

  def __init__(self, n: int, split_index: int, shape, k: int):
    self.n, self.split_index, self.shape, self.k = n, split_index, shape, k

  @functools.cached_property
  def prototypes(self) -> np.ndarray:
    return np.stack([np.random.default_rng([7, c]).integers(
        0, 256, self.shape).astype(np.float32) for c in range(self.k)])

  def __len__(self):
    return self.n

  def read(self, index):
    label = index % self.k
    noise = np.random.default_rng([self.split_index, index]).normal(
        0.0, NOISE_STD, self.shape)
    image = np.clip(np.rint(self.prototypes[label] + noise), 0, 255)
    return image.astype(np.uint8), label


class SyntheticSource(random_access.RandomAccessSource):
  """Generated examples; no files."""

  FIELDS = ('shuffle_buffer', 'num_classes', 'num_examples')

  def _sizes(self) -> tuple[int, int]:
    sizes = self.dataset_cfg.get('num_examples')
    if (not isinstance(sizes, (tuple, list)) or len(sizes) != 2
        or not all(is_int(n) and n > 0 for n in sizes)):
      raise DataError(f'config.dataset.num_examples={sizes!r} must be (train, '
                      "eval) positive integers for config.dataset.source="
                      "'synthetic'")
    return int(sizes[0]), int(sizes[1])

  def num_classes(self) -> int:
    k = self.dataset_cfg.get('num_classes')
    if not is_int(k) or k < 1:
      raise DataError(f'config.dataset.num_classes={k!r} must be a positive '
                      "integer for config.dataset.source='synthetic'")
    return k

  def prepare(self) -> None:
    self._sizes()
    self.num_classes()

  def split_names(self) -> list[str]:
    return list(SPLITS)

  def split_records(self, split: str, pp=None) -> random_access.Records:
    shape = (None if pp is None else
             (pp.image_size, pp.image_size, pp.num_channels))
    return _SyntheticRecords(self._sizes()[SPLITS.index(split)],
                             SPLITS.index(split), shape, self.num_classes())
