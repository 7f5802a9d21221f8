"""Scanned layers, rematerialisation and gradient accumulation compute the
plain model's function; checkpoints load across the scanned and unscanned
layouts."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from tests.helpers import fast_jit, max_diff
from vmoe import checkpoints
from vmoe.checkpoints import layout
from vmoe.checkpoints import mapping
from vmoe.nn import scan
from vmoe.nn import vit
from vmoe.recipes import common
from vmoe.train import steps


def _model_cfg(scan_layers=False, remat='none', depth=4, moe='every:2',
               **moe_kw):
  cfg = ml_collections.ConfigDict(dict(
      variant='mu/2', pool='tok', dropout=0.0, stochastic_depth=0.2,
      scan_layers=scan_layers, remat=remat, moe=None, depth=depth, width=16,
      mlp_dim=32, num_heads=2, head_zero_init=False))
  if moe:
    cfg.moe = common.moe_config(
        layers=moe, num_experts=4, k=2, group_size=34, noise_std=0.5,
        **moe_kw)
  return cfg


def _build(cfg, seed=0):
  make = lambda: vit.create_model(cfg, num_classes=5, image_size=8,
                                  num_channels=1, rngs=nnx.Rngs(seed))
  abstract = nnx.eval_shape(make)
  params = fast_jit(lambda: nnx.to_pure_dict(nnx.state(make(), nnx.Param)))()
  return abstract, params


def _canonical(flat, abstract):
  if abstract.stacks is None:
    return flat
  return scan.to_canonical(flat, abstract.layout, lambda a, t: a[t])


def _loss_and_grads(cfg, params, abstract, images, key):
  fn = steps.ModelFn(abstract)

  def loss(p):
    logits, metrics = fn(p, images, train=True, rng=key)
    return jnp.sum(jnp.tanh(logits)) + metrics['auxiliary_loss'], (
        logits, metrics)

  (value, (logits, metrics)), grads = fast_jit(
      jax.value_and_grad(loss, has_aux=True))(params)
  return value, logits, metrics, _canonical(mapping.flatten(grads), abstract)


@functools.lru_cache(maxsize=None)
def _reference():
  """(images, key, parameters, (loss, logits, metrics, gradients)) of the
  unscanned model without remat (once per test process)."""
  images = jax.random.normal(jax.random.key(1), (4, 8, 8, 1))
  key = jax.random.key(2)
  abstract, params = _build(_model_cfg())
  return images, key, params, _loss_and_grads(None, params, abstract, images,
                                              key)


@pytest.mark.parametrize('spec,depth,want', [
    ('every:2', 12, [scan.Stack(0, 0, 2, 6)]),
    ((5, 7), 8, [scan.Stack(0, 0, 1, 5), scan.Single(5), scan.Single(6),
                 scan.Single(7)]),
    ('second_half', 12, [scan.Stack(0, 0, 1, 6), scan.Stack(1, 6, 1, 6)]),
    ('none', 24, [scan.Stack(0, 0, 1, 24)]),
    ((0,), 3, [scan.Single(0), scan.Stack(0, 1, 1, 2)]),
])
def test_plan_finds_the_repeating_units(spec, depth, want):
  sig = [('moe' if i in vit.moe_block_indices(spec, depth) else 'dense')
         for i in range(depth)]
  assert list(scan.plan(sig)) == want


def test_layout_of_the_model_and_its_inference_from_names():
  cfg = _model_cfg(scan_layers=True, depth=8, moe=(5, 7))
  abstract = nnx.eval_shape(lambda: vit.create_model(
      cfg, num_classes=5, image_size=8, num_channels=1, rngs=nnx.Rngs(0)))
  assert abstract.layout == (scan.Stack(0, 0, 1, 5), scan.Single(5),
                             scan.Single(6), scan.Single(7))
  flat = mapping.flatten(nnx.to_pure_dict(nnx.state(abstract, nnx.Param)))
  assert flat['stacks/0/unit/0/attn/qkv_kernel'].shape == (5, 16, 3, 2, 8)
  assert 'blocks/5/mlp/experts/kernel1' in flat
  assert scan.infer_layout(flat) == abstract.layout


@pytest.mark.parametrize('scan_layers,remat', [
    (True, 'none'), (False, 'full'), (True, 'full'), (True, 'dots'),
    (False, 'save:qkv,mlp')])
def test_scan_and_remat_compute_the_unscanned_function(scan_layers, remat):
  """Same initial parameters, forward, auxiliary losses and gradients, in
  training (router noise and stochastic depth on)."""
  images, key, ref_params, ref = _reference()
  abstract, params = _build(_model_cfg(scan_layers, remat))
  assert max_diff(_canonical(mapping.flatten(params), abstract),
                  mapping.flatten(ref_params)) == 0
  value, logits, metrics, grads = _loss_and_grads(None, params, abstract,
                                                  images, key)
  assert sorted(metrics) == sorted(ref[2])
  # float32 rounding: XLA fuses a scanned body differently (jax 0.12: 1.3e-6).
  np.testing.assert_allclose(value, ref[0], rtol=1e-5)
  np.testing.assert_allclose(logits, ref[1], rtol=1e-5, atol=1e-6)
  assert metrics['auxiliary_loss'] > 0
  np.testing.assert_allclose(metrics['auxiliary_loss'],
                             ref[2]['auxiliary_loss'], rtol=1e-5)
  assert set(grads) == set(ref[3])
  for name, g in ref[3].items():
    # Entries near zero differ by rounding of the larger ones they sum.
    np.testing.assert_allclose(grads[name], g, rtol=1e-4,
                               atol=1e-5 * float(np.abs(g).max()) + 1e-7,
                               err_msg=name)


@pytest.mark.parametrize('kinds,moe,want', [
    # Mixture-of-depths on the dense blocks 0 and 2, MoE on 1 and 3: one
    # stack whose unit is (mod dense, standard MoE).
    (dict(attention='moh', block='mod',
          block_options=dict(mod_layers=(0, 2), mod_capacity=0.5,
                             mod_loss_weight=0.1)),
     'every:2', (scan.Stack(0, 0, 2, 2),)),
    # Nested experts on the last two blocks: two stacks of different kinds.
    (dict(attention='mha', block='mone',
          block_options=dict(mone_layers='last:2', mone_experts=2)),
     None, (scan.Stack(0, 0, 1, 2), scan.Stack(1, 2, 1, 2))),
])
def test_block_and_attention_kinds_scan_as_the_unscanned_model(kinds, moe,
                                                               want):
  """Blocks of another kind scan in runs of identical blocks: the scanned
  model holds the same parameters and computes the same loss, metrics and
  gradients as the unscanned one."""
  images = jax.random.normal(jax.random.key(1), (4, 8, 8, 1))
  key = jax.random.key(2)
  results = []
  for scan_layers in (False, True):
    cfg = _model_cfg(scan_layers, 'full' if scan_layers else 'none', moe=moe)
    cfg.update(kinds)
    abstract, params = _build(cfg)
    if scan_layers:
      assert abstract.layout == want
    results.append((_canonical(mapping.flatten(params), abstract),
                    *_loss_and_grads(None, params, abstract, images, key)))
  (ref_params, ref_value, _, ref_metrics, ref_grads), (
      params, value, _, metrics, grads) = results
  assert max_diff(params, ref_params) == 0
  assert sorted(metrics) == sorted(ref_metrics)
  np.testing.assert_allclose(value, ref_value, rtol=1e-5)
  for name, m in ref_metrics.items():
    np.testing.assert_allclose(metrics[name], m, rtol=1e-5, atol=1e-6,
                               err_msg=name)
  assert set(grads) == set(ref_grads)
  for name, g in ref_grads.items():
    np.testing.assert_allclose(grads[name], g, rtol=1e-4,
                               atol=1e-5 * float(np.abs(g).max()) + 1e-7,
                               err_msg=name)


def test_remat_policies_are_checked():
  for bad in ('half', 'save:', 'save:qkv,foo', None):
    with pytest.raises(ValueError, match='model.remat'):
      scan.validate_remat(bad)
  for good in ('none', 'full', 'dots', 'dots_no_batch', 'save:attn'):
    scan.validate_remat(good)


def test_conversions_round_trip():
  abstract, params = _build(_model_cfg(scan_layers=True))
  flat = mapping.flatten(jax.tree.map(np.asarray, params))
  canonical = layout.to_canonical_flat(flat)
  assert not scan.is_scanned(canonical)
  assert sorted({k.split('/')[1] for k in canonical
                 if k.startswith('blocks/')}, key=int) == [str(i) for i in
                                                           range(4)]
  back = layout.to_layout_flat(canonical, flat)
  assert set(back) == set(flat)
  assert max_diff(back, flat) == 0
  # Any prefix (an optimizer state) converts the same.
  opt = {f'opt/0/mu/{k}': v for k, v in flat.items()}
  assert set(layout.to_canonical_flat(opt)) == {f'opt/0/mu/{k}'
                                                for k in canonical}


def test_import_params_fills_a_scanned_model_from_unscanned_weights():
  abstract, params = _build(_model_cfg(scan_layers=False), seed=3)
  source = checkpoints.Source('ours', 'x', mapping.flatten(
      jax.tree.map(np.asarray, params)), {})
  scanned, _ = _build(_model_cfg(scan_layers=True))
  target = nnx.to_pure_dict(nnx.state(scanned, nnx.Param))
  loaded = checkpoints.import_params(source, target)
  assert max_diff(layout.to_canonical_flat(mapping.flatten(loaded)),
                  source.params) == 0


# -- gradient accumulation -----------------------------------------------------


def _train_setup(accum, moe=True, **kw):
  cfg = _model_cfg(moe='every:2' if moe else None)
  cfg.stochastic_depth = 0.0
  abstract, params = _build(cfg)
  tx = optax.sgd(0.1)  # updates linear in the gradients
  state = {'step': jnp.zeros((), jnp.int32), 'params': params,
           'opt_state': tx.init(params),
           'nonfinite_step': jnp.full((), -1, jnp.int32)}
  step = fast_jit(steps.make_train_step(
      steps.ModelFn(abstract), tx, seed=0, label_smoothing=0.1,
      learning_rate_fn=lambda s: 1e-2, grad_accum_steps=accum, **kw))
  return state, step


@pytest.mark.parametrize('accum,shards', [(4, 1), (2, 2)])
def test_grad_accumulation_equals_the_whole_batch_step(accum, shards):
  """One update from k micro-batches = the update from the whole batch, with
  router noise, auxiliary losses and every metric (float32 rounding)."""
  key = jax.random.key(5)
  batch = {'image': jax.random.normal(key, (8, 8, 8, 1)),
           'labels': jax.nn.one_hot(jnp.arange(8) % 5, 5)}
  state, whole = _train_setup(1)
  ref_state, ref_metrics = whole(state, batch)
  state, micro = _train_setup(accum, batch_shards=shards)
  new_state, metrics = micro(state, batch)
  assert sorted(metrics) == sorted(ref_metrics)
  assert float(ref_metrics['moe/auxiliary_loss']) > 0
  for name, value in ref_metrics.items():
    if name.endswith('/expert_load'):
      # A share of the batch's kept assignments: the mean of the
      # micro-batches' shares, not the whole batch's share.
      np.testing.assert_allclose(metrics[name], value, atol=0.02)
      continue
    np.testing.assert_allclose(metrics[name], value, rtol=2e-5, atol=1e-7,
                               err_msg=name)
  assert max_diff(new_state['params'], ref_state['params']) < 1e-6


def test_micro_batches_take_a_slice_of_every_shard():
  x = jnp.arange(16)
  np.testing.assert_array_equal(steps.split_micro_batches(x, 2, 1),
                                [np.arange(8), np.arange(8, 16)])
  # 2 shards of 8 rows: micro-batch m = rows 4m..4m+3 of each shard.
  np.testing.assert_array_equal(
      steps.split_micro_batches(x, 2, 2),
      [[0, 1, 2, 3, 8, 9, 10, 11], [4, 5, 6, 7, 12, 13, 14, 15]])
  with pytest.raises(ValueError, match='micro-batches'):
    steps.split_micro_batches(x, 3, 1)


def test_per_example_router_noise_does_not_depend_on_the_batch():
  logits = jnp.zeros((4, 6, 3))  # 4 groups of 6 tokens = 8 examples of 3
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(0), i))(
      jnp.arange(8))
  from vmoe.nn import routing  # pylint: disable=g-import-not-at-top
  whole = routing.add_gating_noise(logits, 1.0, keys)
  half = routing.add_gating_noise(logits[2:], 1.0, keys[4:])
  np.testing.assert_array_equal(whole[2:], half)
  assert float(jnp.std(whole)) > 0.5


# -- parameter and optimizer dtypes -------------------------------------------


def test_bfloat16_parameters_and_first_moment():
  from vmoe.train import optimizer  # pylint: disable=g-import-not-at-top
  cfg = _model_cfg(moe=None)
  cfg.param_dtype = 'bfloat16'
  abstract, params = _build(cfg)
  assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype('bfloat16')}
  config = common.get_base_config()
  config.optimizer.mu_dtype = 'bfloat16'
  config.num_train_steps = 10
  tx = optimizer.create_optimizer(config)
  state = tx.init(jax.tree.map(lambda x: x.astype(jnp.float32), params))
  adam = [s for s in jax.tree.leaves(state, is_leaf=lambda s: hasattr(
      s, 'mu')) if hasattr(s, 'mu')][0]
  assert {x.dtype for x in jax.tree.leaves(adam.mu)} == {jnp.dtype('bfloat16')}
  assert {x.dtype for x in jax.tree.leaves(adam.nu)} == {jnp.dtype('float32')}
  images = jnp.ones((2, 8, 8, 1))
  logits, _ = steps.ModelFn(abstract)(params, images, train=False)
  assert logits.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(logits)))
