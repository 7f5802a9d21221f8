"""Validation of experiment configs before any work starts.

Every check raises `ConfigError` with one line naming the field and the bad
value, so `main.py` can print it and exit without a traceback and without
touching the workdir.
"""

from __future__ import annotations

import math
from typing import Any

import ml_collections
import numpy as np

from vmoe.data import preprocess_config
from vmoe.nn import vit
from vmoe.nn.batched_mlp import GELU_FORMS
from vmoe.train import optimizer as optimizer_lib

REQUIRED_FIELDS = (
    'seed', 'batch_size', 'eval_batch_size', 'num_train_steps',
    'log_every_steps', 'eval_every_steps', 'checkpoint_every_steps',
    'max_to_keep', 'dataset.name', 'dataset.data_dir',
    'dataset.train_split', 'dataset.eval_split',
    'preprocess.image_size', 'preprocess.num_channels', 'model.variant',
    'optimizer.name', 'optimizer.learning_rate', 'schedule.name',
    'schedule.warmup_steps')
TRAIN_CROPS = preprocess_config.TRAIN_CROPS
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


def validate_config(config: ml_collections.ConfigDict,
                    resuming: bool = False) -> None:
  """Raises ConfigError on the first invalid field.

  resuming: the workdir holds checkpoints, so `init_from.path` is not read
  (and need not exist any more).

  Values of any type are expected (command-line overrides of None or tuple
  fields are Python literals); a check that a value of an unexpected type
  still trips up becomes a ConfigError too, never a traceback.
  """
  try:
    _validate(config, resuming)
  except ConfigError:
    raise
  except (TypeError, ValueError, KeyError, AttributeError, IndexError) as e:
    lines = [l for l in str(e).splitlines() if l.strip()]
    raise ConfigError(f'config is invalid: {type(e).__name__}: '
                      f'{lines[0] if lines else ""}') from None


def _validate(config: ml_collections.ConfigDict, resuming: bool) -> None:
  for path in REQUIRED_FIELDS:
    if _get(config, path) is None:
      raise ConfigError(f'config.{path} is missing (required field, got None)')

  for path in ('batch_size', 'eval_batch_size', 'num_train_steps',
               'log_every_steps', 'eval_every_steps', 'checkpoint_every_steps',
               'max_to_keep', 'preprocess.image_size', 'preprocess.num_channels'):
    value = _get(config, path)
    _check(isinstance(value, int) and value > 0, path, value,
           'must be a positive integer')
  _check(isinstance(config.seed, int) and not isinstance(config.seed, bool)
         and -2**63 <= config.seed < 2**63, 'seed', config.seed,
         'must be a 64-bit integer')

  # Model.
  try:
    vit_size, patch = vit.model_size(config.model)
  except ValueError as e:
    raise ConfigError(f'config.{e}') from None
  rep = config.model.get('representation_size')
  _check(rep is None or (isinstance(rep, int) and not isinstance(rep, bool)
                         and rep >= 1), 'model.representation_size', rep,
         'must be None or a positive integer')
  size = config.preprocess.image_size
  _check(size % patch == 0, 'preprocess.image_size', size,
         f'is not divisible by the patch size {patch} of '
         f'model.variant={config.model.variant!r}')
  _check(config.model.get('pool', 'tok') in ('tok', 'gap'), 'model.pool',
         config.model.get('pool'), "is not one of ('tok', 'gap')")
  _check(config.model.get('gelu', 'tanh') in GELU_FORMS, 'model.gelu',
         config.model.get('gelu'), f'is not one of {GELU_FORMS}')
  _check(config.model.get('dtype', 'float32') in DTYPES, 'model.dtype',
         config.model.get('dtype'), f'is not one of {DTYPES}')
  for path in ('model.dropout', 'model.stochastic_depth', 'label_smoothing'):
    value = _get(config, path)
    _check(_is_number(value) and 0 <= value < 1, path, value,
           'must be in [0, 1)')
  moe = config.model.get('moe')
  if moe is not None:
    from vmoe.nn import moe as moe_lib  # pylint: disable=g-import-not-at-top
    _check(isinstance(moe, (ml_collections.ConfigDict, dict)), 'model.moe',
           moe, 'must be None (dense) or a ConfigDict of MoE options')
    layers = moe.get('layers')
    _check(layers is None or isinstance(layers, str) or (
        isinstance(layers, (tuple, list)) and all(
            isinstance(i, int) and not isinstance(i, bool) for i in layers)),
           'model.moe.layers', layers, "is not one of 'every:N', 'last:N', "
           "'second_half', 'none' or a tuple of block indices")
    try:
      blocks = vit.moe_block_indices(moe.get('layers'), vit_size.depth)
      moe_lib.validate_moe_config(moe, prefix='model.moe',
                                  mlp_dim=vit_size.mlp_dim,
                                  other_router_options=False)
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
  # Parameters are float32: a larger learning rate is inf there, and its
  # first update would make every parameter NaN/inf.
  _check(abs(opt.learning_rate) <= float(np.finfo(np.float32).max),
         'optimizer.learning_rate', opt.learning_rate,
         'is not finite in float32 (the parameter dtype)')
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
  try:
    preprocess_config.check_preprocess(config.preprocess)
  except ValueError as e:
    raise ConfigError(str(e)) from None

  if 'mesh' in config:
    from vmoe import sharding  # pylint: disable=g-import-not-at-top
    try:
      sharding.validate_mesh_config(
          config, tokens_per_image=vit.num_tokens(
              config.model, config.preprocess.image_size))
    except ValueError as e:
      raise ConfigError(str(e)) from None
  from vmoe.checkpoints import init_from  # pylint: disable=g-import-not-at-top
  init_from.validate_config(config, error=ConfigError,
                            check_path=not resuming)
  from vmoe.evaluate import fewshot  # pylint: disable=g-import-not-at-top
  fewshot.validate_config(config)
