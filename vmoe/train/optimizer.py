"""Optimizers and learning-rate schedules (optax), built from `config.optimizer`
and `config.schedule`.

Weight decay semantics: 'adamw' decays weights decoupled from the gradient
(Loshchilov & Hutter 2019, as `optax.adamw`); 'adam' and 'sgd' add the classic
L2 term `weight_decay * w` to the gradient. Only kernels (ndim >= 2) decay.
Gradients are clipped by global norm first when `grad_clip_norm > 0`.
Parameters matching `config.init_from.freeze` (fine-tuning) are not updated.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import optax

from vmoe.checkpoints import freeze

OPTIMIZERS = ('adam', 'adamw', 'sgd')
SCHEDULES = ('cosine', 'linear', 'rsqrt', 'constant')


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warmup from 0 to the peak, then cosine/linear decay, rsqrt or flat."""
  peak = config.optimizer.learning_rate
  sched = config.schedule
  total = config.num_train_steps
  warmup = sched.warmup_steps
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


def _decay_mask(params):
  return jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)


def create_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  opt = config.optimizer
  wd = opt.weight_decay
  parts = []
  if opt.grad_clip_norm:
    parts.append(optax.clip_by_global_norm(opt.grad_clip_norm))
  if opt.name in ('adam', 'sgd') and wd:
    parts.append(optax.add_decayed_weights(wd, mask=_decay_mask))
  if opt.name in ('adam', 'adamw'):
    parts.append(optax.scale_by_adam(b1=opt.b1, b2=opt.b2, eps=opt.eps))
  elif opt.name == 'sgd':
    if opt.momentum:
      parts.append(optax.trace(decay=opt.momentum, nesterov=opt.nesterov))
  else:
    raise ValueError(f'optimizer.name={opt.name!r} is not one of {OPTIMIZERS}')
  if opt.name == 'adamw' and wd:
    parts.append(optax.add_decayed_weights(wd, mask=_decay_mask))
  parts.append(optax.scale_by_learning_rate(learning_rate_schedule(config)))
  # Parameters frozen by `init_from.freeze` get zero updates.
  return freeze.wrap_optimizer(optax.chain(*parts), config)
