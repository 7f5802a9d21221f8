"""Optimizers and schedules built from the config."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vmoe.recipes import common
from vmoe.train import optimizer


def _config(**overrides):
  config = common.get_base_config()
  config.num_train_steps = 100
  config.schedule.warmup_steps = 10
  config.optimizer.learning_rate = 0.1
  for key, value in overrides.items():
    section, name = key.split('__')
    config[section][name] = value
  return config


@pytest.mark.parametrize('name', ['cosine', 'linear', 'rsqrt', 'constant'])
def test_schedule_warmup_then_decay(name):
  fn = optimizer.learning_rate_schedule(_config(schedule__name=name))
  lrs = np.array([fn(s) for s in range(101)])
  np.testing.assert_allclose(lrs[:11], np.linspace(0, 0.1, 11), rtol=1e-5, atol=1e-7)
  assert np.all(np.diff(lrs[10:]) <= 1e-7)
  if name in ('cosine', 'linear'):
    assert lrs[100] == pytest.approx(0.0, abs=1e-7)
  if name == 'constant':
    assert lrs[100] == pytest.approx(0.1)
  if name == 'rsqrt':
    assert lrs[100] == pytest.approx(0.1 / np.sqrt(1 + 90 / 10_000), rel=1e-5)


def test_adamw_matches_optax_adamw():
  config = _config(optimizer__weight_decay=0.01, optimizer__grad_clip_norm=0.0,
                   schedule__name='constant', schedule__warmup_steps=0)
  tx = optimizer.create_optimizer(config)
  ref = optax.adamw(0.1, weight_decay=0.01,
                    mask=lambda p: jax.tree.map(lambda x: x.ndim >= 2, p))
  params = {'w': jnp.ones((3, 2)), 'b': jnp.ones((2,))}
  grads = {'w': jnp.full((3, 2), 0.5), 'b': jnp.full((2,), -1.0)}
  u1, _ = tx.update(grads, tx.init(params), params)
  u2, _ = ref.update(grads, ref.init(params), params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), u1, u2)


def test_sgd_momentum_and_l2():
  config = _config(optimizer__name='sgd', optimizer__weight_decay=0.1,
                   optimizer__grad_clip_norm=0.0, schedule__name='constant',
                   schedule__warmup_steps=0)
  tx = optimizer.create_optimizer(config)
  params = {'w': jnp.ones((2, 2))}
  grads = {'w': jnp.zeros((2, 2))}
  updates, _ = tx.update(grads, tx.init(params), params)
  # Only the L2 term: -lr * wd * w.
  np.testing.assert_allclose(updates['w'], -0.1 * 0.1 * np.ones((2, 2)), rtol=1e-6)


def test_global_norm_clipping():
  config = _config(optimizer__name='sgd', optimizer__momentum=0.0,
                   optimizer__weight_decay=0.0, optimizer__grad_clip_norm=1.0,
                   schedule__name='constant', schedule__warmup_steps=0)
  tx = optimizer.create_optimizer(config)
  params = {'w': jnp.zeros((4,))}
  grads = {'w': jnp.full((4,), 10.0)}
  updates, _ = tx.update(grads, tx.init(params), params)
  assert float(optax.global_norm(updates)) == pytest.approx(0.1, rel=1e-5)


def test_warmup_steps_win_over_a_fraction_and_are_clamped():
  from vmoe.train import trainer  # pylint: disable=g-import-not-at-top
  config = _config()
  config.num_train_steps = 160
  config.schedule.update(warmup_steps=None, warmup_fraction=1 / 16)
  assert optimizer.warmup_steps(config) == 10
  assert trainer._warmup_note(config) is None  # pylint: disable=protected-access
  config.schedule.warmup_steps = 3  # --config.schedule.warmup_steps=3
  assert optimizer.warmup_steps(config) == 3
  assert trainer._warmup_note(config) == (  # pylint: disable=protected-access
      'note: schedule.warmup_steps=3 overrides schedule.warmup_fraction=0.0625')
  config.schedule.warmup_steps = 500
  assert optimizer.warmup_steps(config) == 160
  assert trainer._warmup_note(config).endswith(  # pylint: disable=protected-access
      'and clamped to num_train_steps=160')
