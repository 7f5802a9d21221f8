"""The arrays source: images and labels held in numpy arrays of an .npz file.

  config.dataset.source = 'arrays'
  config.dataset.name = 'digits'            # embedded (vmoe/data/digits.npz)
                      | '/path/to/data.npz' # any file with the layout below

Layout of the file: for every split `<s>`, `<s>_image` uint8 [n, h, w, c]
(or [n, h, w]) and `<s>_label` int [n] in [0, K); optionally `label_names`
[K] (strings) and `num_classes` (a scalar). K is `num_classes`, else the
length of `label_names`, else 1 + the largest label of any split. Splits
are sliced like TFDS ('train[:90%]'). The file is read once per process;
everything else is `vmoe.data.random_access`.
"""

from __future__ import annotations

import functools
import os

import numpy as np

from vmoe.data import embedded
from vmoe.data import random_access
from vmoe.data.base import DataError, DatasetNotFoundError


@functools.lru_cache(maxsize=8)
def _load_file(path: str) -> dict[str, np.ndarray]:
  try:
    with np.load(path, allow_pickle=False) as f:
      return {k: f[k] for k in f.files}
  except (OSError, ValueError) as e:
    raise DataError(f'config.dataset.name={path!r} is not a readable .npz '
                    f'file: {type(e).__name__}: {e}') from None


class _ArrayRecords(random_access.Records):

  def __init__(self, images: np.ndarray, labels: np.ndarray):
    self.images, self.labels = images, labels

  def __len__(self):
    return len(self.labels)

  def read(self, index):
    return self.images[index], int(self.labels[index])


class ArraysSource(random_access.RandomAccessSource):
  """Splits of an .npz file (or of the embedded `digits`)."""

  def _arrays(self) -> dict[str, np.ndarray]:
    name = self.dataset_cfg.get('name')
    if name in embedded.EMBEDDED:
      return embedded.load(name)
    if not isinstance(name, str) or not name.endswith('.npz'):
      raise DataError(
          f'config.dataset.name={name!r}: the arrays source reads an embedded '
          f"dataset ({', '.join(embedded.EMBEDDED)}) or a path to an .npz "
          'file')
    path = os.path.expanduser(name)
    if not os.path.isfile(path):
      raise DatasetNotFoundError(f'config.dataset.name={name!r}: no such file')
    return _load_file(path)

  def prepare(self) -> None:
    self._arrays()

  def split_names(self) -> list[str]:
    arrays = self._arrays()
    return [k[:-len('_label')] for k in arrays
            if k.endswith('_label') and k[:-len('_label')] + '_image' in arrays]

  def split_records(self, split: str, pp=None) -> random_access.Records:
    del pp  # stored records have their own shape
    arrays = self._arrays()
    images, labels = arrays[f'{split}_image'], arrays[f'{split}_label']
    if images.dtype != np.uint8:
      raise DataError(f'config.dataset.name={self.dataset_cfg.get("name")!r}: '
                      f'{split}_image is {images.dtype}, not uint8')
    if len(images) != len(labels) or images.ndim not in (3, 4):
      raise DataError(f'config.dataset.name={self.dataset_cfg.get("name")!r}: '
                      f'{split}_image {images.shape} and {split}_label '
                      f'{labels.shape} are not [n, h, w(, c)] and [n]')
    return _ArrayRecords(images, labels)

  def check_source(self, config) -> None:
    k = self.num_classes()
    for split in self.split_names():
      labels = self._arrays()[f'{split}_label']
      bad = labels[(labels < 0) | (labels >= k)]
      if bad.size:
        raise DataError(
            f'config.dataset.name={self.dataset_cfg.get("name")!r}: '
            f'{split}_label holds {int(bad[0])}, not a class in [0, {k})')

  def num_classes(self) -> int:
    arrays = self._arrays()
    if 'num_classes' in arrays:
      return int(arrays['num_classes'])
    if 'label_names' in arrays:
      return len(arrays['label_names'])
    return 1 + max(int(np.max(v)) for k, v in arrays.items()
                   if k.endswith('_label') and len(v))

  def label_names(self) -> list[str] | None:
    names = self._arrays().get('label_names')
    return None if names is None else [str(n) for n in names]
