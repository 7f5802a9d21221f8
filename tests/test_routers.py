"""The router registry and the layer options around routers: a new router is
one class, shared experts, fine-grained experts, expert ablation, routing
capture, capacity rounding and Soft MoE bfloat16 rounding."""


import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from tests.helpers import (D, H, build, fast_jit, layer_fn, moe_config,
                           moe_layer, np_gelu, np_softmax)
from vmoe import sharding
from vmoe.nn import dispatch as dp
from vmoe.nn import moe
from vmoe.nn import routers
from vmoe.nn import routing as rt
from vmoe.nn import vit
from vmoe.nn.routers import base


def _np_mlp_sum(experts, x):
  """sum_j MLP_j(x) with the tanh GELU, float64; experts: an `Experts`."""
  k1, b1, k2, b2 = (np.asarray(p[...], np.float64) for p in (
      experts.kernel1, experts.bias1, experts.kernel2, experts.bias2))
  return sum(np_gelu(x @ k1[j] + b1[j]) @ k2[j] + b2[j]
             for j in range(k1.shape[0]))


# -- registry ------------------------------------------------------------------


def test_registry_holds_the_routers_and_their_options():
  names = routers.names()
  for name in ('token_choice', 'expert_choice', 'soft'):
    assert name in names
    assert routers.get(name).NAME == name
  with pytest.raises(KeyError, match="router 'nope' is not one of"):
    routers.get('nope')
  cfg = moe.default_moe_config()
  for name in names:
    for option, default in routers.get(name).OPTIONS.items():
      assert cfg[option] == default, (name, option)


def test_a_run_refuses_options_of_another_router():
  """A config setting another router's option away from its default would
  have it ignored: the run's validation names it; at its default it is
  fine, and the layer itself accepts it."""
  cfg = moe_config(router='expert_choice', k=4)
  with pytest.raises(ValueError) as info:
    moe.validate_moe_config(cfg, other_router_options=False)
  assert str(info.value) == (
      "model.moe.k=4 is not an option of router 'expert_choice'")
  moe.validate_moe_config(moe_config(router='expert_choice', k=2),
                          other_router_options=False)
  moe.validate_moe_config(cfg)


def test_conflicting_option_defaults_are_refused():
  class Bad(base.GateRouter):
    OPTIONS = dict(k=7)
  with pytest.raises(ValueError, match="option 'k' defaults to 7"):
    routers.register('bad_defaults')(Bad)
  assert 'bad_defaults' not in routers.names()


class _ArgmaxRouter(base.GateRouter):
  """Top-1 token choice written as a new router: its own decide, nothing else."""
  DECISION = rt.TokenChoiceRouting

  def decide(self, logits, *, capacity):
    gates = jax.nn.softmax(logits['noisy'], axis=-1)
    return rt.token_choice_from_gates(gates, num_selected=1, capacity=capacity)

  def metrics(self, r, logits, *, train):
    return self.gate_metrics(r, logits, train=train)


@pytest.fixture
def argmax_router():
  routers.register('test_argmax')(_ArgmaxRouter)
  yield 'test_argmax'
  routers.registry.ROUTERS.unregister('test_argmax')


@pytest.mark.parametrize('dispatch', ['indices', 'einsum', 'dropless'])
def test_a_new_router_is_one_registered_class(argmax_router, dispatch):
  kw = dict(num_experts=4, group_size=8, noise_std=0.0, dispatch=dispatch,
            eval_capacity_factor=1.0)
  mine = moe_layer(router=argmax_router, **kw)
  ref = moe_layer(router='token_choice', k=1, **kw)  # same seed: same params
  x = jax.random.normal(jax.random.key(1), (2, 8, D))
  y, metrics = layer_fn(mine)[1](x)
  y_ref, metrics_ref = layer_fn(ref)[1](x)
  np.testing.assert_allclose(y, y_ref, rtol=1e-6, atol=1e-6)
  assert set(metrics) == set(moe.METRIC_KEYS)
  np.testing.assert_allclose(metrics['expert_load'], metrics_ref['expert_load'])


# -- shared experts ------------------------------------------------------------


@pytest.mark.parametrize('router', ['token_choice', 'soft'])
def test_shared_experts_add_their_mlps_to_every_token(router):
  kw = dict(router=router, num_experts=4, group_size=8, noise_std=0.0,
            num_slots=2)
  with_shared = build(lambda rngs: moe.MoeLayer(
      D, H, config=moe_config(**kw, num_shared_experts=2, shared_hidden_dim=12),
      gelu='tanh', rngs=rngs))
  plain = build(lambda rngs: moe.MoeLayer(D, H, config=moe_config(**kw),
                                          gelu='tanh', rngs=rngs))
  shared = with_shared.shared_experts
  assert shared.kernel1.shape == (2, D, 12)
  assert shared.kernel1.get_metadata()['logical_axes'][0] == 'shared_expert'
  # The routed part is the plain layer with the same router and experts.
  for name in ('kernel1', 'bias1', 'kernel2', 'bias2'):
    getattr(plain.experts, name)[...] = getattr(with_shared.experts, name)[...]
  for name, value in nnx.to_flat_state(nnx.state(with_shared.router,
                                                 nnx.Param)):
    node = plain.router
    for k in name[:-1]:
      node = getattr(node, k)
    getattr(node, name[-1])[...] = value[...]
  x = jax.random.normal(jax.random.key(1), (2, 8, D))
  y, _ = layer_fn(with_shared)[1](x)
  y_routed, _ = layer_fn(plain)[1](x)
  expected = np.asarray(y_routed, np.float64) + _np_mlp_sum(
      shared, np.asarray(x, np.float64))
  np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


def test_shared_experts_are_not_split_over_the_expert_axis():
  spec = sharding.param_spec(
      ('mlp', 'shared_experts', 'kernel1'), (2, D, H),
      ('shared_expert', 'embed', 'mlp'), {'expert': 'expert'},
      {'data': 2, 'expert': 4})
  assert spec == jax.sharding.PartitionSpec()


def test_shared_experts_get_gradients():
  layer = moe_layer(num_experts=4, group_size=8, num_shared_experts=1)
  graphdef, state = nnx.split(layer)
  x = jax.random.normal(jax.random.key(1), (2, 8, D))

  @fast_jit
  def grads(state):
    return jax.grad(lambda s: jnp.sum(nnx.merge(graphdef, s)(
        x, train=True, rngs=nnx.Rngs(gating=0))[0] ** 2))(state)
  g = grads(state)
  for path, leaf in nnx.to_flat_state(g):
    if 'shared_experts' in path:
      assert float(jnp.abs(leaf[...]).sum()) > 0, path


# -- fine-grained experts --------------------------------------------------------


def _expert_params(layer):
  return sum(int(p.size) for p in (layer.experts.kernel1, layer.experts.kernel2,
                                   layer.experts.bias1))


@pytest.mark.parametrize('router, kw', [
    ('token_choice', dict(k=2)),
    ('expert_choice', dict()),
    ('soft', dict(capacity_factor=1.0)),
])
def test_granularity_keeps_expert_parameters_and_active_compute(router, kw):
  s, e, m = 8, 4, 2
  cfg = dict(router=router, num_experts=e, group_size=s, noise_std=0.0, **kw)
  coarse = moe_layer(**cfg)
  fine = moe_layer(**cfg, granularity=m)
  assert fine.num_experts == e * m
  assert fine.experts.kernel1.shape == (e * m, D, H // m)
  assert _expert_params(fine) == _expert_params(coarse)
  # Active expert FLOPs per token: applications x hidden units.
  def active(layer):
    c = layer.capacity_for(s, False)
    return layer.router.applications_per_token(s, c) * layer.experts.kernel1.shape[-1]
  assert active(fine) == active(coarse)
  if router == 'token_choice':
    assert fine.router.k == kw['k'] * m
  x = jax.random.normal(jax.random.key(1), (2, s, D))
  y, metrics = layer_fn(fine)[1](x)
  assert y.shape == x.shape and metrics['expert_load'].shape == (e * m,)


def test_granularity_must_divide_the_hidden_size():
  with pytest.raises(ValueError, match=r'model\.moe\.granularity=3 does not '
                                       r'divide the MLP hidden size 16'):
    moe_layer(granularity=3)


def test_dry_run_counts_of_fine_grained_configs():
  """Expert parameters and active parameters per token do not change with the
  granularity; the router's gates and the experts' output biases do."""
  def counts(m):
    cfg = ml_collections.ConfigDict(dict(variant='mu/2'))
    cfg.moe = moe.default_moe_config()
    cfg.moe.update(dict(num_experts=4, k=1, layers=(1,), granularity=m))
    model = nnx.eval_shape(lambda: vit.create_model(
        cfg, num_classes=10, image_size=8, num_channels=1, rngs=nnx.Rngs(0)))
    layer = model.blocks[1].mlp
    total = vit.count_params(nnx.state(model, nnx.Param))
    return total, _expert_params(layer)
  (total1, experts1), (total2, experts2) = counts(1), counts(2)
  assert experts1 == experts2
  d = vit.VIT_SIZES['mu'].width
  assert total2 - total1 == 2 * 4 * d  # router gates + output biases


# -- expert ablation and routing capture -----------------------------------------


@pytest.mark.parametrize('router, dispatch', [
    ('token_choice', 'indices'), ('token_choice', 'dropless'),
    ('expert_choice', 'einsum'), ('soft', 'indices')])
def test_disabled_experts_contribute_nothing(router, dispatch):
  layer = moe_layer(router=router, num_experts=4, group_size=8, noise_std=0.0,
                    num_slots=2, dispatch=dispatch)
  x = jax.random.normal(jax.random.key(1), (2, 8, D))
  xg = x.reshape(2, 8, D)
  r, _ = layer.route(xg)
  # Reference: the einsum path with expert 2's outputs zeroed by hand.
  outs = layer.experts(dp.dispatch(r, xg, 'einsum'))
  expected = dp.combine(r, outs.at[2].set(0.0), 'einsum')
  layer.disabled_experts = (2,)
  y, _ = layer_fn(layer)[1](x)
  np.testing.assert_allclose(y, expected.reshape(x.shape), rtol=1e-5,
                             atol=1e-6)
  layer.disabled_experts = (0, 1, 2, 3)
  np.testing.assert_array_equal(layer_fn(layer)[1](x)[0], 0.0)


def test_capture_routing_returns_every_layer_decision():
  cfg = ml_collections.ConfigDict(dict(variant='mu/2', head_zero_init=False))
  cfg.moe = moe.default_moe_config()
  cfg.moe.update(dict(num_experts=4, layers='every:2', group_size=17,
                      batch_priority=True))
  model = build(lambda rngs: vit.create_model(
      cfg, num_classes=10, image_size=8, num_channels=1, rngs=rngs))
  images = jax.random.normal(jax.random.key(0), (3, 8, 8, 1))
  logits, metrics, captured = moe.capture_routing(model, images)
  assert sorted(captured) == [1, 3]
  for i, cap in captured.items():
    assert isinstance(cap.decision, rt.TokenChoiceRouting)
    assert cap.group_size == 17 and cap.decision.expert_index.shape == (3, 17, 2)
    np.testing.assert_allclose(rt.expert_load(cap.decision),
                               metrics[f'block_{i}/expert_load'], rtol=1e-6)
    np.testing.assert_allclose(
        np_softmax(np.asarray(cap.logits['logits']), -1).sum(-1), 1.0,
        rtol=1e-5)
  # The model is unchanged: capture off, nothing stored, same logits.
  assert not any(layer.capture for layer in moe.moe_layers(model).values())
  assert not nnx.state(model, nnx.Intermediate)
  graphdef, state = nnx.split(model)
  again = fast_jit(lambda s, x: nnx.merge(graphdef, s)(x)[0])(state, images)
  np.testing.assert_allclose(again, logits, rtol=1e-5, atol=1e-5)


# -- reference conventions ---------------------------------------------------------


@pytest.mark.parametrize('s, e, k, cf, multiple, expected', [
    (8, 4, 1, 1.25, None, 2),    # round(2.5) = 2: half to even
    (8, 4, 1, 1.75, None, 4),    # round(3.5) = 4
    (10, 4, 2, 1.0, None, 5),    # round(5.0)
    (10, 4, 1, 1.0, 4, 4),       # round(2.5) = 2, up to a multiple of 4
    (197, 32, 1, 1.0, None, 6),  # round(6.156)
])
def test_round_capacity(s, e, k, cf, multiple, expected):
  got = rt.compute_capacity(s, e, capacity_factor=cf, num_selected=k,
                            multiple=multiple, rounding='round')
  assert got == expected
  assert rt.compute_capacity(s, e, capacity_factor=cf, num_selected=k,
                             multiple=multiple) >= got  # ceil never smaller


def test_round_capacity_below_one_is_refused():
  with pytest.raises(ValueError, match='rounds to capacity 0'):
    rt.compute_capacity(8, 32, capacity_factor=1.0, rounding='round')
  with pytest.raises(ValueError, match=r"capacity_rounding='floor'"):
    rt.compute_capacity(8, 4, capacity_factor=1.0, rounding='floor')
  layer = moe_layer(router='soft', num_experts=4, group_size=10,
                    capacity_factor=1.0, capacity_rounding='round')
  assert layer.router.phi.shape[1] == 2  # round(2.5), vmoe's Soft MoE slots


@pytest.mark.parametrize('router', ['soft', 'token_choice'])
def test_bf16_dispatch_rounds_tokens_and_outputs(router):
  """vmoe's Bfloat16Dispatcher: dispatched tokens and expert outputs rounded
  to bfloat16 and back; the routing itself sees the unrounded tokens."""
  kw = dict(router=router, num_experts=2, num_slots=2, group_size=8,
            noise_std=0.0, eval_capacity_factor=2.0)
  rounded = moe_layer(**kw, bf16_dispatch=True)
  plain = moe_layer(**kw)  # same seed: same parameters
  x = jax.random.normal(jax.random.key(1), (1, 8, D))
  r, _ = plain.route(x)
  round16 = lambda a: a.astype(jnp.bfloat16).astype(jnp.float32)
  outs = round16(plain.experts(dp.dispatch(r, round16(x), 'einsum')))
  expected = dp.combine(r, outs, 'einsum')
  y, _ = layer_fn(rounded)[1](x)
  np.testing.assert_allclose(y, expected, rtol=1e-6, atol=1e-6)
  assert not np.allclose(y, layer_fn(plain)[1](x)[0], rtol=1e-7, atol=1e-7)
