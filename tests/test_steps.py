"""Tests of vmoe/train/steps.py: the jitted train step and its NaN guard."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from vmoe.recipes import common
from tests.helpers import tiny_digits_config
from vmoe.nn import vit
from vmoe.train import steps


def _setup():
  config = tiny_digits_config('/nonexistent', **{
      'model.moe': common.moe_config(layers='every:2', num_experts=4)})

  def build():
    return vit.create_model(config.model, num_classes=10, image_size=8,
                            num_channels=1, rngs=nnx.Rngs(0))

  model_fn = steps.ModelFn(nnx.eval_shape(build))
  params = nnx.to_pure_dict(nnx.state(build(), nnx.Param))
  tx = optax.adamw(1e-2)
  state = {'step': jnp.zeros((), jnp.int32), 'params': params,
           'opt_state': tx.init(params),
           'nonfinite_step': jnp.full((), -1, jnp.int32)}
  step = jax.jit(steps.make_train_step(model_fn, tx, seed=0,
                                       label_smoothing=0.0,
                                       learning_rate_fn=lambda s: 1e-2),
                 donate_argnums=0)
  images = jax.random.normal(jax.random.key(1), (8, 8, 8, 1))
  labels = jax.nn.one_hot(jnp.arange(8) % 10, 10)
  return step, state, {'image': images, 'labels': labels}


def _host(tree):
  return jax.tree.map(np.asarray, tree)


def test_nonfinite_batch_leaves_the_state_unchanged_from_then_on():
  step, state, batch = _setup()
  state, metrics = step(state, batch)
  assert np.isfinite(metrics['loss'])
  assert int(state['nonfinite_step']) == -1
  before = _host({'params': state['params'], 'opt': state['opt_state']})

  bad = dict(batch, image=batch['image'].at[0, 0, 0, 0].set(jnp.nan))
  state, metrics = step(state, bad)
  assert not np.isfinite(metrics['loss'])
  assert int(state['nonfinite_step']) == 1  # the step that saw the NaN
  assert int(state['step']) == 2
  after = _host({'params': state['params'], 'opt': state['opt_state']})
  jax.tree.map(np.testing.assert_array_equal, after, before)

  # Later finite batches are no-ops too: the caller stops with these params.
  state, metrics = step(state, batch)
  assert np.isfinite(metrics['loss'])
  assert int(state['nonfinite_step']) == 1
  jax.tree.map(np.testing.assert_array_equal,
               _host({'params': state['params'], 'opt': state['opt_state']}),
               before)


def test_finite_batches_update_parameters():
  step, state, batch = _setup()
  before = _host(state['params'])
  losses = []
  for _ in range(3):  # the zero-initialised head passes no gradient at first
    state, metrics = step(state, batch)
    losses.append(float(metrics['loss']))
  after = _host(state['params'])
  flat_after = jax.tree_util.tree_flatten_with_path(after)[0]
  unchanged = [jax.tree_util.keystr(path)
               for (path, a), b in zip(flat_after, jax.tree.leaves(before))
               if np.array_equal(a, b)]
  assert not unchanged
  assert losses[-1] < losses[0]


def test_all_finite_covers_every_floating_leaf():
  tree = {'a': jnp.ones((3, 2)), 'b': (jnp.zeros(4, jnp.bfloat16),
                                       jnp.arange(3))}
  assert bool(steps.all_finite(tree))
  for bad in (jnp.nan, jnp.inf, -jnp.inf):
    broken = dict(tree, b=(tree['b'][0].at[2].set(bad), tree['b'][1]))
    assert not bool(steps.all_finite(broken))
  assert bool(steps.all_finite({'count': jnp.int32(3)}))  # no float leaf
