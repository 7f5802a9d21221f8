"""Freezing parameters by regex during fine-tuning (`config.init_from.freeze`).

Frozen parameters get zero updates (`optax.set_to_zero`) and no optimizer
state; the others go through the configured optimizer unchanged (weight
decay and gradient clipping then see only the trained parameters). Names are
our parameter paths, e.g. 'blocks/3/attn/qkv_kernel', matched with
`re.search`: freeze='^(?!head/)' trains the head only.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import optax

TRAIN, FROZEN = 'train', 'frozen'


def param_name(path) -> str:
  return '/'.join(str(getattr(k, 'key', getattr(k, 'idx', k))) for k in path)


def labels(params: Any, regex: str) -> Any:
  """'frozen' / 'train' for every leaf of params (by its path)."""
  pattern = re.compile(regex)
  return jax.tree_util.tree_map_with_path(
      lambda path, _: FROZEN if pattern.search(param_name(path)) else TRAIN,
      params)


def freeze_regex(config) -> str | None:
  """init_from.freeze of a run that starts from a checkpoint, else None."""
  init = config.get('init_from')
  if init is None or init.get('path') in (None, ''):
    return None
  return init.get('freeze')


def wrap_optimizer(tx: optax.GradientTransformation,
                   config) -> optax.GradientTransformation:
  """tx for the trained parameters, zero updates for `init_from.freeze`."""
  regex = freeze_regex(config)
  if not regex:
    return tx
  return optax.multi_transform({TRAIN: tx, FROZEN: optax.set_to_zero()},
                               lambda params: labels(params, regex))
