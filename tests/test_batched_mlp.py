"""The hand-written VJP of the batched MLP equals autodiff of its reference."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import fast_jit
from vmoe.nn import batched_mlp
from vmoe.nn import layers



def _inputs(e, t, d, h, dtype=jnp.float32, scale=1.0, seed=0):
  ks = jax.random.split(jax.random.key(seed), 6)
  x = scale * jax.random.normal(ks[0], (e, t, d))
  w1 = jax.random.normal(ks[1], (e, d, h)) / np.sqrt(d)
  b1 = 0.1 * jax.random.normal(ks[2], (e, h))
  w2 = jax.random.normal(ks[3], (e, h, d)) / np.sqrt(h)
  b2 = 0.1 * jax.random.normal(ks[4], (e, d))
  target = jax.random.normal(ks[5], (e, t, d))
  return tuple(a.astype(dtype) for a in (x, w1, b1, w2, b2)), target


def _value_and_grads(fn, args, target, keep):
  def loss(*args):
    y = fn(*args, keep)
    return jnp.sum(y.astype(jnp.float32) * target), y
  return fast_jit(jax.value_and_grad(loss, argnums=tuple(range(5)),
                                     has_aux=True))(*args)


@pytest.mark.parametrize('e, t, scale, dropout', [
    (1, 12, 1.0, False),   # the dense MlpBlock case
    (3, 5, 1.0, False),
    (3, 5, 1.0, True),
    (2, 7, 8.0, False),    # GELU tails: derivative 0 and 1
    (4, 1, 1.0, True),     # one row per expert
])
def test_matches_reference(e, t, scale, dropout):
  args, target = _inputs(e, t, 6, 10, scale=scale)
  keep = None
  if dropout:
    keep = layers.dropout_multiplier(0.3, jax.random.key(9), (e, t, 10),
                                     jnp.float32)
    assert float(jnp.mean(keep == 0)) > 0
  (_, y), grads = _value_and_grads(batched_mlp.mlp, args, target, keep)
  (_, y_ref), grads_ref = _value_and_grads(batched_mlp.mlp_reference, args,
                                           target, keep)
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  for name, g, g_ref in zip(('x', 'w1', 'b1', 'w2', 'b2'), grads, grads_ref):
    assert g.shape == g_ref.shape and g.dtype == g_ref.dtype, name
    np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-5, err_msg=name)
    assert float(jnp.abs(g).sum()) > 0, name


def test_bfloat16_matches_reference():
  args, target = _inputs(2, 8, 16, 32, dtype=jnp.bfloat16)
  (_, y), grads = _value_and_grads(batched_mlp.mlp, args, target, None)
  (_, y_ref), grads_ref = _value_and_grads(batched_mlp.mlp_reference, args,
                                           target, None)
  assert y.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.float32(y), np.float32(y_ref), rtol=0.05,
                             atol=0.05)
  for g, g_ref in zip(grads, grads_ref):
    assert g.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.float32(g), np.float32(g_ref), rtol=0.1,
                               atol=0.1)


def test_gelu_derivative_matches_autodiff():
  x = jnp.linspace(-12.0, 12.0, 97)
  value, derivative = batched_mlp.gelu_and_derivative(x, approximate=False)
  np.testing.assert_allclose(value, jax.nn.gelu(x, approximate=False),
                             rtol=1e-6, atol=1e-6)
  auto = jax.vmap(jax.grad(lambda v: jax.nn.gelu(v, approximate=False)))(x)
  np.testing.assert_allclose(derivative, auto, rtol=1e-5, atol=1e-6)


def test_mlp_block_runs_the_batched_mlp():
  """MlpBlock = batched_mlp.mlp with e=1 on the b*n rows (values, grads)."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  block = layers.MlpBlock(6, 10, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (2, 3, 6))
  w = tuple(p[...][None] for p in (block.fc1.kernel, block.fc1.bias,
                                    block.fc2.kernel, block.fc2.bias))
  y, metrics = block(x)
  y_ref = batched_mlp.mlp_reference(x.reshape(1, 6, 6), *w).reshape(2, 3, 6)
  assert metrics == {}
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-6)

  t = jax.random.normal(jax.random.key(2), y.shape)
  graphdef, state = nnx.split(block)

  def loss(state, x):
    return jnp.sum(jnp.sin(nnx.merge(graphdef, state)(x)[0]) * t)

  def loss_ref(w, x):
    out = batched_mlp.mlp_reference(x.reshape(1, 6, 6), *w).reshape(2, 3, 6)
    return jnp.sum(jnp.sin(out) * t)

  dstate, dx = jax.grad(loss, argnums=(0, 1))(state, x)
  dw_ref, dx_ref = jax.grad(loss_ref, argnums=(0, 1))(w, x)
  np.testing.assert_allclose(dx, dx_ref, rtol=1e-5, atol=1e-6)
  got = (dstate['fc1']['kernel'][...], dstate['fc1']['bias'][...],
         dstate['fc2']['kernel'][...], dstate['fc2']['bias'][...])
  for g, r in zip(got, dw_ref):
    np.testing.assert_allclose(g, r[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('dropout', [False, True])
def test_exact_gelu_matches_reference(dropout):
  """The exact (erf) GELU: the hand-written VJP equals autodiff, and the
  form differs from the default tanh one."""
  args, target = _inputs(3, 5, 6, 10, scale=3.0)
  keep = (layers.dropout_multiplier(0.3, jax.random.key(9), (3, 5, 10),
                                    jnp.float32) if dropout else None)
  exact_mlp = lambda *a: batched_mlp.mlp(*a, approximate=False)
  exact_ref = lambda *a: batched_mlp.mlp_reference(*a, approximate=False)
  (_, y), grads = _value_and_grads(exact_mlp, args, target, keep)
  (_, y_ref), grads_ref = _value_and_grads(exact_ref, args, target, keep)
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  for name, g, g_ref in zip(('x', 'w1', 'b1', 'w2', 'b2'), grads, grads_ref):
    np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-5, err_msg=name)
  tanh, _ = _value_and_grads(batched_mlp.mlp, args, target, keep)
  assert not np.allclose(tanh[1], y, rtol=1e-6, atol=1e-6)  # forms differ


def test_tanh_gelu_equals_jax_nn_gelu():
  """The tanh GELU (vit_jax / big_vision / vmoe): values equal jax.nn.gelu's
  bit for bit."""
  x = jnp.linspace(-6.0, 6.0, 1001, dtype=jnp.float32)
  value, _ = batched_mlp.gelu_and_derivative(x, approximate=True)
  np.testing.assert_array_equal(value, jax.nn.gelu(x, approximate=True))
