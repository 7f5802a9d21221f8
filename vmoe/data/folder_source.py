"""The folder source: an ImageNet-style tree of class folders of images,
read with grain.

  config.dataset.source = 'folder'
  config.dataset.data_dir = '/data'       # or gs://bucket/data (etils.epath)
  config.dataset.name = 'imagenet'        # the tree: /data/imagenet/
  config.dataset.train_split = 'train'    # /data/imagenet/train/<class>/*.JPEG
  config.dataset.eval_split = 'val'       # /data/imagenet/val/<class>/*.JPEG
  config.dataset.num_workers = 8          # grain threads decoding images

Classes are the sorted sub-folder names of the training split, labels their
indices; an evaluation split may hold a subset of them. Files (JPEG, PNG,
GIF, BMP; any case) are listed once, in an order fixed by a hash of their
class and file name: deterministic, and mixing the classes, so that a slice
('train[:99%]') or a process's share holds every class. Images are
decoded with PIL and preprocessed by `vmoe.data.np_ops`, the per-example
work running in grain's thread pool (`vmoe.data.random_access`); splits are
sliced like TFDS ('train[:99%]').
"""

from __future__ import annotations

import functools
import hashlib

from etils import epath

from vmoe.config import is_int
from vmoe.data import random_access
from vmoe.data.base import DataError, DatasetNotFoundError

EXTENSIONS = ('.jpg', '.jpeg', '.png', '.gif', '.bmp')


def _mixed_order(name: str, path: epath.Path) -> bytes:
  return hashlib.sha1(f'{name}/{path.name}'.encode()).digest()


@functools.lru_cache(maxsize=16)
def _list(root: str) -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
  """(sorted class names, ((class, path), ...)) of a split folder. Files are
  in a fixed order that mixes the classes (by a hash of class/file name,
  as TFDS stores records), so that slices ('train[:99%]') and process
  shares hold every class."""
  classes, files = [], []
  for folder in sorted(epath.Path(root).iterdir(), key=lambda p: p.name):
    if not folder.is_dir():
      continue
    classes.append(folder.name)
    for path in folder.iterdir():
      if path.suffix.lower() in EXTENSIONS:
        files.append((_mixed_order(folder.name, path), folder.name,
                      str(path)))
  files.sort()
  return tuple(classes), tuple((name, path) for _, name, path in files)


class _FileRecords(random_access.Records):

  def __init__(self, files, class_index: dict[str, int]):
    self.files, self.class_index = files, class_index

  def __len__(self):
    return len(self.files)

  def read(self, index):
    name, path = self.files[index]
    return epath.Path(path).read_bytes(), self.class_index[name]

  def describe(self, index):
    return self.files[index][1]


class FolderSource(random_access.RandomAccessSource):
  """Class folders of image files under data_dir/name/<split>/."""

  FIELDS = ('shuffle_buffer', 'num_workers')

  DECODES_IMAGES = True

  def _root(self) -> epath.Path:
    data_dir, name = self.dataset_cfg.get('data_dir'), self.dataset_cfg.get(
        'name')
    if not isinstance(data_dir, str) or not data_dir:
      raise DataError(f'config.dataset.data_dir={data_dir!r} must be the '
                      "folder holding config.dataset.name's tree")
    root = epath.Path(data_dir).expanduser() / str(name)
    if not root.is_dir():
      raise DatasetNotFoundError(
          f'config.dataset.name={name!r}: no folder {root} (expected '
          f'{root}/<split>/<class>/<image files>)')
    return root

  def split_names(self) -> list[str]:
    return [p.name for p in self._root().iterdir() if p.is_dir()]

  def _split_dir(self, split: str) -> str:
    path = self._root() / split
    if not path.is_dir():
      raise DataError(f'split {split!r} is not a folder of {self._root()} '
                      f'(splits: {", ".join(sorted(self.split_names()))})')
    return str(path)

  @functools.cached_property
  def classes(self) -> tuple[str, ...]:
    field = 'config.dataset.train_split'
    split, _, _ = random_access.parse_split(
        self.dataset_cfg.get('train_split', 'train'), field)
    if split not in self.split_names():
      raise DataError(f'{field}={split!r} is not a folder of {self._root()} '
                      f'(splits: {", ".join(sorted(self.split_names()))})')
    classes, _ = _list(self._split_dir(split))
    if not classes:
      raise DataError(f'{self._split_dir(split)} holds no class folders')
    return classes

  def prepare(self) -> None:
    self._root()

  def num_classes(self) -> int:
    return len(self.classes)

  def label_names(self) -> list[str]:
    return list(self.classes)

  def split_records(self, split: str, pp=None) -> random_access.Records:
    del pp  # stored records have their own shape
    classes, files = _list(self._split_dir(split))
    index = {name: i for i, name in enumerate(self.classes)}
    unknown = [c for c in classes if c not in index]
    if unknown:
      raise DataError(f'split {split!r} has class folders that the training '
                      f'split has not: {", ".join(unknown[:3])}')
    return _FileRecords(files, index)

  def check_source(self, config) -> None:
    workers = config.dataset.get('num_workers', 0)
    if not is_int(workers) or workers < 0:
      raise DataError(f'config.dataset.num_workers={workers!r} must be an '
                      'integer >= 0 (0: 8 threads)')
    from vmoe.data import base  # pylint: disable=g-import-not-at-top
    base.require('grain', 'grain', "config.dataset.source='folder'")
