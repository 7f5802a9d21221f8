"""Multi-Head MoE, mixture-of-depths and nested-experts blocks against loops
over tokens (values and gradients, edge cases), their sizes, budgets and
validation, and the model with each kind."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.helpers import build, fast_jit, max_diff, moe_config
from vmoe import analysis
from vmoe.config import ConfigError
from vmoe.nn import blocks
from vmoe.nn import moe
from vmoe.nn import routers
from vmoe.nn import vit
from vmoe.nn.blocks import mod
from vmoe.nn.blocks import mone
from vmoe.nn.layers import MlpBlock
from vmoe.nn.moe_kinds import multi_head

DIM, HIDDEN, HEADS = 16, 32, 4


def _grad_compare(module, fast, reference, x, tol=2e-5):
  """Values and gradients (w.r.t. x and every parameter) of fast(m, x)
  against reference(m, x), eager reference."""
  graphdef, state = nnx.split(module)
  f = lambda s, x: fast(nnx.merge(graphdef, s), x)  # noqa: E731
  r = lambda s, x: reference(nnx.merge(graphdef, s), x)  # noqa: E731
  assert max_diff(fast_jit(f)(state, x), r(state, x)) < tol / 5
  loss = lambda fn: lambda s, x: jnp.sum(jnp.sin(fn(s, x)))  # noqa: E731
  g_fast = fast_jit(jax.grad(loss(f), argnums=(0, 1)))(state, x)
  g_ref = jax.grad(loss(r), argnums=(0, 1))(state, x)
  assert max_diff(g_fast, g_ref) < tol


# -- Multi-Head MoE --------------------------------------------------------------


def test_matched_sizes_keep_flops_and_parameters():
  for d, h_mlp, e, k, heads in ((64, 128, 8, 1, 2), (384, 1536, 32, 1, 2),
                                (64, 128, 8, 2, 4)):
    c = moe_config(kind='multi_head', num_experts=e, k=k, mh_heads=heads)
    c = moe._merged(c)  # pylint: disable=protected-access
    experts, hidden = multi_head.expert_sizes(c, d, h_mlp)
    sparse_flops = 4 * k * d * h_mlp
    mh_flops = heads * k * 4 * (d // heads) * hidden + 4 * d * d
    assert abs(mh_flops / sparse_flops - 1) < d / (k * h_mlp * h_mlp) + 1e-9
    sparse_params = e * 2 * d * h_mlp
    mh_params = experts * 2 * (d // heads) * hidden + 2 * d * d
    assert abs(mh_params / sparse_params - 1) < 0.02
  c = moe._merged(moe_config(kind='multi_head', num_experts=8, k=1,  # pylint: disable=protected-access
                             mh_sizing='original'))
  assert multi_head.expert_sizes(c, 64, 128) == (8, 128)


@pytest.mark.parametrize('group_size, k, cf', [(6, 2, 1.0), (None, 1, 0.5),
                                              (3, 1, 2.0)])
def test_multi_head_moe_equals_loops(group_size, k, cf):
  cfg = moe_config(kind='multi_head', mh_heads=2, num_experts=4, k=k,
                   group_size=group_size, noise_std=0.0, capacity_factor=cf,
                   eval_capacity_factor=cf)
  layer = build(lambda rngs: moe.build_layer(DIM, HIDDEN, config=cfg,
                                             rngs=rngs))
  x = jax.random.normal(jax.random.key(1), (2, 3, DIM))
  _grad_compare(layer, lambda m, x: m(x)[0], multi_head.reference, x)


@pytest.mark.parametrize('router', [n for n in routers.names()
                                    if n != 'soft'])
def test_multi_head_moe_works_with_every_gate_router(router):
  cfg = moe_config(kind='multi_head', mh_heads=2, num_experts=4,
                   router=router, group_size=6, capacity_factor=1.0,
                   noise_std=0.0)
  layer = build(lambda rngs: moe.build_layer(DIM, HIDDEN, config=cfg,
                                             rngs=rngs))
  x = jax.random.normal(jax.random.key(2), (2, 3, DIM))
  graphdef, state = nnx.split(layer)
  y, metrics = fast_jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, x)
  assert y.shape == x.shape and np.all(np.isfinite(y))
  assert set(moe.METRIC_KEYS) | {'expert_activation'} <= set(metrics)
  np.testing.assert_allclose(
      metrics['expert_activation'],
      np.mean(np.asarray(metrics['expert_load']) > 0), rtol=1e-6)
  assert layer.moe.group_size == 12  # 6 tokens -> 12 sub-tokens


@pytest.mark.parametrize('options, message', [
    (dict(mh_heads=1), 'model.moe.mh_heads=1 must be an integer >= 2'),
    (dict(mh_heads=3), 'model.moe.mh_heads=3 does not divide the model width'),
    (dict(mh_sizing='x'), "model.moe.mh_sizing='x' is not one of"),
    (dict(kind='nope'), "model.moe.kind='nope' is not one of"),
])
def test_multi_head_options_are_validated(options, message):
  cfg = moe_config(**{'kind': 'multi_head', **options})
  with pytest.raises(ValueError) as info:
    moe.validate_moe_config(cfg, mlp_dim=HIDDEN, dim=DIM)
  assert str(info.value).startswith(message) and '\n' not in str(info.value)
  with pytest.raises(ValueError, match='model.moe.mh_heads=4 is not an '
                     "option of model.moe.kind='moe'"):
    moe.validate_moe_config(moe_config(mh_heads=4), mlp_dim=HIDDEN,
                            other_router_options=False)
  with pytest.raises(ValueError, match='build the layer with'):
    moe.MoeLayer(DIM, HIDDEN, config=moe_config(kind='multi_head'),
                 rngs=nnx.Rngs(0))


def test_traces_of_a_multi_head_model_have_sub_tokens():
  cfg = moe_config(layers=(1,), kind='multi_head', mh_heads=2, num_experts=4,
                   k=1, group_size=None, noise_std=0.0)
  model = build(lambda rngs: vit.VisionTransformer(
      num_classes=3, image_size=8, num_channels=1, variant='mu/4', moe=cfg,
      rngs=rngs))
  batch = dict(image=np.ones((2, 8, 8, 1), np.float32), label=np.zeros(2, int),
               mask=np.ones(2))
  trace = analysis.collect(model, [batch])
  assert trace.layers[1].assigned.shape == (2, 5 * 2, model.blocks[
      1].mlp.moe.num_experts)
  assert analysis.layer_summary(trace).num_experts[0] == 14  # 2 (4 128 - 64) / 64


# -- mixture-of-depths --------------------------------------------------------


def _block(kind, **options):
  return build(lambda rngs: blocks.build(
      kind, vit.EncoderBlock,
      blocks.BLOCKS.options(options, num_prefix_tokens=1), DIM, HEADS,
      MlpBlock(DIM, HIDDEN, rngs=rngs), dropout_rate=0.0,
      dtype=None, param_dtype=jnp.float32, rngs=rngs))


X = jax.random.normal(jax.random.key(3), (2, 5, DIM))


# Eager loop references are slow: one case in the quick loop, the rest slow.
@pytest.mark.parametrize('capacity, activation', [
    (0.4, 'sigmoid'), *[pytest.param(*c, marks=pytest.mark.slow) for c in (
        (0.4, 'none'), (1.0, 'none'), (0.01, 'sigmoid'))]])
def test_mixture_of_depths_equals_loops(capacity, activation):
  block = _block('mod', mod_capacity=capacity,
                 mod_router_activation=activation)
  call = lambda m, x: m(x, train=False, rngs=None)[0]  # noqa: E731
  _grad_compare(block, call, mod.reference, X)
  _, metrics = block(X, train=False, rngs=None)
  c = mod.capacity_tokens(5, capacity)
  assert float(metrics['depth/capacity']) == c
  assert float(metrics['depth/dropped_fraction']) == pytest.approx(1 - c / 5)
  assert float(metrics['depth/compute_fraction']) == pytest.approx(
      mod.block_flops(c, DIM, HIDDEN) / mod.block_flops(5, DIM, HIDDEN))


def test_mixture_of_depths_never_skips_the_class_token():
  block = _block('mod', mod_capacity=0.2)    # 1 token of 5: the class token
  block.router.value = jnp.zeros(DIM).at[0].set(100.0)
  x = X.at[:, 0, 0].set(-5.0)                # the class token scores lowest
  y, _ = block(x, train=False, rngs=None)
  standard = vit.EncoderBlock.__call__(block, x[:, :1], train=False,
                                       rngs=None)[0]
  np.testing.assert_allclose(y[:, 0], standard[:, 0], rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(y[:, 1:], x[:, 1:])   # the rest skip


def test_mixture_of_depths_routing_loss():
  block = _block('mod', mod_capacity=0.4, mod_loss_weight=0.5)
  _, metrics = block(X, train=False, rngs=None)
  r = np.asarray(block.scores(X))[:, 1:]
  chosen = np.zeros_like(r)
  index = np.asarray(block.select(block.scores(X), 2))
  for img in range(2):
    for t in index[img]:
      if t > 0:
        chosen[img, t - 1] = 1
  p = 1 / (1 + np.exp(-r))
  bce = -np.mean(chosen * np.log(p) + (1 - chosen) * np.log(1 - p))
  np.testing.assert_allclose(metrics['depth/router_loss'], bce, rtol=1e-5)
  np.testing.assert_allclose(metrics['auxiliary_loss'], 0.5 * bce, rtol=1e-5)


# -- nested experts -------------------------------------------------------------


def test_capacity_distribution_solves_the_papers_program():
  import scipy.optimize  # pylint: disable=g-import-not-at-top
  for budget in (0.2, 0.5, 0.8):
    caps = np.array(mone.capacity_distribution(budget, 4))
    w = np.array([1 / 8, 1 / 4, 1 / 2, 1])
    assert caps.sum() == pytest.approx(1) and caps @ w == pytest.approx(budget)
    objective = lambda c: -(c @ 2.0 ** np.arange(4)) + 10 * np.sum(  # noqa: E731
        c * np.log(np.maximum(c, 1e-12)))
    slsqp = scipy.optimize.minimize(
        objective, np.full(4, 0.25), method='SLSQP', bounds=[(0, 1)] * 4,
        constraints=[dict(type='eq', fun=lambda c: c.sum() - 1),
                     dict(type='eq', fun=lambda c: c @ w - budget)],
        options=dict(ftol=1e-12, maxiter=1000)).x
    np.testing.assert_allclose(caps, slsqp, atol=2e-4)
  assert mone.capacity_distribution(1.0, 4) == (0, 0, 0, 1)
  assert mone.capacity_distribution(1 / 8, 4) == (1, 0, 0, 0)


def test_token_counts():
  assert mone.token_counts(17, (0.25, 0.25, 0.25, 0.25), 1) == (5, 4, 4, 4)
  assert mone.token_counts(17, (1, 0, 0, 0), 1) == (16, 0, 0, 1)
  assert mone.token_counts(4, (0, 0, 0.5, 0.5), 0) == (0, 0, 2, 2)
  assert sum(mone.token_counts(10, mone.capacity_distribution(0.3, 3))) == 10


@pytest.mark.parametrize('budget', [
    0.3, *[pytest.param(b, marks=pytest.mark.slow) for b in (0.5, 0.125)]])
def test_nested_experts_equal_loops(budget):
  block = _block('mone', mone_budget=budget, mone_experts=4)
  block.alpha.value = jnp.asarray(0.7)
  call = lambda m, x: m(x, train=False, rngs=None)[0]  # noqa: E731
  _grad_compare(block, call, mone.reference, X)


def test_full_budget_is_the_standard_block():
  block = _block('mone', mone_budget=1.0)
  standard = vit.EncoderBlock.__call__(block, X, train=False, rngs=None)[0]
  np.testing.assert_allclose(block(X, train=False, rngs=None)[0], standard,
                             rtol=1e-5, atol=1e-6)
  _, metrics = block(X, train=False, rngs=None)
  assert float(metrics['nested/compute_fraction']) == pytest.approx(1.0)


def test_set_budget_changes_the_evaluation_only():
  model = build(lambda rngs: vit.VisionTransformer(
      num_classes=3, image_size=8, num_channels=1, variant='mu/4',
      block='mone', block_options=dict(mone_budget=0.5), rngs=rngs))
  assert mone.set_budget(model, 0.25) == 4
  budgets = {m.eval_budget for _, m in nnx.iter_modules(model)
             if isinstance(m, mone.NestedExperts)}
  assert budgets == {0.25}
  _, metrics = model(jnp.ones((1, 8, 8, 1)))
  assert float(metrics['block_0/nested/effective_capacity']) < 0.45
  with pytest.raises(ValueError, match=r'budget=2.0 must be in \[0.125, 1\]'):
    mone.set_budget(model, 2.0)


@pytest.mark.parametrize('block, options, message', [
    ('mod', dict(mod_capacity=0.0),
     'config.model.block_options.mod_capacity=0.0 must be a number in (0, 1]'),
    ('mod', dict(mod_layers='every:x'),
     "config.model.block_options.mod_layers='every:x' is not one of"),
    ('mone', dict(mone_experts=8),
     'config.model.block_options.mone_experts=8 needs the width 64 divisible'),
    ('mone', dict(mone_budget=0.01),
     'config.model.block_options.mone_budget=0.01 must be a number in'),
    ('mone', dict(mone_capacities=(0.5, 0.5)),
     'config.model.block_options.mone_capacities=(0.5, 0.5) must be None or '
     '4 numbers'),
    ('standard', dict(mod_capacity=0.3),
     'config.model.block_options.mod_capacity=0.3 is not an option of '
     "config.model.block='standard'"),
    ('mone', dict(), 'config.model.block_options.mone_layers=\'every:1\' '
     'selects MoE blocks [1, 3]'),
])
def test_block_config_errors_are_one_line(block, options, message):
  from tests.helpers import load_config  # pylint: disable=g-import-not-at-top
  from vmoe.train.config_validation import validate_config  # pylint: disable=g-import-not-at-top
  config = load_config('routers/tc_k1_digits' if not options
                       else 'routers/dense_digits')
  config.model.block = block
  config.model.block_options.update(options)
  with pytest.raises(ConfigError) as info:
    validate_config(config)
  assert str(info.value).startswith(message), str(info.value)
  assert '\n' not in str(info.value)


def test_block_kinds_keep_the_standard_parameters():
  standard = set(nnx.to_pure_dict(nnx.state(_block('standard'), nnx.Param)))
  assert set(nnx.to_pure_dict(nnx.state(_block('mod'), nnx.Param))) == (
      standard | {'router'})
  assert set(nnx.to_pure_dict(nnx.state(_block('mone'), nnx.Param))) == (
      standard | {'router', 'alpha'})
  assert math.isclose(mone.min_budget(4), 0.125)
