"""MoeLayer: configuration, equivalences and independent references."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from tests.helpers import (D, H, build, fast_jit, layer_fn, moe_config,
                           moe_layer, np_expert, np_params, np_softmax)
from vmoe.nn import moe
from vmoe.nn.layers import MlpBlock


# -- config -------------------------------------------------------------------


def test_default_config_is_valid():
  cfg = moe.default_moe_config()
  moe.validate_moe_config(cfg)
  assert cfg.router == 'token_choice' and cfg.dispatch == 'indices'


@pytest.mark.parametrize('kw, message', [
    (dict(router='foo'), r"model\.moe\.router='foo' is not one of"),
    (dict(num_experts=2, k=3), r'model\.moe\.k=3 exceeds model\.moe\.'
                               r'num_experts=2'),
    (dict(dispatch='gather'), r"model\.moe\.dispatch='gather' is not one of"),
    (dict(capacity_factor=0), r'model\.moe\.capacity_factor=0(\.0)? must be'),
    (dict(capacity=0), r'model\.moe\.capacity=0 must be'),
    (dict(noise_std=-1.0), r'model\.moe\.noise_std=-1\.0 must be'),
    (dict(group_size=2.5), r'model\.moe\.group_size=2\.5 must be'),
    (dict(batch_priority='yes'), r"model\.moe\.batch_priority='yes' must be"),
    (dict(router='soft'), r'needs model\.moe\.num_slots or'),
])
def test_validate_config_errors(kw, message):
  with pytest.raises(ValueError, match=message) as info:
    moe.validate_moe_config(moe_config(**kw))
  assert '\n' not in str(info.value)


def test_validate_config_unknown_field():
  cfg = ml_collections.ConfigDict(dict(router='soft', num_slot=1))
  with pytest.raises(ValueError, match=r'model\.moe\.num_slot is not a known'):
    moe.validate_moe_config(cfg)
  # A partial config is completed with the defaults; the model's own field
  # `layers` (which blocks are MoE) may live in the same dict.
  moe.validate_moe_config(ml_collections.ConfigDict(dict(num_experts=4,
                                                         layers='every:2')))


def test_group_size_must_divide_tokens():
  layer = moe_layer(group_size=3, num_experts=4)
  with pytest.raises(ValueError, match=r'model\.moe\.group_size=3'):
    layer(jnp.zeros((2, 4, D)))


# -- equivalence with the dense MLP -------------------------------------------


@pytest.mark.parametrize('router, dispatch', [
    ('token_choice', 'indices'), ('token_choice', 'einsum'),
    ('token_choice', 'dropless'), ('expert_choice', 'indices')])
def test_one_expert_equals_mlp(router, dispatch):
  mlp = build(lambda rngs: MlpBlock(D, H, rngs=rngs), seed=1)
  layer = moe_layer(
      router=router, num_experts=1, k=1, capacity_factor=1.0, noise_std=0.0,
      renormalize_gates=True, dispatch=dispatch, group_size=6)
  layer.experts.kernel1[...] = mlp.fc1.kernel[...][None]
  layer.experts.bias1[...] = mlp.fc1.bias[...][None]
  layer.experts.kernel2[...] = mlp.fc2.kernel[...][None]
  layer.experts.bias2[...] = mlp.fc2.bias[...][None]
  x = jax.random.normal(jax.random.key(2), (3, 4, D))
  y, metrics = layer_fn(layer)[1](x)
  graphdef, state = nnx.split(mlp)
  y_ref, _ = fast_jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, x)
  np.testing.assert_allclose(y, y_ref, rtol=1e-6, atol=1e-6)
  assert float(metrics['dropped_fraction']) == 0.0
  assert float(metrics['capacity']) == 6.0


# -- training plumbing --------------------------------------------------------


@pytest.mark.parametrize('router', ['token_choice', 'expert_choice', 'soft'])
def test_jit_grad_and_metrics(router):
  e = 4
  layer = moe_layer(
      router=router, num_experts=e, group_size=8, k=2,
      z_loss_weight=1e-3, balance_loss_weight=1e-2, dropout_rate=0.1)
  graphdef, state = nnx.split(layer)
  x = jax.random.normal(jax.random.key(1), (2, 8, D))

  @fast_jit
  def loss_and_grad(state, x, key):
    def loss(state):
      y, metrics = nnx.merge(graphdef, state)(
          x, train=True, rngs=nnx.Rngs(gating=key, dropout=key))
      return jnp.mean(y ** 2) + metrics['auxiliary_loss'], metrics
    return jax.value_and_grad(loss, has_aux=True)(state)

  (_, metrics), grads = loss_and_grad(state, x, jax.random.key(3))
  assert set(metrics) == set(moe.METRIC_KEYS)
  assert metrics['expert_load'].shape == (e,)
  np.testing.assert_allclose(jnp.sum(metrics['expert_load']), 1.0, rtol=1e-5)
  for key in moe.METRIC_KEYS[:-1]:
    assert metrics[key].shape == (), key
  if router == 'token_choice':
    assert float(metrics['load_loss']) > 0 and float(
        metrics['importance_loss']) > 0
  flat = nnx.to_flat_state(grads)
  for path, g in flat:
    assert bool(jnp.all(jnp.isfinite(g[...]))), path
    assert float(jnp.abs(g[...]).sum()) > 0, path


def test_train_noise_and_eval_determinism():
  layer = moe_layer(num_experts=4, group_size=8, noise_std=5.0)
  train, evaluate = layer_fn(layer)
  x = jax.random.normal(jax.random.key(1), (2, 8, D))
  y1, _ = train(x, jax.random.key(1))
  y2, _ = train(x, jax.random.key(2))
  assert not np.allclose(y1, y2)
  np.testing.assert_array_equal(evaluate(x)[0], evaluate(x)[0])
  with pytest.raises(ValueError, match='gating'):
    layer(x, train=True, rngs=None)


def test_eval_capacity_factor_and_setter():
  class Two(nnx.Module):
    def __init__(self, rngs):
      cfg = moe_config(num_experts=4, group_size=8, k=1, capacity_factor=1.0,
                   eval_capacity_factor=2.0)
      self.a = moe.MoeLayer(D, H, config=cfg, rngs=rngs)
      self.b = moe.MoeLayer(D, H, config=cfg, rngs=rngs)

  # Capacity factors are static attributes (part of the graphdef): split
  # again after changing them.
  def metrics(layer, x, train):
    graphdef, state = nnx.split(layer)
    return fast_jit(lambda s, x: nnx.merge(graphdef, s)(
        x, train=train, rngs=nnx.Rngs(gating=0))[1])(state, x)

  model = build(Two)
  x = jax.random.normal(jax.random.key(1), (2, 8, D))
  assert float(metrics(model.a, x, True)['capacity']) == 2.0  # ceil(8*1/4)
  assert float(metrics(model.a, x, False)['capacity']) == 4.0  # ceil(8*2/4)
  assert moe.set_capacity_factor(model, eval=0.5) == 2
  assert model.a.eval_capacity_factor == model.b.eval_capacity_factor == 0.5
  m_low = metrics(model.b, x, False)
  assert float(m_low['capacity']) == 1.0
  assert float(m_low['dropped_fraction']) > 0
  moe.set_capacity_factor(model, train=4.0)
  assert model.b.capacity_for(8, train=True) == 8
  assert model.b.capacity_for(8, train=False) == 1
  with pytest.raises(ValueError, match='capacity factor'):
    moe.set_capacity_factor(model, eval=0.0)


def test_bfloat16_activations_float32_router():
  layer = moe_layer(num_experts=4, group_size=8, dtype=jnp.bfloat16)
  x = jax.random.normal(jax.random.key(1), (2, 8, D), jnp.bfloat16)
  r, _ = jax.eval_shape(lambda x: layer.route(x), x)
  assert r.combine_weight.dtype == jnp.float32
  y = jax.eval_shape(lambda x: layer(x)[0], x)
  assert y.dtype == jnp.bfloat16


def test_soft_slots_from_capacity_factor():
  layer = moe_layer(router='soft', num_experts=4, group_size=8,
                    capacity_factor=1.0)
  assert layer.router.phi.shape == (4, 2, D)
  assert layer.router.phi.get_metadata()['logical_axes'] == (
      'expert', None, 'embed')
  assert layer.experts.kernel1.get_metadata()['logical_axes'] == (
      'expert', 'embed', 'mlp')


# -- independent reference implementations ------------------------------------


def reference_token_choice(x, w, params, k, capacity, bpr, renormalize):
  """V-MoE top-k routing with capacity and Batch Priority Routing, by loops."""
  y = np.zeros_like(x)
  for g in range(x.shape[0]):
    gates = np_softmax(x[g] @ w, -1)
    s, e = gates.shape
    choices = [sorted(range(e), key=lambda j: (-gates[t, j], j))[:k]
               for t in range(s)]
    order = list(range(s))
    if bpr:
      order.sort(key=lambda t: -gates[t].max())   # stable: ties by position
    fill = [0] * e
    for rank in range(k):                          # 1st choices first
      for t in order:
        ex = choices[t][rank]
        if fill[ex] < capacity:
          fill[ex] += 1
          gate = gates[t, ex]
          if renormalize:
            gate /= sum(gates[t, j] for j in choices[t])
          y[g, t] += gate * np_expert(params, ex, x[g, t])
  return y


def reference_expert_choice(x, w, params, capacity):
  """Zhou et al. 2022: every expert takes its top-`capacity` tokens."""
  y = np.zeros_like(x)
  for g in range(x.shape[0]):
    gates = np_softmax(x[g] @ w, -1)
    s, e = gates.shape
    for ex in range(e):
      for t in sorted(range(s), key=lambda t: (-gates[t, ex], t))[:capacity]:
        y[g, t] += gates[t, ex] * np_expert(params, ex, x[g, t])
  return y


def reference_soft(x, phi, scale, params):
  """Puigcerver et al. 2023, Algorithm 1 with normalised x and phi."""
  e, p, d = phi.shape
  xn = x / np.linalg.norm(x, axis=-1, keepdims=True)
  pn = phi.reshape(e * p, d).T                     # [d, n]
  pn = pn / np.linalg.norm(pn, axis=0, keepdims=True)
  y = np.zeros_like(x)
  for g in range(x.shape[0]):
    logits = scale * xn[g] @ pn                     # [s, n]
    dispatch = np_softmax(logits, 0)               # over tokens
    combine = np_softmax(logits, 1)                # over slots
    slots = dispatch.T @ x[g]                       # [n, d]
    outs = np.concatenate([np_expert(params, i, slots[i * p:(i + 1) * p])
                           for i in range(e)])
    y[g] = combine @ outs
  return y


@pytest.mark.parametrize('k, bpr, renormalize, cf', [
    (1, False, False, 1.0), (1, True, False, 0.5), (2, True, False, 1.0),
    (2, False, True, 0.75)])
def test_token_choice_matches_reference(k, bpr, renormalize, cf):
  e, s = 4, 8
  layer = moe_layer(
      k + 2 * bpr, num_experts=e, group_size=s, k=k, batch_priority=bpr,
      renormalize_gates=renormalize, eval_capacity_factor=cf)
  x = jax.random.normal(jax.random.key(1), (3, s, D))
  y, metrics = layer_fn(layer)[1](x)
  c = math.ceil(k * s * cf / e)
  assert float(metrics['capacity']) == c
  w = np.asarray(layer.router.kernel[...], np.float64).T   # [d, e]
  y_ref = reference_token_choice(np.asarray(x, np.float64), w,
                                 np_params(layer), k, c, bpr, renormalize)
  np.testing.assert_allclose(y, y_ref, rtol=1e-4, atol=1e-5)


def test_expert_choice_matches_reference():
  e, s = 4, 8
  layer = moe_layer(router='expert_choice', num_experts=e, group_size=s,
                    eval_capacity_factor=1.5)
  x = jax.random.normal(jax.random.key(1), (3, s, D))
  y, metrics = layer_fn(layer)[1](x)
  assert float(metrics['capacity']) == 3        # ceil(8 * 1.5 / 4)
  w = np.asarray(layer.router.kernel[...], np.float64).T   # [d, e]
  y_ref = reference_expert_choice(np.asarray(x, np.float64), w,
                                  np_params(layer), 3)
  np.testing.assert_allclose(y, y_ref, rtol=1e-4, atol=1e-5)


def test_soft_moe_matches_reference():
  layer = moe_layer(router='soft', num_experts=4, num_slots=2, group_size=8)
  layer.router.scale[...] = jnp.asarray(4.0)
  x = jax.random.normal(jax.random.key(1), (2, 8, D))
  y, metrics = layer_fn(layer)[1](x)
  assert float(metrics['capacity']) == 2.0
  y_ref = reference_soft(np.asarray(x, np.float64),
                         np.asarray(layer.router.phi[...], np.float64), 4.0,
                         np_params(layer))
  np.testing.assert_allclose(y, y_ref, rtol=1e-4, atol=1e-5)
