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

Config fields read: seed, batch_size, eval_batch_size (global sizes);
dataset.{name, data_dir, train_split, eval_split, download, cache,
shuffle_buffer, image_key, label_key}; preprocess.{image_size, num_channels,
train_crop ('random_resized' | 'pad_random_crop' | 'resize'), crop_scale,
crop_padding, flip, value_range, mixup_alpha, resize_method} and, optional:
preprocess.crop_ratio (aspect-ratio range of 'random_resized', default
(3/4, 4/3)), preprocess.eval_crop_fraction (eval: resize the short side to
image_size / fraction, then central crop; default 1.0), preprocess.antialias
(default False).

The data come from TFDS (`vmoe.data.tfds_source`).
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np

from vmoe.data import preprocess_config
from vmoe.data import tfds_source
from vmoe.data.base import DataError, DatasetNotFoundError  # pylint: disable=unused-import

EMBEDDED_DATASETS = tfds_source.EMBEDDED_DATASETS
TRAIN_CROPS = preprocess_config.TRAIN_CROPS
RESIZE_METHODS = preprocess_config.RESIZE_METHODS

Batch = dict[str, np.ndarray]


def prepare_dataset(dataset_cfg) -> Any:
  """Checks that `config.dataset` names a readable dataset (building the
  embedded one on first use); DataError otherwise."""
  return tfds_source.prepare_dataset(dataset_cfg)


def num_examples(dataset_cfg, split: str) -> int:
  """Examples in `split` of `config.dataset` (any TFDS split expression)."""
  return tfds_source.num_examples(dataset_cfg, split)


def num_classes(dataset_cfg) -> int:
  """Number of classes K of the dataset's labels."""
  return tfds_source.num_classes(dataset_cfg)


def check_data(config, *, process_count: int = 1) -> None:
  """Every data error that can be known before training, as one-line
  DataErrors (DatasetNotFoundError for a dataset that is not prepared)."""
  tfds_source.check_data(config, process_count=process_count)


def train_iterator(config, *, start_step: int = 0, process_index: int = 0,
                   process_count: int = 1) -> Iterator[Batch]:
  """Infinite iterator over this process's training batches from
  `start_step` (see the module docstring)."""
  return tfds_source.train_iterator(config, start_step=start_step,
                                    process_index=process_index,
                                    process_count=process_count)


def num_eval_batches(config, *, process_count: int = 1) -> int:
  """Batches per process of `eval_iterator` (the same on every process)."""
  return tfds_source.num_eval_batches(config, process_count=process_count)


def eval_iterator(config, *, process_index: int = 0,
                  process_count: int = 1) -> Iterator[Batch]:
  """One pass over this process's share of config.dataset.eval_split, in a
  fixed order, padded to `num_eval_batches` batches (mask 0); each real
  example appears exactly once across all processes."""
  return tfds_source.eval_iterator(config, process_index=process_index,
                                   process_count=process_count)


def eval_image(image, pp) -> np.ndarray:
  """Encoded image bytes (JPEG/PNG/...) or a uint8 [h, w, c] array -> float32
  [S, S, C] preprocessed exactly as the eval split; pp: config.preprocess."""
  return tfds_source.eval_image(image, pp)
