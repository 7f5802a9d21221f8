"""LIMoE's entropy losses: the routing functions against loops over tokens
(values and gradients, edge cases), and every gate router adding them to its
auxiliary loss."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.helpers import D, fast_jit, layer_fn, moe_config, moe_layer
from vmoe.nn import moe
from vmoe.nn import routers
from vmoe.nn import routing as rt

GATE_ROUTERS = ('token_choice', 'expert_choice', 'sinkhorn_token_choice',
                'sinkhorn_expert_choice', 'sparsity_constrained_expert_choice')


def _loop_local(logits):
  """Mean over groups and tokens of the entropy of softmax(logits)."""
  total, count = 0.0, 0
  for group in logits:
    for row in group:
      p = jax.nn.softmax(row)
      total = total - sum(p[i] * jnp.log(p[i]) for i in range(len(p)))
      count += 1
  return total / count


def _loop_global(logits, threshold=None):
  losses = []
  for group in logits:
    mean = sum(jax.nn.softmax(row) for row in group) / len(group)
    h = -sum(mean[i] * jnp.log(mean[i]) for i in range(len(mean)))
    losses.append(-h if threshold is None else jnp.maximum(threshold - h, 0))
  return sum(losses) / len(losses)


CASES = {
    'random': jax.random.normal(jax.random.key(0), (2, 4, 4)) * 2,
    'uniform': jnp.zeros((2, 3, 4)),
    'peaked': jnp.array([[[9., -9., -9., -9.], [9., -9., -9., -9.]]]),
    'one_token': jax.random.normal(jax.random.key(1), (2, 1, 3)),
}


@pytest.mark.parametrize('case, threshold', [
    ('random', None), ('random', 0.5), ('uniform', math.log(4)),
    ('peaked', 0.5), ('peaked', None), ('one_token', None)])
def test_losses_equal_loops_with_gradients(case, threshold):
  logits = CASES[case]
  fast_local, grad_local = jax.value_and_grad(rt.local_entropy_loss)(logits)
  ref_local, ref_grad_local = jax.value_and_grad(_loop_local)(logits)
  np.testing.assert_allclose(fast_local, ref_local, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(grad_local, ref_grad_local, atol=1e-6)
  glob = lambda z: rt.global_entropy_loss(z, threshold)  # noqa: E731
  ref = lambda z: _loop_global(z, threshold)  # noqa: E731
  fast_global, grad_global = jax.value_and_grad(glob)(logits)
  ref_global, ref_grad_global = jax.value_and_grad(ref)(logits)
  np.testing.assert_allclose(fast_global, ref_global, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(grad_global, ref_grad_global, atol=1e-6)
  assert np.all(np.isfinite(grad_global))


def test_known_values_and_the_threshold():
  # Uniform routing: local entropy log e, global -log e; the threshold log e
  # is met exactly (loss 0); a one-hot marginal has global entropy 0.
  uniform = jnp.zeros((1, 4, 4))
  assert float(rt.local_entropy_loss(uniform)) == pytest.approx(math.log(4))
  assert float(rt.global_entropy_loss(uniform)) == pytest.approx(-math.log(4))
  assert float(rt.global_entropy_loss(uniform, math.log(4))) == pytest.approx(
      0.0, abs=1e-6)
  collapsed = jnp.tile(jnp.array([30., 0., 0., 0.]), (1, 4, 1))
  assert float(rt.global_entropy_loss(collapsed, 1.0)) == pytest.approx(
      1.0, abs=1e-4)


@pytest.mark.parametrize('router', GATE_ROUTERS)
def test_every_gate_router_adds_them_to_its_auxiliary_loss(router):
  kw = dict(router=router, num_experts=4, group_size=8, noise_std=0.0)
  base = moe_layer(**kw)
  with_losses = moe_layer(**kw, local_entropy_loss_weight=0.3,
                          global_entropy_loss_weight=0.2,
                          global_entropy_threshold=1.2)
  x = jax.random.normal(jax.random.key(2), (2, 8, D))
  _, m0 = layer_fn(base)[1](x)
  y, m1 = layer_fn(with_losses)[1](x)
  assert 'local_entropy_loss' not in m0
  logits = with_losses.router(x.reshape(2, 8, D))
  np.testing.assert_allclose(m1['local_entropy_loss'],
                             rt.local_entropy_loss(logits), rtol=1e-6)
  np.testing.assert_allclose(m1['global_entropy_loss'],
                             rt.global_entropy_loss(logits, 1.2), rtol=1e-6)
  np.testing.assert_allclose(
      m1['auxiliary_loss'], m0['auxiliary_loss']
      + 0.3 * m1['local_entropy_loss'] + 0.2 * m1['global_entropy_loss'],
      rtol=1e-5)
  # The losses reach the router's kernel through the auxiliary loss.
  if router == 'token_choice':
    graphdef, state = nnx.split(with_losses)

    def aux(state):
      return nnx.merge(graphdef, state)(x, train=False)[1]['auxiliary_loss']
    grads = fast_jit(jax.grad(aux))(state)
    assert float(jnp.abs(grads['router']['kernel'][...]).sum()) > 0


@pytest.mark.parametrize('field, value, message', [
    ('local_entropy_loss_weight', -1.0, 'must be a number >= 0'),
    ('global_entropy_loss_weight', 'x', 'must be a number >= 0'),
    ('global_entropy_threshold', 3.0, 'log(num_experts)=1.386'),
    ('global_entropy_threshold', 0.0, 'must be None or a number in (0,'),
])
def test_options_are_validated_in_one_line(field, value, message):
  cfg = moe_config(router='token_choice', num_experts=4, **{field: value})
  with pytest.raises(ValueError) as info:
    moe.validate_moe_config(cfg)
  assert str(info.value).startswith(f'model.moe.{field}={value!r}')
  assert message in str(info.value) and '\n' not in str(info.value)


def test_soft_moe_refuses_them():
  cfg = moe_config(router='soft', num_slots=2, local_entropy_loss_weight=0.1)
  with pytest.raises(ValueError, match="is not an option of router 'soft'"):
    moe.validate_moe_config(cfg, other_router_options=False)
  for name in GATE_ROUTERS:
    assert 'local_entropy_loss_weight' in routers.get(name).OPTIONS
