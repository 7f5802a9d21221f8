"""Optimizers and learning-rate schedules (optax), built from `config.optimizer`
and `config.schedule`.

Weight decay semantics: 'adamw' decays weights decoupled from the gradient
(Loshchilov & Hutter 2019, as `optax.adamw`: after Adam's scaling, before the
learning rate, so each step shrinks w by lr(t) * wd; this is
google-research/vmoe's 'adam' with `weight_decay` and the AugReg "wd 0.1"
convention); 'adam' and 'sgd' add the classic L2 term `weight_decay * w` to
the gradient. `optimizer.weight_decay` is a number (every kernel, i.e. every
parameter with ndim >= 2, decays with it) or a sequence of (regex, value)
pairs: each parameter decays with the value of the first regex that
`re.search`es its '/'-joined path (e.g. 'blocks/3/mlp/fc1/kernel'), and not
at all if none does (vmoe's per-parameter weight decay; `(('kernel', 0.1),)`
decays every kernel, biases, norms and embeddings not).

`optimizer.mu_dtype` stores Adam's first moment (or SGD's momentum) in
another dtype, e.g. 'bfloat16' (big_vision's and MaxText's option): a
quarter less optimizer memory for Adam with float32 parameters.

Gradients are clipped by global norm first when `grad_clip_norm > 0`.
Parameters matching `config.init_from.freeze` (fine-tuning) are not updated.

Warmup: `schedule.warmup_steps` (clamped to num_train_steps, so that a
shorter run by `--config.num_train_steps` alone still has a schedule) or
`schedule.warmup_fraction` of num_train_steps (rounded; the digits configs,
so that their warmup scales with the run); one of them is None.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from vmoe.checkpoints import freeze

OPTIMIZERS = ('adam', 'adamw', 'sgd')
SCHEDULES = ('cosine', 'linear', 'rsqrt', 'constant')


MU_DTYPES = (None, 'float32', 'bfloat16')


def warmup_steps(config: ml_collections.ConfigDict) -> int:
  """Warmup steps of the run: `schedule.warmup_steps` clamped to
  num_train_steps when set (it wins over a fraction), else
  `schedule.warmup_fraction` of num_train_steps (rounded)."""
  sched = config.schedule
  total = config.num_train_steps
  if sched.get('warmup_steps') is not None:
    return min(int(sched.warmup_steps), total)
  return min(int(round(sched.warmup_fraction * total)), total)


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warmup from 0 to the peak, then cosine/linear decay, rsqrt or flat."""
  peak = config.optimizer.learning_rate
  sched = config.schedule
  total = config.num_train_steps
  warmup = warmup_steps(config)
  decay_steps = max(total - warmup, 1)
  end = peak * sched.end_lr_fraction
  if sched.name == 'cosine':
    main = optax.cosine_decay_schedule(peak, decay_steps, alpha=sched.end_lr_fraction)
  elif sched.name == 'linear':
    main = optax.linear_schedule(peak, end, decay_steps)
  elif sched.name == 'rsqrt':
    timescale = sched.rsqrt_timescale
    main = lambda step: peak * jax.lax.rsqrt(1.0 + step / timescale)
  elif sched.name == 'constant':
    main = optax.constant_schedule(peak)
  else:
    raise ValueError(f'schedule.name={sched.name!r} is not one of {SCHEDULES}')
  if warmup == 0:
    return main
  return optax.join_schedules(
      [optax.linear_schedule(0.0, peak, warmup), main], [warmup])


def _param_name(path) -> str:
  return '/'.join(str(getattr(k, 'key', getattr(k, 'idx', k))) for k in path)


def weight_decay_of(weight_decay: Any, name: str, ndim: int) -> float:
  """The decay of parameter `name` (see the module docstring)."""
  if isinstance(weight_decay, (int, float)):
    return float(weight_decay) if ndim >= 2 else 0.0
  for regex, value in weight_decay:
    if re.search(regex, name):
      return float(value)
  return 0.0


def add_decayed_weights(weight_decay: Any) -> optax.GradientTransformation:
  """updates + wd(name) * params, per parameter (`weight_decay_of`)."""

  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError('weight decay needs the parameters')

    def decay(path, u, p):
      wd = weight_decay_of(weight_decay, _param_name(path), jnp.ndim(p))
      return u + wd * p.astype(u.dtype) if wd else u
    return jax.tree_util.tree_map_with_path(decay, updates, params), state

  return optax.GradientTransformation(init_fn, update_fn)


def has_weight_decay(weight_decay: Any) -> bool:
  if isinstance(weight_decay, (int, float)):
    return weight_decay != 0
  return any(value for _, value in weight_decay)


def create_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  opt = config.optimizer
  wd = opt.weight_decay
  mu_dtype = opt.get('mu_dtype')
  mu_dtype = jnp.dtype(mu_dtype) if mu_dtype else None
  decay = has_weight_decay(wd)
  parts = []
  if opt.grad_clip_norm:
    parts.append(optax.clip_by_global_norm(opt.grad_clip_norm))
  if opt.name in ('adam', 'sgd') and decay:
    parts.append(add_decayed_weights(wd))
  if opt.name in ('adam', 'adamw'):
    parts.append(optax.scale_by_adam(b1=opt.b1, b2=opt.b2, eps=opt.eps,
                                     mu_dtype=mu_dtype))
  elif opt.name == 'sgd':
    if opt.momentum:
      parts.append(optax.trace(decay=opt.momentum, nesterov=opt.nesterov,
                               accumulator_dtype=mu_dtype))
  else:
    raise ValueError(f'optimizer.name={opt.name!r} is not one of {OPTIMIZERS}')
  if opt.name == 'adamw' and decay:
    parts.append(add_decayed_weights(wd))
  parts.append(optax.scale_by_learning_rate(learning_rate_schedule(config)))
  # Parameters frozen by `init_from.freeze` get zero updates.
  return freeze.wrap_optimizer(optax.chain(*parts), config)
