"""Checks of `config.preprocess`, shared by config validation and the pipeline.

Free of TensorFlow and JAX so that configs are checked before either starts.
Every check raises ConfigError (a ValueError) with one line naming the field
and the value;
values may be of any type (command-line overrides of tuple or None fields are
parsed as Python literals).
"""

from __future__ import annotations

from typing import Any

from vmoe.config import ConfigError, fail, is_int, is_number, is_pair

TRAIN_CROPS = ('random_resized', 'pad_random_crop', 'resize')
RESIZE_METHODS = ('bilinear', 'bicubic', 'nearest', 'area', 'lanczos3',
                  'lanczos5', 'gaussian', 'mitchellcubic')
NUM_CHANNELS = (1, 3)  # grayscale or RGB; images are converted on decoding
# RandAugment magnitudes: big_vision's levels are magnitude / 10 of each op's
# range, not clipped (its presets use up to 20).
MAX_RANDAUG_MAGNITUDE = 30


def _fail(field: str, value: Any, why: str) -> None:
  fail(f'config.preprocess.{field}', value, why, ConfigError)


def check_preprocess(pp) -> None:
  """Validates config.preprocess (a ConfigDict or dict)."""
  size = pp.get('image_size')
  if not is_int(size) or size <= 0:
    _fail('image_size', size, 'must be a positive integer')
  if pp.get('num_channels') not in NUM_CHANNELS or isinstance(
      pp.get('num_channels'), bool):
    _fail('num_channels', pp.get('num_channels'),
          f'must be one of {NUM_CHANNELS} (grayscale or RGB)')
  if pp.get('train_crop') not in TRAIN_CROPS:
    _fail('train_crop', pp.get('train_crop'), f'is not one of {TRAIN_CROPS}')
  method = pp.get('resize_method', 'bilinear')
  if method not in RESIZE_METHODS:
    _fail('resize_method', method, f'is not one of {RESIZE_METHODS}')
  value_range = pp.get('value_range')
  if not is_pair(value_range) or not value_range[0] < value_range[1]:
    _fail('value_range', value_range, 'must be (low, high) with low < high')
  alpha = pp.get('mixup_alpha', 0.0)
  if not is_number(alpha) or alpha < 0:
    _fail('mixup_alpha', alpha, 'must be a number >= 0')
  scale = pp.get('crop_scale', (0.08, 1.0))
  if not is_pair(scale) or not 0 < scale[0] <= scale[1] <= 1:
    _fail('crop_scale', scale, 'must be (low, high) with 0 < low <= high <= 1')
  ratio = pp.get('crop_ratio', (3 / 4, 4 / 3))
  if not is_pair(ratio) or not 0 < ratio[0] <= ratio[1]:
    _fail('crop_ratio', ratio, 'must be (low, high) with 0 < low <= high')
  padding = pp.get('crop_padding', 0)
  if not is_int(padding) or padding < 0:
    _fail('crop_padding', padding, 'must be an integer >= 0')
  frac = pp.get('eval_crop_fraction', 1.0)
  if not is_number(frac) or not 0 < frac <= 1:
    _fail('eval_crop_fraction', frac, 'must be in (0, 1]')
  for name in ('flip', 'antialias'):
    if not isinstance(pp.get(name, False), bool):
      _fail(name, pp.get(name), 'must be True or False')
  randaug = pp.get('randaug', None)
  if randaug is not None and not (
      isinstance(randaug, (tuple, list)) and len(randaug) == 2
      and is_int(randaug[0]) and randaug[0] >= 0 and is_number(randaug[1])
      and 0 <= randaug[1] <= MAX_RANDAUG_MAGNITUDE):
    _fail('randaug', randaug, '(RandAugment) must be None or (num_layers, '
          f'magnitude) with num_layers >= 0 and 0 <= magnitude <= '
          f'{MAX_RANDAUG_MAGNITUDE}')
