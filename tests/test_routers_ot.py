"""The optimal-transport routers (Sinkhorn token choice, Sinkhorn expert
choice, sparsity-constrained expert choice): independent references (numpy
plans, loops), google-research/vmoe fixtures, gradients, every dispatch
strategy, expert parallelism on 8 simulated devices, digits training."""

import json
import math
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.helpers import (D, fast_jit, moe_config, moe_layer, np_expert,
                           np_params, np_sinkhorn, np_softmax, np_sparse_plan)
from vmoe.nn import moe
from vmoe.nn import optimal_transport as ot
from vmoe.nn import routing as rt

DATA = pathlib.Path(__file__).parent / 'data'
REPO = pathlib.Path(__file__).resolve().parents[1]
STC, SEC, SCEC = ('sinkhorn_token_choice', 'sinkhorn_expert_choice',
                  'sparsity_constrained_expert_choice')
E, S = 4, 8


# -- independent references -----------------------------------------------------


def reference_pairs(router, logits, *, k=1, capacity, bpr=False,
                    combine='softmax'):
  """Loops over a numpy plan -> (mask, weight) [g, s, e]: mask 1 where the
  (token, expert) pair is processed, weight its combine weight."""
  gates = np_softmax(logits, -1)
  if router == SCEC:
    plan = np_sparse_plan(gates, capacity)
  else:
    plan = np_sinkhorn(logits)
  g, s, e = logits.shape
  mask = np.zeros((g, s, e))
  for gi in range(g):
    p = plan[gi]
    if router == STC:
      choices = [sorted(range(e), key=lambda j: (-p[t, j], j))[:k]
                 for t in range(s)]
      order = list(range(s))
      if bpr:
        order.sort(key=lambda t: -p[t].max())       # stable: ties by position
      fill = [0] * e
      for rank in range(k):                         # 1st choices first
        for t in order:
          ex = choices[t][rank]
          if fill[ex] < capacity:
            fill[ex] += 1
            mask[gi, t, ex] = 1
    else:
      for ex in range(e):
        for t in sorted(range(s), key=lambda t: (-p[t, ex], t))[:capacity]:
          mask[gi, t, ex] = 1
  return mask, (plan if combine == 'plan' else gates)


def reference_output(x, layer, mask, weight):
  """y[g, s] = sum_e mask * weight * expert_e(x[g, s]), float64 loops."""
  params = np_params(layer)
  y = np.zeros_like(x)
  for gi, t, ex in zip(*np.nonzero(mask)):
    y[gi, t] += weight[gi, t, ex] * np_expert(params, ex, x[gi, t])
  return y


def jnp_reference(router, params, x, mask, combine):
  """The same function in jnp for its gradient, with the routing `mask`
  (a constant from the numpy reference)."""
  w, k1, b1, k2, b2 = params
  logits = jnp.einsum('gsd,ed->gse', x, w)
  if combine == 'plan' and router != SCEC:
    weight = ot.sinkhorn(logits)  # its own gradient: test_optimal_transport
  else:  # the sparse plan has no gradient: only the softmax carries one
    weight = jax.nn.softmax(logits, axis=-1)
  h = jax.nn.gelu(jnp.einsum('gsd,edh->gseh', x, k1) + b1)  # tanh form
  out = jnp.einsum('gseh,ehd->gsed', h, k2) + b2
  return jnp.einsum('gse,gsed->gsd', mask * weight, out)


CASES = {  # router -> (layer options, capacity at eval_capacity_factor)
    STC: (dict(k=2, batch_priority=True, eval_capacity_factor=0.75), 3),
    SEC: (dict(eval_capacity_factor=1.5), 3),
    SCEC: (dict(eval_capacity_factor=1.0), 2),
}


@pytest.mark.parametrize('dispatch,kernels', [
    ('indices', 'xla'), ('einsum', 'xla'), ('dropless', 'xla'),
    ('indices', 'pallas')])  # routing from the plan + dispatch kernels
@pytest.mark.parametrize('router', [STC, SEC, SCEC])
def test_router_matches_reference_forward_and_gradients(router, dispatch,
                                                        kernels):
  options, c = CASES[router]
  layer = moe_layer(3, router=router, num_experts=E, group_size=S,
                    dispatch=dispatch, kernels=kernels, **options)
  if dispatch == 'dropless' and router == STC:
    c = S  # every pair has a place
  graphdef, state = nnx.split(layer)
  x = jax.random.normal(jax.random.key(1), (2, S, D))
  w_out = jax.random.normal(jax.random.key(2), (2, S, D))

  @fast_jit
  def run(state, x):
    def loss(state, x):
      y, metrics = nnx.merge(graphdef, state)(x, train=False)
      return jnp.sum(w_out * y), (y, metrics)
    return jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(state, x)

  (_, (y, metrics)), (g_state, g_x) = run(state, x)
  assert float(metrics['capacity']) == c
  x64 = np.asarray(x, np.float64)
  w = np.asarray(layer.router.kernel[...], np.float64)          # [e, d]
  mask, weight = reference_pairs(
      router, np.einsum('gsd,ed->gse', x64, w), k=options.get('k', 1),
      capacity=c, bpr=options.get('batch_priority', False))
  np.testing.assert_allclose(y, reference_output(x64, layer, mask, weight),
                             rtol=1e-4, atol=1e-5)
  # Gradients w.r.t. the router kernel, every expert weight and the input.
  ex = layer.experts
  params = [p[...] for p in (layer.router.kernel, ex.kernel1, ex.bias1,
                             ex.kernel2, ex.bias2)]
  grads = jax.grad(lambda p, x: jnp.sum(w_out * jnp_reference(
      router, p, x, jnp.asarray(mask, jnp.float32), 'softmax')),
                   argnums=(0, 1))(params, x)
  got = [g_state['router']['kernel'][...]] + [
      g_state['experts'][n][...] for n in ('kernel1', 'bias1', 'kernel2',
                                           'bias2')]
  for name, a, b in zip(('router', 'kernel1', 'bias1', 'kernel2', 'bias2'),
                        got, grads[0]):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6, err_msg=name)
  np.testing.assert_allclose(g_x, grads[1], rtol=2e-4, atol=2e-6)
  assert float(jnp.abs(got[0]).sum()) > 0  # the gate learns


@pytest.mark.parametrize('router', [STC, SEC])
def test_plan_combine_weights_and_their_gradient(router):
  options, c = CASES[router]
  layer = moe_layer(4, router=router, num_experts=E, group_size=S,
                    ot_combine_weights='plan', **options)
  graphdef, state = nnx.split(layer)
  x = jax.random.normal(jax.random.key(1), (2, S, D))
  w_out = jax.random.normal(jax.random.key(2), (2, S, D))

  @fast_jit
  def run(state):
    def loss(state):
      y, _ = nnx.merge(graphdef, state)(x, train=False)
      return jnp.sum(w_out * y), y
    return jax.value_and_grad(loss, has_aux=True)(state)

  (_, y), g_state = run(state)
  x64 = np.asarray(x, np.float64)
  w = np.asarray(layer.router.kernel[...], np.float64)
  mask, weight = reference_pairs(
      router, np.einsum('gsd,ed->gse', x64, w), k=options.get('k', 1),
      capacity=c, bpr=options.get('batch_priority', False), combine='plan')
  np.testing.assert_allclose(y, reference_output(x64, layer, mask, weight),
                             rtol=1e-4, atol=1e-5)
  ex = layer.experts
  params = [p[...] for p in (layer.router.kernel, ex.kernel1, ex.bias1,
                             ex.kernel2, ex.bias2)]
  g_router = jax.grad(lambda p: jnp.sum(w_out * jnp_reference(
      router, p, x, jnp.asarray(mask, jnp.float32), 'plan')))(params)[0]
  np.testing.assert_allclose(g_state['router']['kernel'][...], g_router,
                             rtol=2e-4, atol=2e-6)


# -- google-research/vmoe fixtures ------------------------------------------------


def _router(name, **options):
  return moe_layer(router=name, num_experts=E, group_size=S, **options).router


def _decide(router, clean, noisy=None, *, capacity):
  clean = jnp.asarray(clean)
  noisy = clean if noisy is None else jnp.asarray(noisy)
  return router.decide({'logits': clean, 'noisy': noisy}, capacity=capacity)


def test_sinkhorn_token_choice_matches_vmoe():
  ref = np.load(DATA / 'ot_sinkhorn.npz')
  logits = ref['sinkhorn_logits']
  for i in range(4):
    k, bpr, _ = ref[f'tc{i}_case']
    want = ref[f'tc{i}_combine']
    r = _decide(_router(STC, k=int(k), batch_priority=bool(bpr)), logits,
                capacity=want.shape[-1])
    np.testing.assert_allclose(rt.dense_combine(r), want, atol=1e-6,
                               err_msg=f'case {i}')
  # Training: the plan of the noisy logits routes. vmoe combines with the
  # clean softmax ('clean_softmax'); the default combines with the softmax of
  # the logits that routed, on the same slots.
  noisy, want = ref['tcnoisy_noisy_logits'], ref['tcnoisy_combine']
  kw = dict(k=2, batch_priority=True)
  r = _decide(_router(STC, ot_combine_weights='clean_softmax', **kw), logits,
              noisy, capacity=3)
  np.testing.assert_allclose(rt.dense_combine(r), want, atol=1e-6)
  r = _decide(_router(STC, **kw), logits, noisy, capacity=3)
  dense = np.asarray(rt.dense_combine(r))
  np.testing.assert_array_equal(dense != 0, want != 0)
  np.testing.assert_allclose(
      dense.sum(-1), np_softmax(noisy.astype(np.float64), -1) * (
          want.sum(-1) != 0), rtol=1e-5)
  # Combine weights and gradients, softmax and plan combine (vmoe
  # differentiates the plan implicitly, we through the iterations: equal
  # once converged, here to ~1e-6).
  for combine in ('softmax', 'plan'):
    router = _router(STC, ot_combine_weights=combine, **kw)
    w = ref['tcplan_w']

    def f(l, router=router, w=w):
      dense = rt.dense_combine(_decide(router, l, capacity=3))
      return jnp.sum(dense * w), dense
    (_, dense), grad = jax.value_and_grad(f, has_aux=True)(jnp.asarray(logits))
    np.testing.assert_allclose(dense, ref[f'tc{combine}_combine'], atol=1e-6)
    np.testing.assert_allclose(grad, ref[f'tc{combine}_grad'], atol=2e-5,
                               err_msg=combine)


def test_sinkhorn_expert_choice_matches_vmoe():
  ref = np.load(DATA / 'ot_sinkhorn.npz')
  logits = ref['sinkhorn_logits']
  for i in range(2):
    want = ref[f'ec{i}_combine']
    r = _decide(_router(SEC), logits, capacity=want.shape[-1])
    np.testing.assert_allclose(rt.dense_combine(r), want, atol=1e-6)
  r = _decide(_router(SEC), logits, ref['ecnoisy_noisy_logits'], capacity=2)
  np.testing.assert_allclose(rt.dense_combine(r), ref['ecnoisy_combine'],
                             atol=1e-6)
  router = _router(SEC, ot_combine_weights='plan')

  def f(l):
    dense = rt.dense_combine(_decide(router, l, capacity=2))
    return jnp.sum(dense * ref['ecplan_w']), dense
  (_, dense), grad = jax.value_and_grad(f, has_aux=True)(jnp.asarray(logits))
  np.testing.assert_allclose(dense, ref['ecplan_combine'], atol=1e-6)
  np.testing.assert_allclose(grad, ref['ecplan_grad'], atol=2e-5)


def test_sparsity_constrained_expert_choice_matches_vmoe():
  ref = np.load(DATA / 'ot_sparse.npz')
  for steps in (20, 500):
    for cf in (100, 50):
      want = ref[f'it{steps}_cf{cf}_combine']
      router = moe_layer(router=SCEC, num_experts=E, group_size=12,
                         sparse_ot_steps=steps).router
      r = _decide(router, ref['logits'], capacity=want.shape[-1])
      np.testing.assert_allclose(rt.dense_combine(r), want, atol=1e-6,
                                 err_msg=f'{steps} steps, cf {cf}')


def _metrics(router, clean, noisy, *, train):
  logits = {'logits': jnp.asarray(clean), 'noisy': jnp.asarray(noisy)}
  r = router.decide(logits, capacity=router.capacity(S, 1.0))
  return router.metrics(r, logits, train=train)


def test_auxiliary_losses_match_vmoe():
  """vmoe's Sinkhorn token choice adds the weighted importance loss (clean
  softmax gates) and, in training with noise, the load loss (clean vs noisy
  logits), not computed from the plan; its two expert-choice routers return
  0. vmoe's values are per group, averaged by its trainer as by our
  metrics."""
  ref = np.load(DATA / 'ot_aux_losses.npz')
  cases = json.loads(str(ref['cases']))
  tc = [c for c in cases if c['router'] == STC]
  assert len(tc) >= 6 and {c['k'] for c in tc} == {1, 2}
  for i, case in enumerate(tc):
    kw = dict(k=case['k'], batch_priority=case['batch_priority'],
              noise_std=case['noise_std'],
              importance_loss_weight=case['importance_loss_weight'],
              load_loss_weight=case['load_loss_weight'],
              balance_loss_weight=0.5)  # vmoe has no balance loss here
    clean, noisy = ref['tc_logits'][i], ref['tc_noisy_logits'][i]
    m = _metrics(_router(STC, **kw), clean, noisy, train=case['train'])
    msg = case['name']
    want = ref['tc_auxiliary_loss'][i].mean()
    np.testing.assert_allclose(m['auxiliary_loss'], want, rtol=1e-5,
                               atol=1e-7, err_msg=msg)
    # The components, where vmoe computes them (it reports 0 for a loss
    # whose weight is 0, and no load loss without noise).
    for name in ('importance_loss', 'load_loss'):
      if case[f'{name}_weight'] > 0 and name in case['metric_keys']:
        np.testing.assert_allclose(m[name], ref[f'tc_{name}'][i].mean(),
                                   rtol=1e-5, atol=1e-7, err_msg=msg)
    if not case['train'] or case['noise_std'] == 0:
      assert float(m['load_loss']) == 0, msg
    # The z-loss (ours; vmoe has none) adds its weighted value.
    m_z = _metrics(_router(STC, z_loss_weight=0.1, **kw), clean, noisy,
                   train=case['train'])
    np.testing.assert_allclose(
        m_z['auxiliary_loss'],
        want + 0.1 * rt.z_loss(jnp.asarray(clean)), rtol=1e-5, atol=1e-7,
        err_msg=msg)
  assert any(c['train'] and c['noise_std'] > 0 and c['load_loss_weight'] > 0
             for c in tc)
  # Expert choice: vmoe's auxiliary loss is 0; ours too under the same
  # (token-choice) loss weights, unless the z-loss is asked for.
  ec = [c for c in cases if c['router'] != STC]
  assert {c['router'] for c in ec} == {SEC, SCEC}
  for i, case in enumerate(ec):
    assert float(ref['ec_auxiliary_loss'][i]) == 0
    router = _router(case['router'], importance_loss_weight=0.005,
                     load_loss_weight=0.005, balance_loss_weight=0.5,
                     noise_std=case['noise_std'])
    m = _metrics(router, ref['ec_logits'][i], ref['ec_noisy_logits'][i],
                 train=case['train'])
    assert float(m['auxiliary_loss']) == 0, case['name']
    assert float(m['importance_loss']) > 0  # reported all the same


# -- layer behaviour --------------------------------------------------------------


@pytest.mark.parametrize('router', [STC, SEC, SCEC])
def test_metrics_losses_noise_and_parameters(router):
  layer = moe_layer(router=router, num_experts=E, group_size=S, k=2,
                    z_loss_weight=0.1)
  graphdef, state = nnx.split(layer)
  x = jax.random.normal(jax.random.key(1), (2, S, D))

  @fast_jit
  def run(state, x, key):
    m = nnx.merge(graphdef, state)
    return (m(x, train=True, rngs=nnx.Rngs(gating=key)),
            m(x, train=False))

  (y_train, metrics), (y_eval, _) = run(state, x, jax.random.key(5))
  assert set(metrics) == set(moe.METRIC_KEYS)
  # As vmoe: Sinkhorn token choice adds the importance and load losses (the
  # library's weights, 0.005) to the z-loss, expert choice only the z-loss;
  # all are reported.
  want = 0.1 * metrics['z_loss']
  if router == STC:
    want += 0.005 * (metrics['importance_loss'] + metrics['load_loss'])
    assert float(metrics['load_loss']) > 0
  np.testing.assert_allclose(metrics['auxiliary_loss'], want, rtol=1e-6)
  assert float(metrics['importance_loss']) > 0
  np.testing.assert_allclose(jnp.sum(metrics['expert_load']), 1.0, rtol=1e-5)
  # Router noise (1/e by default) in training, none for the sparsity-
  # constrained router (as vmoe's); capacities equal in train and eval here.
  noisy = not np.allclose(y_train, y_eval, atol=1e-6)
  assert noisy == (router != SCEC)
  # The gate is token choice's parameter: same paths, shapes and values.
  base = moe_layer(router='token_choice', num_experts=E, group_size=S)
  shapes = lambda m: jax.tree.map(jnp.shape, nnx.to_pure_dict(nnx.state(m)))
  assert shapes(layer) == shapes(base)
  np.testing.assert_array_equal(layer.router.kernel[...],
                                base.router.kernel[...])


def test_sparsity_constrained_noise_when_asked():
  layer = moe_layer(router=SCEC, num_experts=E, group_size=S, noise_std=1.0)
  assert layer.router.noise_std == 1.0
  assert moe_layer(router=SCEC, num_experts=E).router.noise_std == 0.0


@pytest.mark.parametrize('kw, message', [
    (dict(router=STC, sinkhorn_iterations=0),
     r'model\.moe\.sinkhorn_iterations=0 must be an integer >= 1'),
    (dict(router=SEC, sinkhorn_mode='lse'),
     r"model\.moe\.sinkhorn_mode='lse' is not one of \('kernel', 'log'\)"),
    (dict(router=STC, ot_combine_weights='gates'),
     r"model\.moe\.ot_combine_weights='gates' is not one of"),
    (dict(router=SCEC, sparse_ot_steps=1.5),
     r'model\.moe\.sparse_ot_steps=1\.5 must be an integer >= 1'),
    (dict(router=SCEC, sparse_ot_learning_rate=0),
     r'model\.moe\.sparse_ot_learning_rate=0 must be a number > 0'),
    (dict(router=STC, k=5, num_experts=4),
     r'model\.moe\.k=5 exceeds model\.moe\.num_experts=4'),
])
def test_bad_options_fail_with_one_line(kw, message):
  with pytest.raises(ValueError, match=message):
    moe.validate_moe_config(moe_config(**kw))


# -- expert parallelism and training ------------------------------------------------


@pytest.mark.slow
def test_expert_parallel_equals_one_device():
  """8 simulated devices (subprocess): every router on a 2x4 (data x
  expert) mesh with 'indices' and 'einsum' dispatch, Sinkhorn token choice
  also 'dropless' on 8x1, gives the outputs, metrics and gradients of one
  device."""
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3',
             XLA_FLAGS='--xla_force_host_platform_device_count=8')
  proc = subprocess.run([sys.executable, '-m', 'tests.workers.routers_ot'],
                        cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  line = [l for l in proc.stdout.splitlines() if l.startswith('RESULT ')][-1]
  result = json.loads(line[len('RESULT '):])
  assert len(result) == 7
  for name, row in result.items():
    assert row['y'] < 1e-5 and row['metrics'] < 1e-5, (name, row)
    assert row['grads'] < 1e-5, (name, row)
    assert row['moved'] > 0, (name, row)  # the gate gradient is not zero
    # On the 2x4 mesh tokens cross devices by all-to-alls (two forward, the
    # output gradient's backward; the input needs none here); 8x1 has none.
    if 'dropless' in name:
      assert row['all_to_all'] == 0, (name, row)
    else:
      assert row['all_to_all'] >= 3, (name, row)


# The token-choice and expert-choice decisions (with the Adam loop of the
# sparse plan inside the train step); all three train for 800 steps from
# their configs in the README's table.
@pytest.mark.slow
@pytest.mark.parametrize('name', ['sinkhorn_tc_k2_digits',
                                  'sparse_ec_cf2_digits'])
def test_digits_config_trains_and_logs_routing_metrics(name, digits_data_dir,
                                                       tmp_path):
  from tests.test_moe_training import ROUTING_METRICS, _short  # pylint: disable=g-import-not-at-top
  from vmoe.train import metrics_writer  # pylint: disable=g-import-not-at-top
  from vmoe.train import trainer  # pylint: disable=g-import-not-at-top
  config = _short(f'routers/{name}', digits_data_dir)
  result = trainer.train_and_evaluate(config, str(tmp_path))
  assert math.isfinite(result['loss'])
  train = [r for r in metrics_writer.read_metrics(str(tmp_path))
           if r['split'] == 'train']
  for block in ('block_1', 'block_3'):
    for metric in ROUTING_METRICS:
      assert f'moe/{block}/{metric}' in train[-1], (block, metric)
