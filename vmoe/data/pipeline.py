"""The input pipeline: per-process numpy batches for training and evaluation.

Batch dict shapes (b: local batch = global batch // process_count, H = W =
config.preprocess.image_size, C = config.preprocess.num_channels, K = number
of classes):
  train: {'image': float32 [b, H, W, C], 'labels': float32 [b, K]}
  eval:  {'image': float32 [b, H, W, C], 'label': int32 [b], 'mask': float32 [b]}

The training stream is a deterministic function of (config, process_index,
process_count): `train_iterator(config, start_step=n)` yields bit-identical
batches to the n-th batch onwards of a fresh iterator, which is what makes
resumed runs equal uninterrupted ones. Evaluation pads the last batch (mask
0) so that every process yields the same number of batches.

`config.dataset.source` says where the examples come from
(`vmoe.data.base`): 'tfds' (default: prepared TFDS datasets through
tf.data, the only source that imports TensorFlow), 'arrays' (an .npz file,
or the embedded `digits`), 'folder' (class folders of image files, read with
grain) or 'synthetic'. Every source preprocesses the same way.

Config fields read: seed, batch_size, eval_batch_size (global sizes);
dataset.{source, name, data_dir, train_split, eval_split} and per source
dataset.{download, cache, shuffle_buffer, image_key, label_key} (tfds),
dataset.num_workers (folder), dataset.{num_classes, num_examples}
(synthetic); preprocess.{image_size, num_channels, train_crop
('random_resized' | 'pad_random_crop' | 'resize'), crop_scale,
crop_padding, flip, value_range, mixup_alpha, resize_method, randaug} and,
optional: preprocess.crop_ratio (aspect-ratio range of 'random_resized',
default (3/4, 4/3)), preprocess.eval_crop_fraction (eval: resize the short
side to image_size / fraction, then central crop; default 1.0),
preprocess.antialias (default False).
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from vmoe.data import base
from vmoe.data import embedded
from vmoe.data import np_ops
from vmoe.data import preprocess_config
from vmoe.data.base import DataError, DatasetNotFoundError, MissingPackageError  # pylint: disable=unused-import

EMBEDDED_DATASETS = tuple(embedded.EMBEDDED)
TRAIN_CROPS = preprocess_config.TRAIN_CROPS
RESIZE_METHODS = preprocess_config.RESIZE_METHODS
SOURCES = base.names()

Batch = base.Batch


def source(dataset_cfg) -> base.Source:
  """The data source of `config.dataset`."""
  return base.get_source(dataset_cfg)


def prepare_dataset(dataset_cfg) -> base.Source:
  """Checks that `config.dataset` names a readable dataset (building an
  embedded TFDS dataset on first use); DataError otherwise."""
  src = source(dataset_cfg)
  src.prepare()
  return src


def num_examples(dataset_cfg, split: str) -> int:
  """Examples in `split` of `config.dataset` (sliced like 'train[:90%]')."""
  return source(dataset_cfg).num_examples(split)


def num_classes(dataset_cfg) -> int:
  """Number of classes K of the dataset's labels."""
  return source(dataset_cfg).num_classes()


def label_names(dataset_cfg) -> list[str] | None:
  """Class names by label id, None when the dataset has none."""
  return source(dataset_cfg).label_names()


def check_data(config, *, process_count: int = 1) -> None:
  """Every data error that can be known before training, as one-line
  DataErrors (DatasetNotFoundError for a dataset that is not prepared)."""
  base.check_preprocess(config.preprocess)
  base.check_fields(config.dataset)
  src = prepare_dataset(config.dataset)
  src.check(config, process_count=process_count)


def train_iterator(config, *, start_step: int = 0, process_index: int = 0,
                   process_count: int = 1) -> Iterator[Batch]:
  """Infinite iterator over this process's training batches from
  `start_step` (see the module docstring)."""
  return source(config.dataset).train_iterator(
      config, start_step=start_step, process_index=process_index,
      process_count=process_count)


def num_eval_batches(config, *, process_count: int = 1) -> int:
  """Batches per process of `eval_iterator` (the same on every process)."""
  return source(config.dataset).num_eval_batches(
      config, process_count=process_count)


def eval_iterator(config, *, process_index: int = 0,
                  process_count: int = 1) -> Iterator[Batch]:
  """One pass over this process's share of config.dataset.eval_split, in a
  fixed order, padded to `num_eval_batches` batches (mask 0); each real
  example appears exactly once across all processes."""
  return source(config.dataset).eval_iterator(
      config, process_index=process_index, process_count=process_count)


def eval_image(image, pp) -> np.ndarray:
  """Encoded image bytes (JPEG/PNG/...) or a uint8 [h, w, c] array -> float32
  [S, S, C] preprocessed as the eval split (equal to the TFDS source's
  preprocessing to float32 rounding); pp: config.preprocess."""
  base.check_preprocess(pp)
  try:
    np_ops.check_supported(pp)
  except ValueError as e:  # e.g. a bicubic resize: TensorFlow's
    base.require('tensorflow_datasets', base.TFDS_PIP, str(e).split(';')[0])
    from vmoe.data import tfds_source  # pylint: disable=g-import-not-at-top
    return tfds_source.eval_image_tf(image, pp)
  image = np_ops.eval_image(np_ops.decode(image, pp.num_channels), pp)
  return np_ops.normalise(image, pp.value_range)
