"""What every data source shares: the source interface and its registry,
errors, and the batch-size arithmetic.

A source (`config.dataset.source`) says where examples come from; the
pipeline (`vmoe.data.pipeline`) asks it for batches. Sources:

  tfds       prepared TFDS datasets read with tf.data (`tfds_source`)
  arrays     numpy arrays of an .npz file, or the embedded `digits`
             (`arrays_source`)
  folder     an ImageNet-style folder of class sub-folders of JPEG / PNG
             files, read with grain (`folder_source`)
  synthetic  fixed random images and labels of any shape
             (`synthetic_source`)

Adding a source = its module (a `Source` subclass; for random access,
`vmoe.data.random_access.RandomAccessSource` does the rest) plus ONE
`register(name, 'module:Class')` line at the end of this file. A source
module is imported on first use, so TensorFlow is imported only when the
TFDS source is asked for.
"""

from __future__ import annotations

import importlib
from typing import Any, Iterator

import numpy as np

from vmoe import config as config_lib
from vmoe.data import preprocess_config

Batch = dict[str, np.ndarray]


class DataError(ValueError):
  """Bad dataset config or unreadable data; the message is one line naming
  the config field or the file."""


class DatasetNotFoundError(DataError):
  """A dataset is unknown or not prepared in `data_dir` (one-line message)."""


class MissingPackageError(DataError, config_lib.MissingPackageError):
  """A package a data source needs is not installed (one line naming the
  `pip install` that fixes it)."""


def require(module: str, pip: str, what: str) -> Any:
  """`import module`, or MissingPackageError naming `pip install <pip>`."""
  try:
    return config_lib.require(module, pip, what)
  except config_lib.MissingPackageError as e:
    raise MissingPackageError(str(e)) from None


def local_batch(global_batch: int, process_count: int, field: str) -> int:
  """This process's share of a global batch size (DataError naming `field`
  unless it divides)."""
  if not config_lib.is_int(global_batch) or global_batch <= 0:
    raise DataError(f'{field}={global_batch!r} must be a positive integer')
  if global_batch % process_count:
    raise DataError(f'{field}={global_batch} is not divisible by the number '
                    f'of processes ({process_count})')
  return global_batch // process_count


def check_process(process_index: int, process_count: int) -> None:
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} must be in '
                     f'[0, process_count={process_count})')


def stream_batch(config, field: str, process_index: int, process_count: int,
                 start_step: int = 0) -> int:
  """The checks of every iterator; returns the local batch of `field`
  ('batch_size' or 'eval_batch_size')."""
  check_process(process_index, process_count)
  b = local_batch(config[field], process_count, f'config.{field}')
  if not isinstance(start_step, int) or start_step < 0:
    raise ValueError(f'start_step={start_step!r} must be a non-negative int')
  check_preprocess(config.preprocess)
  return b


# Stream tags folded into the seed so that the shuffle, augmentation and
# mixup random streams of a source are independent of each other.
SHUFFLE, AUGMENT, MIXUP = 0, 1, 2


def check_preprocess(pp) -> None:
  """Validates config.preprocess before any work (one-line DataError)."""
  try:
    preprocess_config.check_preprocess(pp)
  except ValueError as e:
    raise DataError(str(e)) from None


# Fields of config.dataset that only some sources read, with their defaults
# (vmoe.recipes.common's base config uses these). Every source reads source,
# name, data_dir, train_split and eval_split.
DATASET_DEFAULTS = dict(download=False, cache=False, shuffle_buffer=10_000,
                        image_key='image', label_key='label', num_workers=0,
                        num_classes=None, num_examples=None)


class Source:
  """Where the examples of `config.dataset` come from.

  Built from `config.dataset`; every method raises one-line DataErrors.
  Batch shapes are those of `vmoe.data.pipeline` (b: the local batch).
  FIELDS: the fields of DATASET_DEFAULTS this source reads; setting another
  one away from its default is an error (it would do nothing).
  """
  FIELDS: tuple[str, ...] = ()

  def __init__(self, dataset_cfg):
    self.dataset_cfg = dataset_cfg

  def prepare(self) -> None:
    """Makes the dataset readable (e.g. builds an embedded one) or raises
    DatasetNotFoundError; cheap when repeated."""

  def num_classes(self) -> int:
    raise NotImplementedError

  def num_examples(self, split: str) -> int:
    raise NotImplementedError

  def label_names(self) -> list[str] | None:
    """Class names by label id, None when the data has none."""
    return None

  def check(self, config, *, process_count: int) -> None:
    """Every error knowable before training (splits, files, features, the
    preprocessing this source supports)."""
    raise NotImplementedError

  def train_iterator(self, config, *, start_step: int, process_index: int,
                     process_count: int) -> Iterator[Batch]:
    raise NotImplementedError

  def num_eval_batches(self, config, *, process_count: int) -> int:
    raise NotImplementedError

  def eval_iterator(self, config, *, process_index: int,
                    process_count: int) -> Iterator[Batch]:
    raise NotImplementedError


_REGISTRY: dict[str, Any] = {}
_SOURCES: dict[tuple[str, str], Source] = {}


def register(name: str, target: str) -> None:
  """Registers the Source class `target` ('module:Class') as `name`."""
  if name in _REGISTRY:
    raise ValueError(f'data source {name!r} is registered twice')
  _REGISTRY[name] = target


def names() -> tuple[str, ...]:
  return tuple(_REGISTRY)


def source_name(dataset_cfg) -> str:
  """`config.dataset.source` (default 'tfds'), checked."""
  name = dataset_cfg.get('source', 'tfds')
  if name not in _REGISTRY:
    raise DataError(f'config.dataset.source={name!r} is not one of {names()}')
  return name


# What each source needs beyond the core dependencies.
TFDS_PIP = "'vmoe[tfds]'"  # tensorflow and tensorflow-datasets
_NEEDS = {'tfds': ('tensorflow_datasets', TFDS_PIP)}


def source_class(name: str) -> type[Source]:
  target = _REGISTRY[name]
  if isinstance(target, str):
    if name in _NEEDS:
      require(_NEEDS[name][0], _NEEDS[name][1],
              f'config.dataset.source={name!r}')
    module, _, attr = target.partition(':')
    target = _REGISTRY[name] = getattr(importlib.import_module(module), attr)
  return target


def check_fields(dataset_cfg) -> None:
  """DataError for a field another source reads, set away from its default
  (`--config.dataset.label_key=...` on the arrays source does nothing)."""
  name = source_name(dataset_cfg)
  reads = source_class(name).FIELDS
  for field, default in DATASET_DEFAULTS.items():
    value = dataset_cfg.get(field, default)
    if field not in reads and value != default:
      raise DataError(
          f'config.dataset.{field}={value!r} does not apply to '
          f'config.dataset.source={name!r} (which reads '
          f'{", ".join(reads) or "no source-specific field"}); leave it at '
          f'{default!r}')


def get_source(dataset_cfg) -> Source:
  """The source of `config.dataset` (one instance per distinct config)."""
  name = source_name(dataset_cfg)
  key = (name, repr(sorted(dataset_cfg.items())))
  if key not in _SOURCES:
    _SOURCES[key] = source_class(name)(dataset_cfg)
  return _SOURCES[key]


# Registrations: one line per source.
register('tfds', 'vmoe.data.tfds_source:TfdsSource')
register('arrays', 'vmoe.data.arrays_source:ArraysSource')
register('folder', 'vmoe.data.folder_source:FolderSource')
register('synthetic', 'vmoe.data.synthetic_source:SyntheticSource')
