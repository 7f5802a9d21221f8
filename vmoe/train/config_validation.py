"""Validation of experiment configs before any work starts.

Every check raises `ConfigError` with one line naming the field and the bad
value, so `main.py` can print it and exit without a traceback and without
touching the workdir.
"""

from __future__ import annotations

import math
from typing import Any

import ml_collections

from vmoe.nn import vit
from vmoe.train import optimizer as optimizer_lib

REQUIRED_FIELDS = (
    'seed', 'batch_size', 'eval_batch_size', 'num_train_steps',
    'log_every_steps', 'eval_every_steps', 'checkpoint_every_steps',
    'max_to_keep', 'dataset.name', 'dataset.data_dir',
    'dataset.train_split', 'dataset.eval_split',
    'preprocess.image_size', 'preprocess.num_channels', 'model.variant',
    'optimizer.name', 'optimizer.learning_rate', 'schedule.name',
    'schedule.warmup_steps')
TRAIN_CROPS = ('random_resized', 'pad_random_crop', 'resize')
DTYPES = ('float32', 'bfloat16', 'float16')


class ConfigError(ValueError):
  """An invalid config value; the message is one line naming the field."""


def _get(config: ml_collections.ConfigDict, path: str) -> Any:
  node = config
  for part in path.split('.'):
    if not isinstance(node, (ml_collections.ConfigDict, dict)) or part not in node:
      raise ConfigError(f'config.{path} is missing (required field)')
    node = node[part]
  return node


def _check(ok: bool, path: str, value: Any, why: str) -> None:
  if not ok:
    raise ConfigError(f'config.{path}={value!r} {why}')


def _is_number(x: Any) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError on the first invalid field."""
  for path in REQUIRED_FIELDS:
    if _get(config, path) is None:
      raise ConfigError(f'config.{path} is missing (required field, got None)')

  for path in ('batch_size', 'eval_batch_size', 'num_train_steps',
               'log_every_steps', 'eval_every_steps', 'checkpoint_every_steps',
               'max_to_keep', 'preprocess.image_size', 'preprocess.num_channels'):
    value = _get(config, path)
    _check(isinstance(value, int) and value > 0, path, value,
           'must be a positive integer')
  _check(isinstance(config.seed, int), 'seed', config.seed, 'must be an integer')

  # Model.
  try:
    _, patch = vit.parse_variant(config.model.variant)
  except ValueError as e:
    raise ConfigError(f'config.{e}') from None
  size = config.preprocess.image_size
  _check(size % patch == 0, 'preprocess.image_size', size,
         f'is not divisible by the patch size {patch} of '
         f'model.variant={config.model.variant!r}')
  _check(config.model.get('pool', 'tok') in ('tok', 'gap'), 'model.pool',
         config.model.get('pool'), "is not one of ('tok', 'gap')")
  _check(config.model.get('dtype', 'float32') in DTYPES, 'model.dtype',
         config.model.get('dtype'), f'is not one of {DTYPES}')
  for path in ('model.dropout', 'model.stochastic_depth', 'label_smoothing'):
    value = _get(config, path)
    _check(_is_number(value) and 0 <= value < 1, path, value,
           'must be in [0, 1)')
  moe = config.model.get('moe')
  if moe is not None:
    from vmoe.nn import moe as moe_lib  # pylint: disable=g-import-not-at-top
    depth = vit.parse_variant(config.model.variant)[0].depth
    try:
      blocks = vit.moe_block_indices(moe.get('layers'), depth)
      moe_lib.validate_moe_config(moe, prefix='model.moe')
    except ValueError as e:
      raise ConfigError(f'config.{e}') from None
    _check(bool(blocks), 'model.moe.layers', moe.get('layers'),
           'selects no block; set model.moe=None for a dense model')

  # Optimizer and schedule.
  opt = config.optimizer
  _check(opt.name in optimizer_lib.OPTIMIZERS, 'optimizer.name', opt.name,
         f'is not one of {optimizer_lib.OPTIMIZERS}')
  _check(_is_number(opt.learning_rate) and opt.learning_rate > 0,
         'optimizer.learning_rate', opt.learning_rate, 'must be positive')
  for name in ('weight_decay', 'grad_clip_norm', 'eps'):
    value = opt.get(name, 0.0)
    _check(_is_number(value) and value >= 0, f'optimizer.{name}', value,
           'must be >= 0')
  for name in ('b1', 'b2', 'momentum'):
    value = opt.get(name, 0.0)
    _check(_is_number(value) and 0 <= value < 1, f'optimizer.{name}', value,
           'must be in [0, 1)')
  sched = config.schedule
  _check(sched.name in optimizer_lib.SCHEDULES, 'schedule.name', sched.name,
         f'is not one of {optimizer_lib.SCHEDULES}')
  _check(isinstance(sched.warmup_steps, int)
         and 0 <= sched.warmup_steps <= config.num_train_steps,
         'schedule.warmup_steps', sched.warmup_steps,
         f'must be in [0, num_train_steps={config.num_train_steps}]')
  _check(_is_number(sched.end_lr_fraction) and 0 <= sched.end_lr_fraction <= 1,
         'schedule.end_lr_fraction', sched.end_lr_fraction, 'must be in [0, 1]')

  # Preprocessing.
  pp = config.preprocess
  _check(pp.train_crop in TRAIN_CROPS, 'preprocess.train_crop', pp.train_crop,
         f'is not one of {TRAIN_CROPS}')
  vr = tuple(pp.value_range)
  _check(len(vr) == 2 and all(map(_is_number, vr)) and vr[0] < vr[1],
         'preprocess.value_range', vr, 'must be (low, high) with low < high')
  _check(_is_number(pp.mixup_alpha) and pp.mixup_alpha >= 0,
         'preprocess.mixup_alpha', pp.mixup_alpha, 'must be >= 0')
  scale = tuple(pp.crop_scale)
  _check(len(scale) == 2 and 0 < scale[0] <= scale[1] <= 1,
         'preprocess.crop_scale', scale, 'must be (low, high) in (0, 1]')

  if 'mesh' in config:
    from vmoe import sharding  # pylint: disable=g-import-not-at-top
    try:
      sharding.validate_mesh_config(config)
    except ValueError as e:
      raise ConfigError(str(e)) from None
